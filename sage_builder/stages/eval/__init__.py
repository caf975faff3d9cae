"""Stage 7 (eval)."""
