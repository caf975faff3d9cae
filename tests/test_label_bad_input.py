"""Stage 4 rejects bad input with one line naming the file (and row), and writes nothing."""

from __future__ import annotations

import shutil

import pytest

from sage_builder.errors import StageInputError
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.testing.fake_run import make_fake_run


def _fails(run, config) -> str:
    with pytest.raises(StageInputError) as err:
        run_stage(get_stage("label"), config, run)
    message = str(err.value)
    assert "\n" not in message
    assert not run.stage("label").path.exists(), "nothing may be written on bad input"
    return message


def test_run_without_stage_3(tmp_path):
    run, config = make_fake_run(tmp_path / "run", n_users=8, pairs_per_category=1)
    run.stage("render").manifest_path.unlink()
    message = _fails(run, config)
    assert "render/manifest.json" in message and "sage stage render --config " in message
    assert f"--run-dir {run.root}" in message  # a hint typed as shown reruns this run, with its config


def test_render_index_missing(tmp_path):
    run, config = make_fake_run(tmp_path / "run", n_users=8, pairs_per_category=1)
    run.stage("render").file("index.parquet").unlink()
    assert "render/index.parquet: missing" in _fails(run, config)


def test_profiles_from_another_run(tmp_path):
    run, config = make_fake_run(tmp_path / "run", n_users=8, pairs_per_category=1)
    other, _ = make_fake_run(tmp_path / "other", n_users=8, pairs_per_category=1, seed=1)
    shutil.copy(other.stage("profiles").file("profiles.parquet"), run.stage("profiles").file("profiles.parquet"))
    message = _fails(run, config)
    assert "profiles/profiles.parquet" in message and "another run" in message


def test_prompts_manifest_from_another_run(tmp_path):
    run, config = make_fake_run(tmp_path / "run", n_users=8, pairs_per_category=1)
    other, _ = make_fake_run(tmp_path / "other", n_users=8, pairs_per_category=1, categories=["Hate", "Violence"])
    shutil.rmtree(run.stage("prompts").path)
    shutil.copytree(other.stage("prompts").path, run.stage("prompts").path)
    message = _fails(run, config)
    assert "prompts/manifest.json" in message and "render/manifest.json" in message


def test_k_larger_than_pairs_available(tmp_path):
    run, config = make_fake_run(tmp_path / "run", n_users=8, concepts_per_category=2, pairs_per_category=3)
    message = _fails(run, config)
    assert "prompts/pairs.parquet rows" in message and "label.pairs_per_category=3" in message
    assert "category 'Hate' has 2 concept(s) with rendered pairs at idx 1-3 (for train)" in message


def test_profile_row_with_unknown_category(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run, config = make_fake_run(tmp_path / "run", n_users=8, pairs_per_category=1)
    path = run.stage("profiles").file("profiles.parquet")
    table = pq.read_table(path)
    banned = table.column("banned").to_pylist()
    banned[3] = ["Illegal Activity"]
    table = table.set_column(table.schema.get_field_index("banned"), "banned", pa.array(banned, pa.list_(pa.string())))
    pq.write_table(table, path)
    manifest = run.stage("profiles").read_manifest()
    manifest.outputs.update(run.stage("profiles").describe_outputs(["profiles.parquet"]))  # consistent but wrong
    run.stage("profiles").write_manifest(manifest)
    with pytest.raises(StageInputError, match=r"profiles.parquet row 3 \(user 0000004\): banned category "
                                              r"'Illegal Activity'"):
        run_stage(get_stage("label"), config, run)
    assert not run.stage("label").file("dataset").exists()
    assert not run.stage("label").file("dataset.tmp").exists()


def test_cli_prints_one_line(tmp_path):
    from typer.testing import CliRunner

    from sage_builder.cli import app

    run, config = make_fake_run(tmp_path / "run", n_users=8, pairs_per_category=1)
    run.stage("render").manifest_path.unlink()
    yaml_path = tmp_path / "p.yaml"
    import yaml

    yaml_path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude={"source"})))
    result = CliRunner().invoke(app, ["stage", "label", "-c", str(yaml_path), "-r", str(run.root)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "render/manifest.json" in lines[-1]
