"""Stage: profiles."""
