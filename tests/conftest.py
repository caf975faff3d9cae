"""Shared test setup: offline, single-threaded torch, and the prepared small models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("SAGE_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("SAGE_TEST_MODELS", REPO / ".cache" / "models"))


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Folder of `make models`: SmolLM2 (real, tiny) and tiny random SDXL / SD1.5 pipelines."""
    if not (MODELS / "smollm2-135m-instruct" / "config.json").exists():
        pytest.fail(f"{MODELS} is not prepared: run `make models` (make test does it first)")
    return MODELS


@pytest.fixture(scope="session")
def smollm2_dir(models_dir: Path) -> Path:
    return models_dir / "smollm2-135m-instruct"
