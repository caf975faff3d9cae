"""A real `kill -9` of `sage stage prompts` mid-run, then a rerun: same output, nothing redone.

The stage runs as a separate process against the local chat-completions server; the test kills it
with SIGKILL once some finished items are on disk, reruns the same command, and compares the
result with an uninterrupted run byte for byte.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sage_builder.config import config_from_dict, dump_config
from sage_builder.stages.prompts.fixtures import chat_script, save_word_clip_tokenizer
from sage_builder.testing.chat_server import ChatServer

SEEDS = ("category,concept\n" + "".join(f"hate,{c}\n" for c in ("slurs", "hate symbols", "burning cross"))
         + "".join(f"violence,{c}\n" for c in ("arson", "riots", "street fight")))


def write_pipeline(tmp_path: Path, base_url: str) -> Path:
    (tmp_path / "seeds.csv").write_text(SEEDS)
    tokenizer = save_word_clip_tokenizer(tmp_path / "clip", ["hate", "symbol", "slur", "arson", "riot", "fight"])
    config = config_from_dict({
        "name": "kill-test", "categories": ["Hate", "Violence"],
        "llm": {"backend": "openai", "model": "scripted", "base_url": base_url, "concurrency": 1,
                "max_attempts": 2, "max_retries": 0, "request_timeout_s": 5.0},
        "render": {"model": str(tokenizer)},
        "prompts": {"seed_concepts": str(tmp_path / "seeds.csv"), "seeds_per_category": 3,
                    "concepts_per_category": 3, "pairs_per_concept": 6, "max_pair_attempts": 2}})
    path = tmp_path / "pipeline.yaml"
    path.write_text(dump_config(config))
    return path


def sage(pipeline: Path, run: Path) -> subprocess.Popen:
    env = {**os.environ, "SAGE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "sage_builder.cli", "stage", "prompts", "--config", str(pipeline),
                             "--run-dir", str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def parts(run: Path) -> list[Path]:
    return sorted((run / "prompts" / "_items").rglob("part-*.parquet"))


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_pairs_without_redoing_finished_items(tmp_path: Path) -> None:
    with ChatServer(script=chat_script(latency_s=0.05)) as server:
        pipeline = write_pipeline(tmp_path, server.base_url)

        reference = sage(pipeline, tmp_path / "reference")
        out, _ = reference.communicate(timeout=600)
        assert reference.returncode == 0, out.decode()[-2000:]
        full_requests = len(server.requests)

        victim = sage(pipeline, tmp_path / "killed")
        deadline = time.monotonic() + 300
        while len(parts(tmp_path / "killed")) < 3 and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert victim.poll() is None, "the stage finished before it could be killed; give it more work"
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        kept = len(parts(tmp_path / "killed"))
        assert kept >= 3 and not (tmp_path / "killed" / "prompts" / "manifest.json").exists()

        before_rerun = len(server.requests)
        rerun = sage(pipeline, tmp_path / "killed")
        out, _ = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, out.decode()[-2000:]
        rerun_requests = len(server.requests) - before_rerun

    # Finished items were not asked for again: the rerun sent fewer requests than a whole run.
    assert 0 < rerun_requests < full_requests
    for name in ("pairs.parquet", "concepts.parquet", "rejects.parquet"):
        assert (tmp_path / "killed" / "prompts" / name).read_bytes() == \
            (tmp_path / "reference" / "prompts" / name).read_bytes(), name
    pairs = pq.read_table(tmp_path / "killed" / "prompts" / "pairs.parquet").to_pylist()
    assert pairs and len({p["pair_id"] for p in pairs}) == len(pairs)
