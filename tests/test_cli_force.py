"""`--force` means recompute (train: no resume from a checkpoint), a refused resume writes nothing, and
`sage run --force` does not drop several stages' caches without `--yes`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.config import dump_config
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.store import Manifest
from sage_builder.testing.fake_run import make_fake_run

runner = CliRunner()


@pytest.fixture()
def labelled(tmp_path):
    run, config = make_fake_run(tmp_path / "run", n_users=20)
    run_stage(get_stage("label"), config, run)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(dump_config(config))
    return run, config, pipeline


def _old_checkpoint(run) -> Path:
    checkpoint = run.stage("train").file("checkpoints/step-00000002")
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer.json").write_text(json.dumps({"fingerprint": "made-with-another-config"}))
    train = run.stage("train")
    train.write_manifest(Manifest(stage="train", fingerprint="old", config_hash="old", finished_at=time.time()))
    return checkpoint


def test_a_refused_resume_writes_nothing(labelled):
    run, _, pipeline = labelled
    checkpoint = _old_checkpoint(run)
    manifest = run.stage("train").manifest_path.read_bytes()
    result = runner.invoke(app, ["stage", "train", "--config", str(pipeline), "--run-dir", str(run.root)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "checkpoint made with another train config" in result.stderr and "--force" in result.stderr
    assert not (run.root / "config.yaml").exists()  # not overwritten (nor written)
    assert run.stage("train").manifest_path.read_bytes() == manifest and checkpoint.exists()


def test_force_on_train_starts_over_instead_of_resuming(labelled):
    run, config, _ = labelled
    checkpoint = _old_checkpoint(run)
    assert "checkpoints" in get_stage("train").resume_state
    with pytest.raises(Exception):  # the hub model is not there offline: training itself cannot start
        run_stage(get_stage("train"), config, run, force=True)
    assert not checkpoint.exists()


def test_run_force_over_several_caches_needs_yes(labelled):
    run, _, pipeline = labelled
    for stage in ("profiles", "prompts"):
        run.stage(stage).items("items").write([{"item_key": "a", "x": 1}])
    before = sorted(str(p) for p in run.root.rglob("*"))
    result = runner.invoke(app, ["run", "--force", "--config", str(pipeline), "--run-dir", str(run.root)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "--yes" in result.stderr and "profiles" in result.stderr and "prompts" in result.stderr
    assert sorted(str(p) for p in run.root.rglob("*")) == before
