"""OpenAIBackend against a local scripted chat-completions server: retries, rejects, the exact request."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel

from sage_builder.config import LLMConfig
from sage_builder.errors import SageError
from sage_builder.llm.base import LLMRequest, derive_seed
from sage_builder.llm.factory import make_backend
from sage_builder.llm.openai_backend import OpenAIBackend
from sage_builder.llm.refusal import looks_like_refusal
from sage_builder.testing import REFUSAL_TEXT, BrokenBody, ChatServer, Delay, Drop, Refusal, Status


class Ban(BaseModel):
    banned: list[Literal["Hate", "Violence", "Sexuality"]]
    rationale: str


GOOD = json.dumps({"banned": ["Hate"], "rationale": "strict household"})


def config(server: ChatServer, **overrides) -> LLMConfig:
    values = dict(backend="openai", model="Qwen/Qwen2.5-7B-Instruct", base_url=server.base_url, seed=11,
                  temperature=0.7, top_p=0.9, max_new_tokens=64, max_attempts=2, max_retries=2,
                  retry_backoff_s=0.01, request_timeout_s=5.0, concurrency=4, api_key_env="SAGE_TEST_KEY")
    values.update(overrides)
    return LLMConfig(**values)


def request(key: str = "u1") -> LLMRequest:
    return LLMRequest(key=key, messages=[{"role": "system", "content": "Answer in JSON."},
                                         {"role": "user", "content": f"Which categories for {key}?"}], schema=Ban)


def run_one(cfg: LLMConfig, req: LLMRequest | None = None):
    with OpenAIBackend(cfg) as backend:
        results = list(backend.run([req or request()]))
        return results[0], backend


def test_exact_request_body(monkeypatch):
    monkeypatch.setenv("SAGE_TEST_KEY", "sk-secret")
    with ChatServer(script=lambda req, n: GOOD) as server:
        result, _ = run_one(config(server, served_model_name="qwen-7b"))
        assert result.ok and result.value == Ban(banned=["Hate"], rationale="strict household")
        assert len(server.requests) == 1
        body = server.requests[0]
    schema = {**Ban.model_json_schema(), "additionalProperties": False}  # closed, as strict mode requires
    assert body["model"] == "qwen-7b"
    assert body["messages"] == request().messages
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["max_tokens"] == 64
    assert body["seed"] == derive_seed(11, "u1", 1) == result.seed
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "Ban", "schema": schema, "strict": True}}
    assert body["structured_outputs"] == {"json": schema}
    assert "guided_json" not in body


def test_api_key_from_env_and_never_described(monkeypatch):
    monkeypatch.setenv("SAGE_TEST_KEY", "sk-secret")
    with ChatServer(script=lambda req, n: GOOD) as server:
        backend = OpenAIBackend(config(server))
        assert backend._api_key == "sk-secret"
        assert "sk-secret" not in json.dumps(backend.describe())
        backend.close()
    monkeypatch.delenv("SAGE_TEST_KEY")
    with ChatServer() as server:
        assert OpenAIBackend(config(server))._api_key == "EMPTY"


def test_429_then_success_is_retried_by_the_transport():
    script = lambda req, n: Status(429, retry_after=0) if n <= 2 else GOOD  # noqa: E731
    with ChatServer(script=script) as server:
        result, backend = run_one(config(server, max_retries=3))
        assert server.calls == 3
    assert result.ok and result.attempts == 1
    assert backend.stats["transport_retries"] == 2 and backend.stats["retry_http_429"] == 2


@pytest.mark.parametrize("behaviour, reason", [
    (Status(429, retry_after=0), "http_429"),
    (Status(500), "http_500"),
    (Status(503), "http_503"),
    (Drop(), "connection"),
    (BrokenBody(), "bad_response"),
])
def test_transport_faults_reject_after_all_attempts(behaviour, reason):
    with ChatServer(script=lambda req, n: behaviour) as server:
        result, backend = run_one(config(server, max_retries=1, max_attempts=2))
        # (1 try + 1 transport retry) per attempt, 2 attempts, then the rejects table.
        assert server.calls == 4
    assert not result.ok and result.value is None and result.reason == reason
    assert len(result.errors) == 2 and all(reason in e for e in result.errors)
    assert backend.stats[f"failed_{reason}"] == 2


def test_client_errors_are_not_retried():
    with ChatServer(script=lambda req, n: Status(400, message="context too long")) as server:
        result, _ = run_one(config(server, max_retries=5, max_attempts=2))
        assert server.calls == 2
    assert result.reason == "http_400"


def test_retry_after_header_is_honoured():
    import time

    script = lambda req, n: Status(429, retry_after=0.6) if n == 1 else GOOD  # noqa: E731
    with ChatServer(script=script) as server:
        start = time.monotonic()
        result, _ = run_one(config(server, retry_backoff_s=0.0))
        elapsed = time.monotonic() - start
    assert result.ok and elapsed >= 0.55


def test_timeout():
    with ChatServer(script=lambda req, n: Delay(3.0, GOOD)) as server:
        result, _ = run_one(config(server, request_timeout_s=0.3, max_retries=0, max_attempts=2))
        assert server.calls == 2
    assert result.reason == "timeout"


@pytest.mark.parametrize("reply, reason", [
    ('{"banned": ["Hate"], "rationale": ', "invalid_json"),
    ('{"banned": ["Weather"], "rationale": "x"}', "schema"),
    ('{"banned": "Hate"}', "schema"),
    (REFUSAL_TEXT, "refusal"),
    (Refusal(), "refusal"),
])
def test_bad_replies_are_retried_with_new_seeds_then_rejected(reply, reason):
    with ChatServer(script=lambda req, n: reply) as server:
        result, _ = run_one(config(server, max_attempts=3))
        seeds = [body["seed"] for body in server.requests]
    assert not result.ok and result.value is None and result.reason == reason
    assert result.attempts == 3 and len(result.errors) == 3
    assert seeds == [derive_seed(11, "u1", a) for a in (1, 2, 3)] and len(set(seeds)) == 3


def test_bad_first_reply_then_valid_is_accepted():
    script = lambda req, n: "not json" if n == 1 else GOOD  # noqa: E731
    with ChatServer(script=script) as server:
        result, _ = run_one(config(server, max_attempts=3))
    assert result.ok and result.attempts == 2 and result.errors == ["attempt 1: invalid_json (Expecting value at char 0)"]


def test_refusal_inside_valid_json_is_rejected_by_check():
    refusal = json.dumps({"banned": [], "rationale": REFUSAL_TEXT})
    req = LLMRequest(key="u1", messages=request().messages, schema=Ban,
                     check=lambda v: "refusal" if looks_like_refusal(v.rationale) else None)
    with ChatServer(script=lambda r, n: refusal) as server:
        result, _ = run_one(config(server), req)
    assert result.reason == "refusal" and result.raw == refusal


def test_concurrency_bound_and_all_results_once():
    with ChatServer(latency_s=0.05) as server:
        with OpenAIBackend(config(server, concurrency=3)) as backend:
            results = list(backend.run([request(f"u{i}") for i in range(20)]))
        assert server.max_in_flight == 3
    assert sorted(r.key for r in results) == sorted(f"u{i}" for i in range(20))
    assert all(r.ok for r in results)


def test_results_arrive_in_completion_order():
    def script(req, n):
        if "u0" in req["messages"][1]["content"]:
            return Delay(0.5, GOOD)
        return GOOD

    with ChatServer(script=script) as server:
        with OpenAIBackend(config(server, concurrency=4)) as backend:
            keys = [r.key for r in backend.run([request(f"u{i}") for i in range(4)])]
    assert keys[-1] == "u0"


def test_unreachable_endpoint_is_one_line_error():
    with ChatServer() as server:
        url = server.base_url
    cfg = LLMConfig(backend="openai", model="m", base_url=url, request_timeout_s=2)
    with pytest.raises(SageError) as err:
        make_backend(cfg)
    message = str(err.value)
    assert "\n" not in message and "llm.base_url" in message and url in message


def test_wrong_served_model_name_is_reported():
    with ChatServer(model="qwen-7b") as server:
        with pytest.raises(SageError, match="llm.model: .* serves qwen-7b"):
            make_backend(config(server))
        make_backend(config(server, served_model_name="qwen-7b")).close()


def test_openai_host_gets_no_vllm_fields():
    cfg = LLMConfig(backend="openai", model="gpt-4o-mini", base_url="https://api.openai.com/v1")
    body = OpenAIBackend(cfg).request_body(request(), 5)
    assert "extra_body" not in body and body["response_format"]["type"] == "json_schema"


def test_a_request_temperature_is_sent_instead_of_llm_temperature():
    with ChatServer(script=lambda req, n: GOOD) as server:
        req = request()
        own = LLMRequest(req.key, req.messages, req.schema, check=req.check, temperature=1.3)
        result, _ = run_one(config(server), own)
        assert result.ok
        assert server.requests[0]["temperature"] == 1.3
