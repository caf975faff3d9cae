"""Count prompt tokens with the real CLIP tokenizer(s) of the configured image model.

SDXL has two text encoders with their own tokenizers (``tokenizer/`` and ``tokenizer_2/``); a
prompt fits when it fits both. Counts include the BOS and EOS tokens, as the 77 positions do.
"""

from __future__ import annotations

from typing import Any

from sage_builder.errors import StageInputError
from sage_builder.runtime import hub_offline, is_local_path

MIN_VOCAB = 256


class ClipTokenCounter:
    def __init__(self, model: str, revision: str | None = None, key: str = "render.model"):
        self.model = model
        self.revision = revision
        self.key = key
        self._tokenizers: list[Any] | None = None

    def identity(self) -> str:
        """A hash of the loaded tokenizers' content, so item keys survive moving the model folder."""
        from sage_builder.store import stable_hash

        self.load()
        parts = []
        for tokenizer in self._tokenizers or []:
            backend = getattr(tokenizer, "backend_tokenizer", None)
            parts.append(backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()))
        return stable_hash(parts)

    def load(self) -> ClipTokenCounter:
        if self._tokenizers is not None:
            return self
        tokenizers = [tok for tok in (self._load_one("tokenizer"), self._load_one("tokenizer_2")) if tok is not None]
        for tok in tokenizers:
            tok.model_max_length = 10**6  # we count past 77 on purpose; no truncation warning per prompt
        self._tokenizers = tokenizers
        return self

    def _load_one(self, subfolder: str) -> Any:
        """One tokenizer folder; None for a missing ``tokenizer_2`` (SD1.5 has one tokenizer)."""
        from transformers import CLIPTokenizer

        try:
            tokenizer = CLIPTokenizer.from_pretrained(self.model, subfolder=subfolder, revision=self.revision,
                                                      local_files_only=is_local_path(self.model) or hub_offline())
            # transformers 5 answers files it cannot find with an empty tokenizer (its special tokens
            # only), not an error; a byte-level BPE holds at least the 256 byte symbols.
            if len(tokenizer.get_vocab()) < MIN_VOCAB:
                raise OSError(f"only {len(tokenizer.get_vocab())} vocabulary entries found (files not there)")
        except (OSError, ValueError) as exc:
            if subfolder == "tokenizer_2":
                return None
            raise StageInputError(
                f"{self.key}: no CLIP tokenizer in '{self.model}/tokenizer' to count prompt tokens "
                f"({str(exc).splitlines()[0][:120]}); point {self.key} at a local diffusers model "
                f"folder or download the model first") from None
        return tokenizer

    def count(self, text: str) -> int:
        self.load()
        assert self._tokenizers is not None
        return max(len(tok(text, truncation=False)["input_ids"]) for tok in self._tokenizers)
