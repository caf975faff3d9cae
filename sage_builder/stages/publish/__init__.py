"""Stage: publish."""
