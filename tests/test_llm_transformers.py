"""TransformersBackend with llguidance constrained decoding: a tiny random Llama, and the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from sage_builder.config import LLMConfig
from sage_builder.errors import SageError
from sage_builder.llm.base import LLMRequest
from sage_builder.llm.factory import make_backend
from sage_builder.llm.transformers_backend import TransformersBackend
from sage_builder.testing.tiny_llm import save_tiny_llama


class Ban(BaseModel):
    banned: list[Literal["Hate", "Violence", "Sexuality"]] = Field(max_length=3)
    minor: bool
    rationale: str = Field(max_length=12)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def requests(n: int) -> list[LLMRequest]:
    return [LLMRequest(key=f"user{i}", schema=Ban, messages=[
        {"role": "system", "content": "Answer with one JSON object."},
        {"role": "user", "content": f"User {i} is {14 + i} years old. Which categories are unsafe?"}])
        for i in range(n)]


def backend(model: Path, **overrides) -> TransformersBackend:
    values = dict(backend="transformers", model=str(model), temperature=1.0, top_p=0.95, seed=5,
                  max_new_tokens=96, batch_size=4, max_attempts=1, device="cpu")
    values.update(overrides)
    return make_backend(LLMConfig(**values))  # type: ignore[return-value]


def test_tiny_llama_replies_are_schema_valid(tiny_llama):
    with backend(tiny_llama) as llm:
        results = list(llm.run(requests(10)))
    assert len(results) == 10 and {r.key for r in results} == {f"user{i}" for i in range(10)}
    assert all(r.ok for r in results), [r.errors for r in results if not r.ok]
    for r in results:
        assert Ban.model_validate(json.loads(r.raw)) == r.value  # the raw text itself parses
        assert r.raw == r.raw.strip() and "\n" not in r.raw  # compact JSON: no free whitespace


@pytest.mark.parametrize("decoder", ["cached", "generate"])
def test_usage_read_after_close_still_says_what_served(tiny_llama, decoder):
    """Stages read usage() after the backend's `with` block: the decoder and prefix counts survive close()."""
    llm = backend(tiny_llama, decoder=decoder)
    with llm:
        assert all(r.ok for r in llm.run(requests(8)))  # two chunks of 4: the second reuses the prefix
    usage = llm.usage()
    assert llm.model is None and usage["requests"] == 8 and usage["decoder"] == decoder
    if decoder == "cached":
        assert usage["prefix_tokens_computed"] > 0 and usage["prefix_tokens_reused"] > 0
    else:
        assert usage["prefix_tokens_computed"] == usage["prefix_tokens_reused"] == 0


def test_seeds_reproduce_regardless_of_batch_size(tiny_llama):
    with backend(tiny_llama, batch_size=4) as llm:
        batched = {r.key: r.raw for r in llm.run(requests(6))}
        again = {r.key: r.raw for r in llm.run(requests(6))}
    with backend(tiny_llama, batch_size=1) as llm:
        single = {r.key: r.raw for r in llm.run(requests(6))}
    with backend(tiny_llama, batch_size=4, seed=6) as llm:
        other_seed = {r.key: r.raw for r in llm.run(requests(6))}
    assert batched == again
    # Same per-request seeds, different batch composition: the draws depend on the row's seed only.
    # (Padding may flip a near-tie in float logits; a random tiny model has few.)
    assert sum(batched[k] == single[k] for k in batched) >= 5
    assert other_seed != batched


def test_greedy_when_temperature_zero(tiny_llama):
    with backend(tiny_llama, temperature=0.0, seed=1) as llm:
        first = {r.key: r.raw for r in llm.run(requests(3))}
    with backend(tiny_llama, temperature=0.0, seed=2) as llm:
        second = {r.key: r.raw for r in llm.run(requests(3))}
    assert first == second


def test_too_few_tokens_is_a_truncation_reject(tiny_llama):
    with backend(tiny_llama, max_new_tokens=3, max_attempts=2) as llm:
        results = list(llm.run(requests(2)))
    assert all(r.reason == "truncated" and r.value is None and r.attempts == 2 for r in results)


def test_missing_model_folder_is_one_line_error(tmp_path):
    with pytest.raises(SageError) as err:
        backend(tmp_path / "no-such-model")
    message = str(err.value)
    assert "\n" not in message and message.startswith("llm.model:") and "make models" in message


def test_uncached_hub_model_offline_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SageError) as err:
        backend(Path("sage-builder-test/no-such-model"))
    message = str(err.value)
    assert "\n" not in message and "llm.model: cannot load 'sage-builder-test/no-such-model'" in message
    assert "make models" in message


@pytest.mark.slow
def test_smollm2_replies_are_schema_valid(smollm2_dir):
    with backend(smollm2_dir, temperature=0.0, max_new_tokens=48, batch_size=4, max_attempts=2) as llm:
        results = list(llm.run(requests(4)))
    assert all(r.ok for r in results), [r.errors for r in results if not r.ok]
    assert all(isinstance(r.value, Ban) for r in results)


def test_same_named_schemas_with_other_enums_get_their_own_grammar(tiny_llama):
    from pydantic import create_model

    def reply_model(categories: tuple[str, ...]):
        return create_model("Reply", forbidden=(list[Literal[categories]], Field(min_length=1)))  # type: ignore

    first, second = reply_model(("Hate", "Violence")), reply_model(("Weather",))
    messages = [{"role": "user", "content": "Which?"}]
    with backend(tiny_llama, max_new_tokens=48) as llm:
        results = list(llm.run([LLMRequest(key="a", schema=first, messages=messages),
                                LLMRequest(key="b", schema=second, messages=messages)]))
    assert all(r.ok for r in results), [r.errors for r in results]
    by_key = {r.key: r.value for r in results}
    assert set(by_key["b"].forbidden) == {"Weather"} and set(by_key["a"].forbidden) <= {"Hate", "Violence"}


@pytest.mark.parametrize("decoder", ["cached", "generate"])
def test_a_request_temperature_overrides_llm_temperature(tiny_llama, decoder):
    greedy_requests = [LLMRequest(r.key, r.messages, r.schema, temperature=0.0) for r in requests(4)]
    with backend(tiny_llama, temperature=0.0, seed=1, decoder=decoder) as llm:
        greedy = {r.key: r.raw for r in llm.run(requests(4))}
    with backend(tiny_llama, temperature=1.0, seed=2, decoder=decoder) as llm:
        own = {r.key: r.raw for r in llm.run(greedy_requests)}
        mixed = greedy_requests[:2] + requests(4)[2:]
        mixed_replies = {r.key: r.raw for r in llm.run(mixed)}
    with backend(tiny_llama, temperature=1.0, seed=2, decoder=decoder) as llm:
        sampled = {r.key: r.raw for r in llm.run(requests(4))}
    assert own == greedy
    # A batch is cut per temperature: each row gets the reply it gets in a batch of its own kind.
    assert mixed_replies == {**{k: greedy[k] for k in ("user0", "user1")}, **{k: sampled[k] for k in ("user2", "user3")}}


def test_chunks_are_cut_per_temperature():
    config = LLMConfig(backend="transformers", model="m", temperature=0.7, batch_size=2)
    batch = [(LLMRequest(f"k{i}", [{"role": "user", "content": "x" * (9 - i)}], Ban,
                         temperature=1.0 if i % 2 else None), i) for i in range(5)]
    chunks = TransformersBackend.plan_chunks(config, batch)
    assert [[request.key for request, _ in chunk] for chunk in chunks] == [["k4", "k2"], ["k0"], ["k3", "k1"]]
