"""CLI consistency: the same options everywhere, hints that can be typed as shown, typos caught early."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from pydantic import BaseModel
from typer.testing import CliRunner

from sage_builder import __version__
from sage_builder.cli import app
from sage_builder.config import PipelineConfig, load_config
from sage_builder.store import RunDir

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pipelines" / "demo.yaml"
runner = CliRunner()


def _commands(command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, sub in getattr(command, "commands", {}).items():
        paths += _commands(sub, prefix + (name,))
    return paths


@pytest.mark.parametrize("path", _commands(typer.main.get_command(app)), ids=lambda p: " ".join(p) or "sage")
def test_help_has_no_type_placeholders_for_flags(path):
    result = runner.invoke(app, [*path, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.stdout and "╭" not in result.stdout


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"sage-builder {__version__}"


def test_status_takes_run_dir_like_the_other_commands(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    by_option = runner.invoke(app, ["status", "--json", "--run-dir", str(run)])
    by_position = runner.invoke(app, ["status", "--json", str(run)])
    assert by_option.exit_code == 0 and by_option.stdout == by_position.stdout
    both = runner.invoke(app, ["status", str(run), "--run-dir", str(tmp_path / "other")])
    assert both.exit_code == 2 and "give one" in both.stderr


def test_hints_name_the_config_the_run_used(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    assert run.stage_command("label") == f"sage stage label --config PIPELINE.yaml --run-dir {run.root}"
    (run.root / "config.yaml").write_text("name: x\n")
    with pytest.raises(Exception, match=r"run `sage stage profiles --config .*config.yaml --run-dir "):
        run.manifest_of("profiles", needed_by="prompts")


def test_a_set_typo_says_did_you_mean_and_is_not_blamed_on_the_yaml():
    result = runner.invoke(app, ["plan", "--config", str(DEMO), "--set", "profiles.n_user=3"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: --set profiles.n_user: ")
    assert "did you mean 'n_users'" in line and str(DEMO) not in line
    with pytest.raises(Exception, match="no key 'rendr' in the top level; did you mean 'render'"):
        load_config(DEMO, ["rendr.steps=2"])
    # Below a free-form value the schema does not judge; a good key still works.
    assert load_config(DEMO, ["profiles.n_users=3"]).profiles.n_users == 3


def test_an_unknown_yaml_key_says_did_you_mean(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(DEMO.read_text().replace("  steps: 2\n  guidance: 5.0\n  height: 64", "  stepz: 2\n"
                                                                                           "  guidance: 5.0\n"
                                                                                           "  height: 64", 1))
    with pytest.raises(Exception, match=r"render.stepz: unknown key \(no key 'stepz' in render; did you mean "
                                        r"'steps'"):
        load_config(bad)


def _undescribed(model: type[BaseModel], prefix: str = "") -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        if not field.description:
            missing.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            missing += _undescribed(field.annotation, prefix + name + ".")
    return missing


def test_every_config_key_has_a_description():
    """`sage config-schema` is the reference of every key: each one says what it does."""
    assert _undescribed(PipelineConfig) == []
