"""`sage status` as a summary: 80 columns, rows per config/split, a dry-run state, staleness that is
carried downstream and names the keys that changed; --json keeps the detail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.config import config_from_dict, dump_config
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.testing.fake_run import make_fake_run

runner = CliRunner()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("status") / "run"
    run, config = make_fake_run(root, n_users=20)
    run_stage(get_stage("label"), config, run)
    run_stage(get_stage("publish"), config, run)  # no publish.repo_id: a dry run
    pipeline = root.parent / "pipeline.yaml"
    pipeline.write_text(dump_config(config))
    return root, pipeline


def status(root: Path, *args: str) -> str:
    result = runner.invoke(app, ["status", "--run-dir", str(root), *args], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.stdout


def states(root: Path, *args: str) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(status(root, "--json", *args))["stages"]}


def test_fits_80_columns_with_rows_per_config_and_split(labelled):
    root, pipeline = labelled
    text = status(root)
    assert max(len(line) for line in text.splitlines()[1:]) <= 80  # the first names the run dir
    assert "…" not in text and "train-00000-of-00001" not in text
    label = text[text.index(" 4 label"):text.index(" 5 publish")]
    for group in ("preferences/train", "pairs/train", "users/train"):
        assert group in label
    # The report is readable phrases, not a JSON dump.
    assert "{" not in text and "records: train=" in label


def test_a_dry_run_publish_is_not_done(labelled):
    root, pipeline = labelled
    rows = states(root)  # the fake stages 1-3 have no config.yaml: judged by their manifests only
    assert rows["label"]["state"] == "done"
    assert rows["publish"]["state"] == "dry-run" and "nothing was pushed" in rows["publish"]["reason"]
    assert rows["publish"]["report"]["dry_run"] is True  # --json keeps the detail


def test_staleness_names_the_key_and_is_carried_downstream(labelled, tmp_path):
    root, pipeline = labelled
    changed = tmp_path / "changed.yaml"
    data = json.loads(json.dumps(__import__("yaml").safe_load(pipeline.read_text())))
    data["label"]["pairs_per_category"] = 1
    changed.write_text(dump_config(config_from_dict(data)))
    rows = states(root, "--config", str(changed))
    assert rows["label"]["state"] == "stale"
    assert "label.pairs_per_category 2 -> 1" in rows["label"]["reason"]
    assert rows["publish"]["state"] == "stale" and "'label' is stale" in rows["publish"]["reason"]
