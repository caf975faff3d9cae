"""`sage plan`: LLM GPU-hours, disk per stage, a wall-clock target that training does not divide, and a
pilot whose models or resolution differ from the target refused."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.config import dump_config, load_config
from sage_builder.store import Manifest, RunDir, write_parquet

REPO = Path(__file__).resolve().parents[1]
FULL = REPO / "pipelines" / "sage-sdxl.yaml"
DEMO = REPO / "pipelines" / "demo.yaml"
runner = CliRunner()


def plan_json(*args: str) -> dict:
    result = runner.invoke(app, ["plan", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_full_config_counts_its_llm_calls_and_disk():
    data = plan_json("--config", str(FULL))
    stages = {s["stage"]: s for s in data["stages"]}
    calls = stages["profiles"]["llm_calls"] + stages["prompts"]["llm_calls"]
    config = load_config(FULL)
    expected = calls * config.llm.max_new_tokens / 2500.0
    llm = stages["profiles"]["llm_gpu_seconds"] + stages["prompts"]["llm_gpu_seconds"]
    assert llm == pytest.approx(expected, rel=1e-3)
    assert data["summary"]["llm_gpu_hours"] == round(llm / 3600, 2)
    assert data["summary"]["gpu_hours"] == round(sum(s["gpu_seconds"] or 0 for s in data["stages"]) / 3600, 2)
    # Render shards, and the pairs config's second copy of the same images.
    assert stages["render"]["disk_bytes"] == stages["label"]["disk_bytes"] > 1e9
    # A faster engine is cheaper, in proportion.
    faster = {s["stage"]: s for s in plan_json("--config", str(FULL), "--llm-tokens-per-s", "5000")["stages"]}
    assert faster["prompts"]["llm_gpu_seconds"] == pytest.approx(stages["prompts"]["llm_gpu_seconds"] / 2, rel=1e-3)


def test_the_cpu_demo_leaves_its_llm_to_a_pilot():
    stages = {s["stage"]: s for s in plan_json("--config", str(DEMO))["stages"]}
    assert stages["prompts"]["llm_gpu_seconds"] is None
    assert any("not estimated" in n for n in stages["prompts"]["notes"])


def test_target_hours_does_not_divide_training():
    data = plan_json("--config", str(FULL), "--target-hours", "24")
    rows = data["stages"]
    train = next(r for r in rows if r["stage"] == "train")
    assert train["scales_with_gpus"] is False
    shared = sum(r["gpu_seconds"] or 0 for r in rows) - train["gpu_seconds"]
    assert data["summary"]["gpus_for_target"] == math.ceil(shared / (24 * 3600 - train["gpu_seconds"]))
    short = plan_json("--config", str(FULL), "--target-hours", "2")["summary"]
    assert short["gpus_for_target"] is None and "cannot be met" in short["target"]


@pytest.mark.parametrize("hours", ["0", "-3"])
def test_target_hours_must_be_positive(hours):
    result = runner.invoke(app, ["plan", "--config", str(FULL), "--target-hours", hours])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "> 0" in result.stderr


def _cpu_pilot(root: Path) -> Path:
    """A finished demo-config render on CPU: 10 images in 20 s, shards of 2 KB per image."""
    run = RunDir(root)
    run.root.mkdir(parents=True)
    (run.root / "config.yaml").write_text(dump_config(load_config(DEMO)))
    import pyarrow as pa

    stage = run.stage("render")
    write_parquet(pa.table({"image": [os.urandom(2000) for _ in range(10)]}), stage.file("shards/images-00000.parquet"))
    outputs = stage.describe_outputs(["shards/images-00000.parquet"])
    stage.write_manifest(Manifest(stage="render", fingerprint="f", config_hash="c", outputs=outputs,
                                  rows={"shards/images-00000.parquet": 10},
                                  stats={"rendered_now": 10, "render_seconds": 20.0, "workers": 1, "device": "cpu"}))
    return run.root


def test_a_pilot_with_other_models_or_resolution_is_refused(tmp_path):
    pilot = _cpu_pilot(tmp_path / "pilot")
    result = runner.invoke(app, ["plan", "--config", str(FULL), "--measured", str(pilot)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    line = result.stderr
    assert "render.height 64 (pilot) vs 1024" in line and "render.steps 2 (pilot) vs 30" in line
    assert "measured on cpu" in line and "--allow-pilot-mismatch" in line
    forced = runner.invoke(app, ["plan", "--json", "--config", str(FULL), "--measured", str(pilot),
                                 "--allow-pilot-mismatch"])
    assert forced.exit_code == 0, forced.output
    data = json.loads(forced.stdout)
    assert any("render.height" in w for w in data["summary"]["warnings"])
    render = next(s for s in data["stages"] if s["stage"] == "render")
    assert render["cpu_seconds"] == pytest.approx(render["items"] * 2.0)
    # The pilot's own config measures itself without complaint, and its shards give bytes per pixel.
    same = plan_json("--config", str(DEMO), "--measured", str(pilot))
    render = next(s for s in same["stages"] if s["stage"] == "render")
    shard = (pilot / "render" / "shards" / "images-00000.parquet").stat().st_size
    assert same["summary"]["warnings"] == [] and render["disk_bytes"] == pytest.approx(render["items"] * shard / 10, abs=1)


def test_eval_pilot_measures_seconds_per_image_of_the_whole_stage(tmp_path):
    """Render x workers per image rendered now, plus scoring/judge/FID seconds per image scored."""
    pilot = _cpu_pilot(tmp_path / "pilot")
    stage = RunDir(pilot).stage("eval")
    stage.path.mkdir(parents=True)
    stage.write_manifest(Manifest(stage="eval", fingerprint="f", config_hash="c", outputs={}, rows={},
                                  stats={"rendered_now": 8, "images": 10, "workers": 2, "render_device": "cpu",
                                         "phase_seconds": {"render": 12.0, "scores": 3.0, "fid_clip": 2.0}}))
    data = plan_json("--config", str(DEMO), "--measured", str(pilot))
    row = next(s for s in data["stages"] if s["stage"] == "eval")
    per_image = 12.0 * 2 / 8 + (3.0 + 2.0) / 10
    assert row["cpu_seconds"] == pytest.approx(row["items"] * per_image, abs=0.1) and row["gpu_seconds"] is None
    assert any("CPU-s per image measured in" in note and "8 images rendered" in note for note in row["notes"])
