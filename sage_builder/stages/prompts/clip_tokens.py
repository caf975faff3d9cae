"""Count prompt tokens with the real CLIP tokenizer(s) of the configured image model.

SDXL has two text encoders with their own tokenizers (``tokenizer/`` and ``tokenizer_2/``); a
prompt fits when it fits both. Counts include the BOS and EOS tokens, as the 77 positions do.
"""

from __future__ import annotations

from typing import Any

from sage_builder.errors import StageInputError
from sage_builder.runtime import hub_offline, is_local_path


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
        from transformers import CLIPTokenizer

        local_only = is_local_path(self.model) or hub_offline()
        tokenizers = []
        for subfolder in ("tokenizer", "tokenizer_2"):
            try:
                tokenizers.append(CLIPTokenizer.from_pretrained(self.model, subfolder=subfolder,
                                                                revision=self.revision,
                                                                local_files_only=local_only))
            except (OSError, ValueError) as exc:
                if subfolder == "tokenizer":
                    raise StageInputError(
                        f"{self.key}: no CLIP tokenizer in '{self.model}/tokenizer' to count prompt tokens "
                        f"({str(exc).splitlines()[0][:120]}); point {self.key} at a local diffusers model "
                        f"folder or download the model first") from None
        for tok in tokenizers:
            tok.model_max_length = 10**6  # we count past 77 on purpose; no truncation warning per prompt
        self._tokenizers = tokenizers
        return self

    def count(self, text: str) -> int:
        self.load()
        assert self._tokenizers is not None
        return max(len(tok(text, truncation=False)["input_ids"]) for tok in self._tokenizers)
