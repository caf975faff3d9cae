"""Which backend serves ``llm.backend``: kept apart from the interface (:mod:`sage_builder.llm.base`),
which every backend imports, so that the interface never imports a backend back."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sage_builder.errors import SageError

if TYPE_CHECKING:
    from sage_builder.config import LLMConfig
    from sage_builder.llm.base import LLMBackend


def make_backend(config: LLMConfig) -> LLMBackend:
    """Build the configured backend; heavy imports (vllm, torch) happen only here."""
    if config.backend == "openai":
        from sage_builder.llm.openai_backend import OpenAIBackend

        backend: LLMBackend = OpenAIBackend(config)
    elif config.backend == "transformers":
        from sage_builder.llm.transformers_backend import TransformersBackend

        backend = TransformersBackend(config)
    elif config.backend == "vllm":
        from sage_builder.llm.vllm_backend import VLLMBackend

        backend = VLLMBackend(config)
    else:  # pragma: no cover - the config literal forbids it
        raise SageError(f"llm.backend: unknown backend '{config.backend}'")
    backend.check_ready()
    return backend
