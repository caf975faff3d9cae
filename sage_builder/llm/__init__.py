"""LLM backends behind one small interface (see ``base.LLMBackend``); ``factory.make_backend`` picks one."""

from sage_builder.llm.base import LLMBackend, LLMRequest, LLMResult
from sage_builder.llm.factory import make_backend

__all__ = ["LLMBackend", "LLMRequest", "LLMResult", "make_backend"]
