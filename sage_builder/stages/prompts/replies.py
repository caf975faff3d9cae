"""Stage 2's LLM requests, settled through the stage's item cache (one cache per request kind).

A request whose key is already in the cache is never sent again, so a rerun after a crash asks
only for what is missing. The backend is loaded on the first request that has to be sent.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from sage_builder.executors import make_stage_backend
from sage_builder.llm.base import LLMRequest, LLMResult
from sage_builder.progress import progress

if TYPE_CHECKING:
    from sage_builder.llm.base import LLMBackend
    from sage_builder.stages.base import StageContext


def refusal_check(value: BaseModel) -> str | None:
    return "refusal" if getattr(value, "refused", False) else None


class StageLLM:
    """The stage's LLM: loaded only if some item is missing, so a finished rerun never pays for it."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.backend: LLMBackend | None = ctx.options.llm_backend  # type: ignore[attr-defined]
        self.owned = False

    def get(self) -> LLMBackend:
        if self.backend is None:
            self.backend = make_stage_backend(self.ctx.config)
            self.owned = True
        return self.backend

    def close(self) -> None:
        if self.owned and self.backend is not None:
            self.backend.close()

    def ask(self, cache_name: str, requests: list[LLMRequest], desc: str) -> dict[str, dict[str, Any]]:
        """Settle every request (from the item cache when done before); key -> cached row."""
        cache = self.ctx.stage_dir.items(cache_name)
        done = cache.done_keys()
        todo = [r for r in requests if r.key not in done]
        if todo:
            bar = progress(total=len(todo), desc=f"prompts: {desc}", unit="req")
            with cache.writer(flush_rows=32, flush_seconds=15.0) as writer:
                for result in self.get().run(todo):
                    writer.add(result_row(result))
                    bar.update(1)
            bar.close()
        table = cache.read(keys=[r.key for r in requests])
        rows = table.to_pylist() if table is not None else []
        return {row["item_key"]: row for row in rows}


def result_row(result: LLMResult) -> dict[str, Any]:
    return {"item_key": result.key, "ok": result.ok, "reason": result.reason,
            "value": result.value.model_dump_json() if result.value is not None else None,
            "raw": result.raw, "seed": result.seed, "attempts": result.attempts,
            "errors": "; ".join(result.errors)}


def last_text(row: dict[str, Any] | None) -> str | None:
    """The prompt text of a rejected reply when it parsed (shown in rejects), else None."""
    if not row or not row.get("raw"):
        return None
    try:
        return str(json.loads(row["raw"]).get("prompt")) or None
    except (ValueError, AttributeError):
        return None
