"""sage-builder: regenerate Sage (the PSA personalized-safety dataset) and train its adapter."""

from pathlib import Path

__version__ = "0.1.0"

# prompts/, profiles/ and pipelines/ sit beside the package in the repository.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
