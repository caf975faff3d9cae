"""Where code runs and how models are found: device, dtype, local folders, the offline flag, retry waits.

Every stage and backend asks these questions; they are answered here once, so that ``HF_HUB_OFFLINE``
means the same thing to the renderer, the LLM backends, the embedder and the tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sage_builder.errors import StageInputError

LOCAL_PREFIXES = ("/", "./", "../", "~", ".")


def hub_offline() -> bool:
    """huggingface_hub's own reading of ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` (1, true, yes, on)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_local_path(ref: str | Path) -> bool:
    """Whether a model reference names a folder on this machine rather than a hub id."""
    text = str(ref)
    return text.startswith(LOCAL_PREFIXES) or Path(text).expanduser().exists()


def resolve_device(device: str, key: str = "device") -> str:
    """``auto`` -> cuda when torch sees one, else cpu; an explicit cuda without CUDA is a one-line error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StageInputError(f"{key}: '{device}' asked for, but torch sees no CUDA device; "
                              f"use {key}: cpu (slow) or run on a GPU machine")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; any other name is kept."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def torch_dtype(dtype: str, device: str) -> Any:
    """The ``torch.dtype`` for a config's dtype name on ``device``."""
    import torch

    return getattr(torch, resolve_dtype(dtype, device))


def retry_after_seconds(exc: BaseException | None, only_status: int | None = None,
                        default: float | None = None) -> float | None:
    """The wait a server asked for in its ``Retry-After`` header (seconds), or ``default``.

    ``only_status`` limits it to one status (the Hub answers 429 with a wait worth honouring). An HTTP
    date instead of seconds is not worth parsing: ``default`` then, and the caller's backoff applies.
    """
    response = getattr(exc, "response", None)
    if response is None:
        return None
    if only_status is not None and getattr(response, "status_code", None) != only_status:
        return None
    value = response.headers.get("retry-after")
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        return default
