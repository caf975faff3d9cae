"""Stage 2 against the local OpenAI-compatible test server: transport faults and refusals end as rejects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from sage_builder.config import config_from_dict
from sage_builder.stages.base import run_stage
from sage_builder.stages.prompts.fixtures import chat_script, save_word_clip_tokenizer
from sage_builder.stages.prompts.stage import STAGE
from sage_builder.store import RunDir
from sage_builder.testing.chat_server import BrokenBody, ChatServer, Delay, Refusal, Status

SEEDS = "category,concept\nhate,hate symbols\nhate,slurs\nviolence,arson\nviolence,riots\n"


def fault(user: str, schema: str) -> Any:
    writes_p_h = "Variation:" in user
    if writes_p_h and "Concept: slurs" in user:
        return Status(500)
    if writes_p_h and "Concept: hate symbols" in user:
        return Refusal()
    if not writes_p_h and "Harmful concept: arson" in user:
        return BrokenBody()
    if writes_p_h and "Concept: riots" in user:
        return Delay(3.0)
    if writes_p_h and "Concept: hate " in user:  # the LLM-added Hate concept: refusal in plain text
        return "I'm sorry, I cannot help with that."
    return None


@pytest.fixture
def config(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "seeds.csv").write_text(SEEDS)
    tokenizer = save_word_clip_tokenizer(tmp_path / "clip", ["hate", "symbol", "slur", "arson", "riot"])
    return config_from_dict({
        "name": "t", "categories": ["Hate", "Violence"],
        "llm": {"backend": "openai", "model": "scripted", "max_attempts": 2, "concurrency": 8,
                "max_retries": 0, "retry_backoff_s": 0.0, "request_timeout_s": 0.5},
        "render": {"model": str(tokenizer)},
        "prompts": {"seed_concepts": str(tmp_path / "seeds.csv"), "concepts_per_category": 3,
                    "pairs_per_concept": 2, "max_pair_attempts": 2}})


@pytest.mark.slow
def test_server_faults_and_refusals_become_rejects_with_reasons(tmp_path: Path, config) -> None:  # type: ignore[no-untyped-def]
    with ChatServer(script=chat_script(fault=fault)) as server:
        config.llm.base_url = server.base_url
        manifest = run_stage(STAGE, config, RunDir(tmp_path / "run"))
        sent = list(server.requests)
    rejects = pq.read_table(tmp_path / "run" / "prompts" / "rejects.parquet").to_pylist()
    pairs = pq.read_table(tmp_path / "run" / "prompts" / "pairs.parquet").to_pylist()
    seeds = {"hate symbols", "slurs", "arson", "riots"}
    reasons: dict[str, set] = {}
    for r in rejects:
        name = r["concept"] if r["concept"] in seeds else r["category"] + " (llm)"
        reasons.setdefault(name, set()).add((r["step"], r["reason"]))
    assert reasons == {"slurs": {("unsafe", "http_500")}, "hate symbols": {("unsafe", "refusal")},
                       "arson": {("safe", "bad_response")}, "riots": {("unsafe", "timeout")},
                       "Hate (llm)": {("unsafe", "refusal")}}
    assert {p["category"] for p in pairs} == {"Violence"} and len(pairs) == 2
    assert all(r["final"] == (r["attempt"] == 2) for r in rejects)
    assert manifest.stats["slots_without_pair"] == 5 * 2
    # requests carried the reply schema and a per-request seed
    bodies = [b for b in sent if b["response_format"]["json_schema"]["name"] == "ImagePrompt"]
    assert bodies and all(isinstance(b["seed"], int) for b in bodies)
    report = json.loads((tmp_path / "run" / "prompts" / "quality.json").read_text())
    assert report["rejects_by_reason"]["unsafe/timeout"] == 4
