"""User embeddings (SPEC 1.3): a statement about the user, put through the LLM's chat template
with no generation; the last hidden layer, mean-pooled over the prompt's tokens, padding masked.

Mean pooling is the one pooling used everywhere (the authors' inference path sum-pooled, which
silently mismatched their training). Batches are right-padded so that, under causal attention,
padding never changes a real token's state: a batched embedding equals the one computed alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sage_builder.errors import StageInputError

log = logging.getLogger("sage.profiles")
POOLING = "mean"
LAYER = "last hidden layer (hidden_states[-1], after the final norm)"


def model_is_local(model: str) -> bool:
    return model.startswith("/") or model.startswith(".")


def check_model_available(model: str, key: str = "llm.model") -> None:
    """A local model folder must exist; a hub id must be in the local cache when offline."""
    if model_is_local(model):
        if not (Path(model) / "config.json").exists():
            raise StageInputError(f"{key}: {model} does not exist (no config.json there); run `make models`")
        return
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise StageInputError(f"{key}: {model} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                                  f"download it first or point {key} at a local folder")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


@dataclass
class StatementEmbedder:
    """Loads the model once; ``embed`` turns chat conversations into pooled vectors."""

    model_ref: str
    revision: str | None = None
    gguf_file: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.device = resolve_device(self.device)
        self.dtype = resolve_dtype(self.dtype, self.device)
        kwargs: dict[str, Any] = {"revision": self.revision, "local_files_only": True}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_ref, **kwargs)
            self.model = AutoModel.from_pretrained(self.model_ref, dtype=getattr(torch, self.dtype), **kwargs)
        except OSError as exc:
            raise StageInputError(f"embedding model {self.model_ref}: cannot load it offline "
                                  f"({str(exc).splitlines()[0]}); run `make models`") from None
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.dim = int(self.model.config.hidden_size)

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        # A base model without a chat template: the plain concatenated messages.
        return "\n\n".join(m["content"] for m in messages)

    def embed(self, conversations: Sequence[list[dict[str, str]]]) -> np.ndarray:
        """One float32 row per conversation (one forward pass for the whole batch)."""
        import torch

        texts = [self.prompt_text(m) for m in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            out = self.model(**enc, output_hidden_states=True)
        return mean_pool(out.hidden_states[-1], enc["attention_mask"])

    def embed_batches(self, conversations: Sequence[list[dict[str, str]]], batch_size: int
                      ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start index, vectors) per batch, so callers can save as they go."""
        for start in range(0, len(conversations), batch_size):
            yield start, self.embed(conversations[start:start + batch_size])

    def close(self) -> None:
        del self.model


def mean_pool(hidden: Any, attention_mask: Any) -> np.ndarray:
    """Mean of the hidden states over real tokens (mask 1), computed in float32."""
    mask = attention_mask.to(hidden.device).unsqueeze(-1).float()
    summed = (hidden.float() * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1.0)
    return (summed / counts).cpu().numpy().astype(np.float32)
