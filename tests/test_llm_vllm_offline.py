"""VLLMBackend against a fake ``vllm`` module that records what the engine was asked."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from sage_builder.config import LLMConfig
from sage_builder.errors import SageError
from sage_builder.llm.base import LLMRequest, derive_seed
from sage_builder.llm.factory import make_backend


class Ban(BaseModel):
    banned: list[Literal["Hate", "Violence"]]


@dataclass
class StructuredOutputsParams:
    json: Any = None


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    structured_outputs: StructuredOutputsParams | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str = "stop"


@dataclass
class RequestOutput:
    outputs: list[Completion]


@dataclass
class FakeLLM:
    kwargs: dict[str, Any]
    reply: Any = None
    chats: list[tuple[list, list]] = field(default_factory=list)

    def chat(self, messages, sampling_params=None, use_tqdm=True, **_):
        self.chats.append((messages, sampling_params))
        return [RequestOutput([self.reply(conv, params)]) for conv, params in zip(messages, sampling_params)]


@pytest.fixture
def fake_vllm(monkeypatch):
    engines: list[FakeLLM] = []
    module = types.ModuleType("vllm")
    module.__version__ = "0.0-fake"
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.SamplingParams = SamplingParams
    sampling.StructuredOutputsParams = StructuredOutputsParams

    def make_llm(**kwargs):
        engine = FakeLLM(kwargs, reply=module.reply)
        engines.append(engine)
        return engine

    module.LLM = make_llm
    module.SamplingParams = SamplingParams
    module.sampling_params = sampling
    module.reply = lambda conv, params: Completion(json.dumps({"banned": ["Hate"]}))
    module.engines = engines
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    return module


def config(**overrides) -> LLMConfig:
    values = dict(backend="vllm", model="Qwen/Qwen2.5-7B-Instruct", revision="abc123", temperature=0.7, top_p=0.8,
                  seed=9, max_new_tokens=200, tensor_parallel_size=2, gpu_memory_utilization=0.85,
                  max_model_len=4096, dtype="bfloat16", max_attempts=3)
    values.update(overrides)
    return LLMConfig(**values)


def requests(n: int) -> list[LLMRequest]:
    return [LLMRequest(key=f"u{i}", schema=Ban, messages=[{"role": "user", "content": f"user {i}"}]) for i in range(n)]


def test_one_batch_with_schema_and_seeds(fake_vllm):
    with make_backend(config()) as llm:
        results = list(llm.run(requests(5)))
    assert all(r.ok for r in results) and len(results) == 5
    (engine,) = fake_vllm.engines
    assert engine.kwargs == {"model": "Qwen/Qwen2.5-7B-Instruct", "revision": "abc123", "dtype": "bfloat16",
                             "seed": 9, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.85,
                             "max_model_len": 4096}
    assert len(engine.chats) == 1  # every request in ONE chat() call
    conversations, params = engine.chats[0]
    assert conversations == [r.messages for r in requests(5)]
    schema = requests(1)[0].json_schema()
    assert schema["additionalProperties"] is False
    assert [p.seed for p in params] == [derive_seed(9, f"u{i}", 1) for i in range(5)]
    assert all(p.structured_outputs.json == schema for p in params)
    assert all((p.temperature, p.top_p, p.max_tokens) == (0.7, 0.8, 200) for p in params)


def test_retries_only_the_failed_items_in_a_second_batch(fake_vllm):
    def reply(conv, params):
        if conv[0]["content"] == "user 1" and len(fake_vllm.engines[0].chats) == 1:
            return Completion('{"banned": ["Weather"]}')
        if conv[0]["content"] == "user 2":
            return Completion('{"banned": [', finish_reason="length")
        return Completion('{"banned": []}')

    fake_vllm.reply = reply
    with make_backend(config(max_attempts=2)) as llm:
        results = {r.key: r for r in llm.run(requests(3))}
    chats = fake_vllm.engines[0].chats
    assert [len(conversations) for conversations, _ in chats] == [3, 2]
    assert [p.seed for p in chats[1][1]] == [derive_seed(9, "u1", 2), derive_seed(9, "u2", 2)]
    assert results["u0"].ok and results["u1"].ok and results["u1"].attempts == 2
    assert results["u2"].reason == "truncated" and results["u2"].value is None


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(SageError, match=r"pip install 'sage-builder\[gpu\]'"):
        make_backend(config())
