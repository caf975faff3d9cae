"""Stage: label."""
