"""Stage: prompts."""
