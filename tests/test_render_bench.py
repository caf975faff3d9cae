"""The GPU render bench's CPU path (--tiny --device cpu): one row per lever, pixel checks, JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_render_bench_runs_its_cpu_rows_on_the_tiny_model(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu/bench_render_gpu.py", "--tiny", "--device", "cpu",
                           "--batch", "2", "--rows", "eager,fuse_qkv,sdpa-math", "--budget-s", "900"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("| row | batch |") == 1
    result = json.loads((tmp_path / "render_gpu.json").read_text())
    assert result["complete"] and not result["skipped"]
    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == ["eager", "fuse_qkv", "sdpa-math"]
    for row in rows.values():
        assert row["batch"] == 2 and row["images"] == 2
        assert row["plain_img_s"] > 0 and row["stage_img_s"] > 0 and row["ratio"] > 0 and row["jpeg_kib_per_img"] > 0
        assert row["plain_warmup_s"] >= 0 and row["stage_warmup_s"] >= 0
    # The first row is the reference: identical to itself; the levers stay within float rounding.
    assert rows["eager"]["plain_max_abs"] == 0 and rows["eager"]["stage_max_abs"] == 0
    assert rows["fuse_qkv"]["levers"]["fuse_qkv"] and rows["sdpa-math"]["levers"]["sdpa_backend"] == "math"
    for name in ("fuse_qkv", "sdpa-math"):
        assert rows[name]["plain_max_abs"] <= 2 and rows[name]["plain_psnr_db"] > 40
