"""Profile -> statement -> embedding (SPEC 1.3): the one path that stage 1 and ``sage generate`` share.

A user's six attributes and banned/allowed lists fill the configured statement template
(``profiles.statement_template``), which goes through the LLM's chat template with no generation;
the embedding is the last hidden layer, mean-pooled over the prompt's tokens, padding masked.

Mean pooling is the one pooling used everywhere (the authors' inference path sum-pooled, which
silently mismatched their training). Batches are right-padded so that, under causal attention,
padding never changes a real token's state: a batched embedding equals the one computed alone.
It lives outside ``stages/`` because stages never import each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sage_builder.config_base import model_identity
from sage_builder.errors import ConfigError, StageInputError
from sage_builder.runtime import hub_offline, is_local_path, resolve_device, resolve_dtype
from sage_builder.templates import PromptTemplate, load_template

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig

POOLING = "mean"
LAYER = "last hidden layer (hidden_states[-1], after the final norm)"
STATEMENT_VARS = {"age", "age_group", "gender", "religion", "physical_condition", "mental_condition",
                  "banned", "allowed"}


@dataclass(frozen=True)
class EmbeddingSetup:
    """Everything that decides a user's vector: model, its revision and file, device, dtype, template."""

    model: str
    revision: str | None
    gguf_file: str | None
    device: str
    dtype: str
    template: Path

    @classmethod
    def from_config(cls, config: PipelineConfig) -> EmbeddingSetup:
        """Stage 1's settings: ``profiles.embedding_model`` (default ``llm.model``) and its template."""
        pc, llm = config.profiles, config.llm
        same = pc.embedding_model in (None, llm.model)
        return cls(model=pc.embedding_model or llm.model, revision=llm.revision if same else None,
                   gguf_file=llm.gguf_file if same else None, device=llm.device, dtype=llm.dtype,
                   template=Path(pc.statement_template))

    def resolved(self) -> EmbeddingSetup:
        """The same setup with ``auto`` device and dtype decided for this machine."""
        device = resolve_device(self.device, "llm.device")
        return EmbeddingSetup(self.model, self.revision, self.gguf_file, device, resolve_dtype(self.dtype, device),
                              self.template)

    def identity(self) -> dict[str, Any]:
        """What enters an embedding's item key (the model by content when it is a local folder)."""
        return {"model": model_identity(self.model), "revision": self.revision, "gguf_file": self.gguf_file,
                "dtype": self.dtype, "pooling": POOLING, "layer": LAYER}

    def embedder(self) -> StatementEmbedder:
        return StatementEmbedder(self.model, self.revision, self.gguf_file, self.device, self.dtype)


def load_statement_template(path: Path | str) -> PromptTemplate:
    """The statement template, rejected in one line if it uses a placeholder no profile fills."""
    template = load_template(path)
    unknown = template.variables - STATEMENT_VARS
    if unknown:
        raise ConfigError(f"{path}: unknown placeholder {{{{{sorted(unknown)[0]}}}}} "
                          f"(known: {', '.join(sorted(STATEMENT_VARS))})")
    return template


def statement_messages(template: PromptTemplate, attributes: Mapping[str, Any], banned: list[str],
                       allowed: list[str]) -> list[dict[str, str]]:
    """The chat messages that describe one user (attributes: age, age_group, gender, religion,
    physical_condition, mental_condition)."""
    return template.render(**attributes, banned=", ".join(banned) or "none", allowed=", ".join(allowed) or "none")


def embed_profile(setup: EmbeddingSetup, attributes: Mapping[str, Any], banned: list[str],
                  allowed: list[str]) -> np.ndarray:
    """One user's vector, computed exactly as stage 1 computes it."""
    messages = statement_messages(load_statement_template(setup.template), attributes, banned, allowed)
    embedder = setup.resolved().embedder()
    try:
        return embedder.embed([messages])[0]
    finally:
        embedder.close()


def check_model_available(model: str, key: str = "llm.model") -> None:
    """A local model folder must exist; a hub id must be in the local cache when offline (``HF_HUB_OFFLINE``
    read as huggingface_hub reads it: 1, true, yes, on)."""
    if is_local_path(model):
        if not (Path(model) / "config.json").exists():
            raise StageInputError(f"{key}: {model} does not exist (no config.json there); run `make models`")
        return
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise StageInputError(f"{key}: {model} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                                  f"download it first or point {key} at a local folder")


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

        self.device = resolve_device(self.device, "llm.device")
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
