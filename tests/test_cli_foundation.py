"""The CLI contracts scripts and CI rely on: `sage status --json`, `sage plan`, `--help` everywhere."""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pytest
import typer
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.stages import STAGE_ORDER
from sage_builder.store import Manifest, RunDir, write_parquet

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def fake_done_stage(run: RunDir, stage: str, inputs: dict[str, str] | None = None) -> Manifest:
    stage_dir = run.stage(stage)
    write_parquet(pa.table({"user_id": ["0000001", "0000002", "0000003"]}), stage_dir.file(f"{stage}.parquet"))
    now = time.time()
    manifest = Manifest(stage=stage, fingerprint="f" * 64, config_hash="c" * 64, inputs=inputs or {},
                        outputs=stage_dir.describe_outputs([f"{stage}.parquet"]), rows={f"{stage}.parquet": 3},
                        started_at=now - 2, finished_at=now, seconds=2.0, stats={"n_users": 3})
    stage_dir.write_manifest(manifest)
    return manifest


def status_json(run_dir: Path) -> dict:
    result = runner.invoke(app, ["status", "--json", str(run_dir)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_status_json_contract(tmp_path):
    run = RunDir(tmp_path / "run")
    profiles = fake_done_stage(run, "profiles")
    # prompts: interrupted, finished items but no manifest yet
    run.stage("prompts").items("pairs").write([{"item_key": "a", "x": 1}])
    # render: done against an older profiles output -> stale
    fake_done_stage(run, "render", inputs={"profiles": "0" * 64})

    data = status_json(run.root)
    assert data["run_dir"] == str(run.root.resolve())
    stages = {s["name"]: s for s in data["stages"]}
    assert list(stages) == STAGE_ORDER[:6] + STAGE_ORDER[6:] and STAGE_ORDER[:6] == [
        "profiles", "prompts", "render", "label", "publish", "train"]
    assert [s["number"] for s in data["stages"]] == list(range(1, len(STAGE_ORDER) + 1))
    done = stages["profiles"]
    assert done["state"] == "done" and done["rows"] == {"profiles.parquet": 3}
    assert done["outputs"] == [str(run.stage("profiles").file("profiles.parquet"))]
    assert done["manifest_hash"] == profiles.content_hash()
    assert done["report"] == {"n_users": 3} and done["seconds"] == 2.0
    assert stages["prompts"]["state"] == "partial" and stages["prompts"]["manifest_hash"] is None
    assert stages["render"]["state"] == "stale" and "profiles" in stages["render"]["reason"]
    assert {stages[s]["state"] for s in STAGE_ORDER[3:]} == {"missing"}

    # A deleted output turns a done stage into partial.
    run.stage("profiles").file("profiles.parquet").unlink()
    assert {s["name"]: s["state"] for s in status_json(run.root)["stages"]}["profiles"] == "partial"


def test_status_of_missing_run_dir_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["status", "--json", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "no such run directory" in result.stderr


def test_plan_runs_on_the_demo():
    result = runner.invoke(app, ["plan", "--config", str(REPO / "pipelines" / "demo.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["stage"] for s in data["stages"]] == STAGE_ORDER
    assert "gpu_hours" in data["summary"]


def _command_paths(command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    if hasattr(command, "commands"):  # a group (typer vendors its own click classes)
        for name, sub in command.commands.items():
            paths += _command_paths(sub, prefix + (name,))
    return paths


COMMANDS = _command_paths(typer.main.get_command(app))


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "sage")
def test_help_for_every_command(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_core_commands_exist():
    names = {p[0] for p in COMMANDS if p}
    assert {"run", "stage", "status", "plan", "models"} <= names


def test_stage_knowledge_lives_in_the_stages():
    """Numbers come from STAGE_ORDER, LLM stages say so themselves, options are typed per stage."""
    from sage_builder.stages import STAGE_ORDER, all_stages

    stages = all_stages()
    assert [s.number for s in stages] == list(range(1, len(STAGE_ORDER) + 1))
    assert all("number" not in type(s).__dict__ for s in stages)
    assert [s.name for s in stages if s.uses_llm] == ["profiles", "prompts"]
    assert {s.name: sorted(f.name for f in fields(s.options_type)) for s in stages if fields(s.options_type)} == {
        "prompts": ["llm_backend"], "render": ["contact_sheet"]}


def test_an_option_a_stage_does_not_take_is_one_line_and_writes_nothing(tmp_path):
    config = REPO / "pipelines" / "demo.yaml"
    result = runner.invoke(app, ["stage", "label", "--config", str(config), "--run-dir", str(tmp_path / "run"),
                                 "--contact-sheet", "2"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: stage 'label' has no option 'contact_sheet' (its options: none)"]
    assert not (tmp_path / "run").exists()
