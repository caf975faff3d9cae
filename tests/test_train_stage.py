"""Stage 6 end to end on a synthetic stage-4 dataset, then `sage generate` with the adapter it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sage_builder.config import config_from_dict
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.stages.train.synthetic import write_synthetic_label_stage
from sage_builder.store import RunDir


def _run_with_label(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    write_synthetic_label_stage(run, n_train_pairs=3, n_val_pairs=2)
    return run


def _config(models_dir: Path, **train):
    section = {"model": str(models_dir / "tiny-sdxl"), "resolution": 64, "max_steps": 2, "batch_size": 2,
               "gradient_accumulation": 1, "optimizer": "adamw", "learning_rate": 1e-3, "warmup_steps": 0,
               "mixed_precision": "no", "device": "cpu", "eval_noise_draws": 1,
               "grid": {"prompts": ["a street", "a soldier"], "steps": 2}}
    section.update(train)
    return config_from_dict({"name": "t", "llm": {"model": "x"}, "train": section})


@pytest.mark.slow
def test_stage_trains_saves_evaluates_and_renders_the_grid(tmp_path, models_dir):
    run = _run_with_label(tmp_path)
    manifest = run_stage(get_stage("train"), _config(models_dir), run)
    stage_dir = run.stage("train")
    assert set(manifest.outputs) == {"adapter/adapter.safetensors", "adapter/adapter_config.json", "metrics.parquet",
                                     "eval.json", "grid.png"}
    adapter_config = json.loads(stage_dir.file("adapter/adapter_config.json").read_text())
    assert adapter_config["n_tokens"] == 4 and adapter_config["training"]["steps"] == 2
    assert adapter_config["uncond_user_input"].startswith("same user tokens")
    evaluation = json.loads(stage_dir.file("eval.json").read_text())
    assert evaluation["records"] == 4 and 0.0 <= evaluation["implicit_accuracy"] <= 1.0
    assert manifest.stats["steps"] == 2 and manifest.rows["metrics.parquet"] == 2
    from PIL import Image

    assert Image.open(stage_dir.file("grid.png")).size == (120 + 2 * 64, 28 + 2 * 64)  # levels 0 and 5
    again = run_stage(get_stage("train"), _config(models_dir), run)  # up to date: skipped
    assert again.finished_at == manifest.finished_at

    from sage_builder.cli import app

    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["generate", "--adapter", str(stage_dir.file("adapter")), "--grid",
                                      "--prompt", "a street", "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (120 + 64, 28 + 2 * 64)
    result = CliRunner().invoke(app, ["generate", "--adapter", str(stage_dir.file("adapter")), "--user", "0000009",
                                      "--prompt", "a street", "--device", "cpu", "--out", str(out)])
    assert result.exit_code != 0 and "user 0000009 has no embedding" in result.output


def test_missing_embedding_stops_the_stage_naming_the_user(tmp_path, models_dir):
    run = RunDir(tmp_path / "run")
    write_synthetic_label_stage(run, n_train_pairs=2, n_val_pairs=1, users_without_embedding=("0000002",))
    from sage_builder.errors import StageInputError

    with pytest.raises(StageInputError, match="user 0000002 has no embedding"):
        run_stage(get_stage("train"), _config(models_dir), run)
    assert run.stage("train").read_manifest() is None


@pytest.mark.slow
def test_trains_on_what_stage_4_writes(tmp_path, models_dir):
    """The data contract with the real label stage (fake stages 1-3 upstream, 16 px images)."""
    from sage_builder.testing.fake_run import make_fake_run

    run, config = make_fake_run(tmp_path / "run", n_users=12, pairs_per_category=1)
    run_stage(get_stage("label"), config, run)
    train = _config(models_dir, resolution=16, max_steps=1, eval_records=4,
                    grid={"prompts": ["a street"], "steps": 1}).train
    config = config.model_copy(update={"train": train})
    manifest = run_stage(get_stage("train"), config, run)
    assert manifest.stats["steps"] == 1 and manifest.stats["records"] > 0
    assert run.stage("train").file("adapter/adapter.safetensors").exists()
