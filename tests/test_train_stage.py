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


ADAPTER_FILES = {"adapter/adapter.safetensors", "adapter/adapter_config.json", "adapter/README.md",
                 "adapter/sage_user_adapter.py"}


def _no_local_paths(text: str, *roots: Path) -> None:
    for root in roots:
        assert str(root) not in text, f"{root} leaked"
    assert "/work/" not in text and "/home/" not in text and "/tmp/" not in text


@pytest.mark.slow
def test_stage_trains_saves_evaluates_and_renders_the_grid(tmp_path, models_dir, monkeypatch):
    run = _run_with_label(tmp_path)
    manifest = run_stage(get_stage("train"), _config(models_dir), run)
    stage_dir = run.stage("train")
    assert set(manifest.outputs) == ADAPTER_FILES | {"metrics.parquet", "eval.json", "grid.png"}
    adapter_dir = stage_dir.file("adapter")
    raw_config = (adapter_dir / "adapter_config.json").read_text()
    _no_local_paths(raw_config, tmp_path, models_dir)
    adapter_config = json.loads(raw_config)
    assert adapter_config["n_tokens"] == 4 and adapter_config["training"]["steps"] == 2
    assert adapter_config["uncond_user_input"].startswith("same user tokens")
    assert adapter_config["base_model"] == "tiny-sdxl"
    assert adapter_config["base_model_identity"].startswith("local-model:")
    assert (adapter_config["dataset"], adapter_config["dataset_base"]) == ("label/dataset", "run")
    card = (adapter_dir / "README.md").read_text()
    _no_local_paths(card, tmp_path, models_dir)
    for needle in ("Content warning", "tiny-sdxl", "User tokens: 4", "## Data lineage", "load_user_adapter",
                   "sage generate --adapter"):
        assert needle in card
    for name in ADAPTER_FILES | {"metrics.parquet", "eval.json", "grid.png"}:  # the umask's mode, not 0600
        assert (stage_dir.path / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name
    for path in stage_dir.file("checkpoints").rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o666 & ~_umask(), path

    evaluation = json.loads(stage_dir.file("eval.json").read_text())
    assert evaluation["records"] == 4 and 0.0 <= evaluation["implicit_accuracy"] <= 1.0
    assert evaluation["chance_level"] == 0.5 and evaluation["split"] == "validation"
    assert set(evaluation["by_reason"]) == {"banned", "allowed"} and set(evaluation["by_category"]) == {"Violence"}
    assert sum(v["records"] for v in evaluation["by_reason"].values()) == 4
    assert manifest.stats["steps"] == 2 and manifest.rows["metrics.parquet"] == 2
    from PIL import Image

    # rows: the 2 prompts; columns: the base model, levels 0 and 5 (cells scaled up to 192 px)
    width, height = Image.open(stage_dir.file("grid.png")).size
    assert width == 220 + 8 + 3 * (192 + 8) and height > 2 * (192 + 8)
    again = run_stage(get_stage("train"), _config(models_dir), run)  # up to date: skipped
    assert again.finished_at == manifest.finished_at

    from sage_builder.cli import app

    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["generate", "--adapter", str(adapter_dir), "--grid", "--threads", "1",
                                      "--prompt", "a street", "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] == 220 + 8 + 3 * (192 + 8)
    result = CliRunner().invoke(app, ["generate", "--adapter", str(adapter_dir), "--user", "0000009",
                                      "--prompt", "a street", "--device", "cpu", "--out", str(out)])
    assert result.exit_code != 0 and "user 0000009 has no embedding" in result.output

    # The adapter folder alone, copied elsewhere and used from another working directory.
    import shutil

    elsewhere = tmp_path / "elsewhere" / "my-adapter"
    shutil.copytree(adapter_dir, elsewhere)
    monkeypatch.chdir(tmp_path / "elsewhere")
    single = tmp_path / "single.png"
    base_args = ["generate", "--adapter", "my-adapter", "--level", "5", "--prompt", "a street", "--steps", "2",
                 "--device", "cpu", "--out", str(single)]
    result = CliRunner().invoke(app, base_args)
    assert result.exit_code == 2 and "copied out of its run" in result.output and "pass --dataset" in result.output, \
        result.output
    result = CliRunner().invoke(app, base_args + ["--dataset", str(run.stage("label").file("dataset"))])
    assert result.exit_code == 2 and "pass --model" in result.output and "tiny-sdxl" in result.output, result.output
    result = CliRunner().invoke(app, base_args + ["--dataset", str(run.stage("label").file("dataset")),
                                                  "--model", str(models_dir / "tiny-sdxl")])
    assert result.exit_code == 0, result.output
    assert Image.open(single).size == (64, 64)

    # The whole run copied elsewhere: dataset and base model resolve through the run, from any cwd.
    moved = tmp_path / "moved-run"
    shutil.copytree(run.root, moved)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["generate", "--adapter", str(moved / "train" / "adapter"), "--level", "0",
                                      "--prompt", "a street", "--steps", "2", "--device", "cpu", "--out",
                                      str(tmp_path / "moved.png")])
    assert result.exit_code == 0, result.output


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("args, message", [
    ([], "choose who to render for"),
    (["--level", "7"], "--level 7: levels are 0-5"),
    (["--level", "1", "--steps", "0"], "--steps 0"),
    (["--level", "1", "--resolution", "30"], "--resolution 30"),
    (["--level", "1", "--threads", "0"], "--threads 0"),
    (["--level", "1", "--out", "x.txt"], "--out x.txt"),
    (["--profile", "nope.json"], "--profile nope.json: no such file"),
])
def test_generate_checks_its_arguments_before_loading_anything(tmp_path, args, message, monkeypatch):
    from sage_builder.cli import app
    from sage_builder.stages.train import trainer

    monkeypatch.setattr(trainer, "load_base_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["generate", "--adapter", str(tmp_path / "none"), "--prompt", "p", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_generate_names_a_missing_adapter_folder(tmp_path):
    from sage_builder.cli import app

    result = CliRunner().invoke(app, ["generate", "--adapter", str(tmp_path / "none"), "--prompt", "p", "--level", "1"])
    assert result.exit_code == 2 and "not a user adapter folder" in result.output


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
