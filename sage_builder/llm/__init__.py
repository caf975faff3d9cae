"""LLM backends behind one small interface (see ``base.LLMBackend``)."""

from sage_builder.llm.base import LLMBackend, LLMRequest, LLMResult, make_backend

__all__ = ["LLMBackend", "LLMRequest", "LLMResult", "make_backend"]
