"""A real `kill -9` of `sage stage train`, twice, then a rerun: the outputs of an uninterrupted run.

The stage runs as a separate process on the tiny SDXL (CPU). The first kill lands once the first
checkpoint is on disk, the second once the last one is (training done, evaluation and saving still
to come): before the metrics rows were checkpointed with the training state, the first case left
`metrics.parquet` with only the last invocation's steps and the second left none at all. The
resumed run's metrics rows (timings aside), adapter bytes, `eval.json` and grid must equal an
uninterrupted run's; the adapter file is byte-reproducible across processes (sorted safetensors
header).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sage_builder.config import config_from_dict, dump_config
from sage_builder.stages.train.synthetic import write_synthetic_label_stage
from sage_builder.store import RunDir

MAX_STEPS, EVERY = 8, 2


def _pipeline(tmp_path: Path, models_dir: Path) -> Path:
    section = {"model": str(models_dir / "tiny-sdxl"), "resolution": 64, "max_steps": MAX_STEPS, "batch_size": 2,
               "gradient_accumulation": 1, "optimizer": "adamw", "learning_rate": 1e-3, "warmup_steps": 2,
               "mixed_precision": "no", "device": "cpu", "cpu_threads": 1, "checkpoint_every": EVERY,
               "eval_noise_draws": 2, "grid": {"prompts": ["a street"], "steps": 3}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(dump_config(config_from_dict({"name": "kill", "llm": {"model": "x"}, "train": section})))
    return path


def _sage(pipeline: Path, run: Path) -> subprocess.Popen:
    env = {**os.environ, "SAGE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "sage_builder.cli", "stage", "train", "--config", str(pipeline),
                             "--run-dir", str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out.decode()[-3000:]


def _latest_checkpoint(run: Path) -> int:
    done = [int(p.name.removeprefix("step-")) for p in (run / "train" / "checkpoints").glob("step-*")
            if (p / "trainer.json").exists()]
    return max(done, default=0)


def _kill_at_checkpoint(proc: subprocess.Popen, run: Path, step: int) -> bool:
    """SIGKILL once the checkpoint of ``step`` is complete; False if the process ended first."""
    deadline = time.monotonic() + 600
    while _latest_checkpoint(run) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _metrics(run: Path) -> list[dict]:
    rows = pq.read_table(run / "train" / "metrics.parquet").to_pylist()
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in rows]


@pytest.mark.slow
def test_kill_9_twice_then_resume_gives_the_uninterrupted_run(tmp_path: Path, models_dir: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    write_synthetic_label_stage(RunDir(reference), n_train_pairs=3, n_val_pairs=1)
    shutil.copytree(reference, killed)  # the same dataset bytes, so the same fingerprints
    pipeline = _pipeline(tmp_path, models_dir)
    _finish(_sage(pipeline, reference))

    # Kill 1: mid-training, right after the first checkpoint.
    assert _kill_at_checkpoint(_sage(pipeline, killed), killed, EVERY), "finished before the first kill"
    assert not (killed / "train" / "manifest.json").exists()
    # Kill 2: the resumed run has trained to the end and checkpointed it, but not yet written outputs.
    second = _sage(pipeline, killed)
    if _kill_at_checkpoint(second, killed, MAX_STEPS):
        assert not (killed / "train" / "manifest.json").exists()
        _finish(_sage(pipeline, killed))
    else:  # it got through evaluation and saving before the poll saw the last checkpoint
        assert second.returncode == 0

    assert _metrics(killed) == _metrics(reference)
    assert [row["step"] for row in _metrics(killed)] == list(range(1, MAX_STEPS + 1))
    for name in ("adapter/adapter.safetensors", "eval.json", "grid.png"):
        assert (killed / "train" / name).read_bytes() == (reference / "train" / name).read_bytes(), name
    header = (reference / "train" / "adapter" / "adapter.safetensors").read_bytes()
    size = int.from_bytes(header[:8], "little")
    text = header[8:8 + size].decode().rstrip()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
