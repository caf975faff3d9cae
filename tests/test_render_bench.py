"""The GPU render benchmark's CPU path (--tiny --device cpu): it runs, prints one table, writes JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_render_bench_runs_tiny_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu/bench_render_gpu.py", "--tiny", "--device", "cpu",
                           "--batches", "2", "--batches-per-case", "1", "--budget-s", "900"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("| mode | batch |") == 1
    result = json.loads((tmp_path / "render_gpu.json").read_text())
    (row,) = result["rows"]
    assert row["mode"] == "eager" and row["batch"] == 2 and row["images"] == 2
    assert row["plain_img_s"] > 0 and row["stage_img_s"] > 0 and row["ratio"] > 0
    assert row["jpeg_kib_per_img"] > 0
