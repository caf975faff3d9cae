"""The shared validate-retry-reject loop of every LLM backend, driven by ScriptedBackend."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel

from sage_builder.config import LLMConfig
from sage_builder.errors import SageError
from sage_builder.llm.base import LLMRequest, TransportFailure, derive_seed, judge_reply
from sage_builder.llm.refusal import looks_like_refusal
from sage_builder.llm.scripted import ScriptedBackend


class Prompt(BaseModel):
    prompt: str
    category: Literal["Hate", "Violence"]


def no_refusal(value: Prompt) -> str | None:
    return "refusal" if looks_like_refusal(value.prompt) else None


def requests(n: int, check=None) -> list[LLMRequest]:
    return [LLMRequest(key=f"k{i}", messages=[{"role": "user", "content": str(i)}], schema=Prompt, check=check)
            for i in range(n)]


def good(request: LLMRequest, seed: int) -> str:
    return json.dumps({"prompt": f"a photo for {request.key}", "category": "Hate"})


def backend(reply, **overrides) -> ScriptedBackend:
    return ScriptedBackend(LLMConfig(model="scripted", seed=42, max_attempts=3, **overrides), reply)


def test_all_valid_first_attempt():
    llm = backend(good)
    results = list(llm.run(requests(4)))
    assert [r.key for r in results] == ["k0", "k1", "k2", "k3"]
    assert all(r.ok and r.attempts == 1 and r.errors == [] for r in results)
    assert results[0].value == Prompt(prompt="a photo for k0", category="Hate")
    assert [r.seed for r in results] == [derive_seed(42, f"k{i}", 1) for i in range(4)]


def test_seeds_differ_per_attempt_and_reproduce():
    llm = backend(lambda request, seed: "nope")
    list(llm.run(requests(2)))
    seeds = [seed for key, seed in llm.calls if key == "k0"]
    assert len(seeds) == 3 and len(set(seeds)) == 3
    again = backend(lambda request, seed: "nope")
    list(again.run(requests(2)))
    assert again.calls == llm.calls
    # Independent of the other requests in the batch, and of the base seed.
    alone = backend(lambda request, seed: "nope")
    list(alone.run(requests(1)))
    assert [seed for _, seed in alone.calls] == seeds
    assert derive_seed(43, "k0", 1) != derive_seed(42, "k0", 1)


def test_rejects_carry_reasons_and_no_default_value():
    replies = {
        "k0": "not json at all",
        "k1": json.dumps({"prompt": "x", "category": "Weather"}),
        "k2": "I'm sorry, but I can't help with that.",
        "k3": TransportFailure("http_503", "service unavailable"),
    }
    llm = backend(lambda request, seed: replies[request.key])
    results = {r.key: r for r in llm.run(requests(4))}
    assert {k: r.reason for k, r in results.items()} == {
        "k0": "invalid_json", "k1": "schema", "k2": "refusal", "k3": "http_503"}
    for r in results.values():
        assert not r.ok and r.value is None and r.attempts == 3 and len(r.errors) == 3
    assert results["k1"].errors[0].startswith("attempt 1: schema (category:")
    assert results["k3"].raw is None and "service unavailable" in results["k3"].errors[0]


def test_retry_then_accept():
    def reply(request: LLMRequest, seed: int) -> str:
        attempt = [s for k, s in llm.calls if k == request.key].index(seed) + 1
        return good(request, seed) if attempt == 2 else "{broken"

    llm = backend(reply)
    results = list(llm.run(requests(2)))
    assert all(r.ok and r.attempts == 2 and len(r.errors) == 1 for r in results)
    assert results[0].seed == derive_seed(42, "k0", 2)


def test_refusal_inside_valid_json_is_rejected_by_check():
    refusal = json.dumps({"prompt": "I cannot help with creating that content.", "category": "Hate"})
    llm = backend(lambda request, seed: refusal)
    (result,) = llm.run(requests(1, check=no_refusal))
    assert result.reason == "refusal" and result.value is None and result.raw == refusal
    # Without the check the same reply is accepted: the check is what catches it.
    (plain,) = backend(lambda request, seed: refusal).run(requests(1))
    assert plain.ok


def test_progress_callback_and_duplicate_keys():
    seen = []
    list(backend(good).run(requests(3), progress=seen.append))
    assert [r.key for r in seen] == ["k0", "k1", "k2"]
    with pytest.raises(SageError, match="share the item key k0"):
        list(backend(good).run(requests(1) + requests(1)))


def test_dropped_request_is_reported_not_lost():
    class Dropping(ScriptedBackend):
        def _complete(self, batch):
            for key, reply in super()._complete(batch):
                if key != "k1":
                    yield key, reply

    llm = Dropping(LLMConfig(model="scripted", max_attempts=2), good)
    results = {r.key: r for r in llm.run(requests(3))}
    assert results["k1"].reason == "no_reply" and results["k0"].ok


def test_judge_reply_accepts_surrounding_whitespace():
    value, reason, _ = judge_reply(requests(1)[0], '  {"prompt": "p", "category": "Violence"}\n')
    assert reason is None and value.category == "Violence"


def test_request_schema_is_closed():
    schema = requests(1)[0].json_schema()
    assert schema["additionalProperties"] is False and set(schema["required"]) == {"prompt", "category"}
