"""Pipeline configuration: strict keys, clear errors, overrides, hashes, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_builder.config import hashable_dump, load_config
from sage_builder.errors import ConfigError
from sage_builder.store import stable_hash

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """\
name: t
llm:
  model: ./models/llm
  temperature: 0.5
profiles:
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sub" / "pipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, MINIMAL.replace("temperature: 0.5", "temprature: 0.5"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "llm.temprature" in message and "unknown key" in message
    assert "\n" not in message


def test_bad_value_names_key_and_reason(tmp_path):
    path = write(tmp_path, MINIMAL.replace("temperature: 0.5", "temperature: 7"))
    with pytest.raises(ConfigError, match=r"pipe\.yaml: llm\.temperature: .*less than or equal to 2"):
        load_config(path)


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such pipeline file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed"))


def test_set_overrides(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = load_config(path, ["llm.temperature=0.9", "llm.backend=openai", "seed=7"])
    assert config.llm.temperature == 0.9 and config.llm.backend == "openai" and config.seed == 7
    # A bare `profiles:` section (None in YAML) still takes overrides.
    assert load_config(path, ["profiles.n_users=5"]).profiles.n_users == 5
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["llm.temperature"])
    with pytest.raises(ConfigError, match="llm.nope"):
        load_config(path, ["llm.nope=1"])


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.llm.model == str((tmp_path / "sub" / "models" / "llm").resolve())
    hub = load_config(write(tmp_path, MINIMAL.replace("./models/llm", "Qwen/Qwen2.5-7B-Instruct")))
    assert hub.llm.model == "Qwen/Qwen2.5-7B-Instruct"  # a hub id stays a hub id


def test_execution_fields_stay_out_of_hashes(tmp_path):
    path = write(tmp_path, MINIMAL)
    base = load_config(path)
    faster = load_config(path, ["llm.batch_size=64", "llm.concurrency=128", "llm.request_timeout_s=5"])
    assert "batch_size" not in hashable_dump(base.llm) and "executor" not in hashable_dump(base)
    assert stable_hash(base) == stable_hash(faster)
    assert stable_hash(base) != stable_hash(load_config(path, ["llm.seed=1"]))


@pytest.mark.parametrize("name", ["demo.yaml", "sage-sdxl.yaml"])
def test_shipped_pipelines_load(name):
    config = load_config(REPO / "pipelines" / name)
    assert config.name and config.llm.model
