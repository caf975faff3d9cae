"""A backend whose replies come from a Python function: for tests of stages, not for data."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from sage_builder.llm.base import LLMBackend, LLMRequest, TransportFailure

Reply = Callable[[LLMRequest, int], "str | TransportFailure"]


class ScriptedBackend(LLMBackend):
    name = "scripted"

    def __init__(self, config, reply: Reply):  # type: ignore[no-untyped-def]
        super().__init__(config)
        self.reply = reply
        self.calls: list[tuple[str, int]] = []

    def _complete(self, batch: Sequence[tuple[LLMRequest, int]]) -> Iterator[tuple[str, str | TransportFailure]]:
        for request, seed in batch:
            self.calls.append((request.key, seed))
            yield request.key, self.reply(request, seed)
