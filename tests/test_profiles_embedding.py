"""The shared profile -> statement -> embedding path: stage 1 and ``sage generate --profile`` give a
user the same vector from the run's statement template; the offline flag is read as the Hub reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from sage_builder.config import config_from_dict, dump_config
from sage_builder.errors import SageError, StageInputError
from sage_builder.stages.base import run_stage
from sage_builder.stages.profiles import stage as profiles_stage
from sage_builder.store import RunDir
from sage_builder.testing.tiny_llm import save_tiny_llama
from sage_builder.user_embedding import EmbeddingSetup, check_model_available

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=32)


def test_generate_embeds_a_profile_with_the_runs_statement_template(tmp_path, tiny_llama):
    from sage_builder.stages.train.generate import profile_embedding_setup, user_from_profile

    template = tmp_path / "statement.txt"
    template.write_text("### user\nA {{age}}-year-old {{gender}} who must not see: {{banned}}. "
                        "Fine: {{allowed}}. ({{religion}}, {{mental_condition}}, {{physical_condition}}, "
                        "{{age_group}})\n")
    config = config_from_dict({
        "name": "t", "seed": 2025,
        "llm": {"backend": "transformers", "model": str(tiny_llama), "device": "cpu", "dtype": "float32"},
        "profiles": {"n_users": 3, "sampler": "psalign", "labeller": "rules", "tsne_perplexity": 5,
                     "statement_template": str(template)}})
    run = tmp_path / "run"
    run_stage(profiles_stage.STAGE, config, RunDir(run))
    (run / "config.yaml").write_text(dump_config(config))
    row = pq.read_table(run / "profiles" / "profiles.parquet").to_pylist()[0]
    profile = tmp_path / "user1.json"
    profile.write_text(json.dumps({k: row[k] for k in ("age", "age_group", "gender", "religion",
                                                       "physical_condition", "mental_condition", "banned",
                                                       "allowed")}))
    adapter_dir = run / "train" / "adapter"

    # Default: the settings of the adapter's run (RUN/config.yaml), i.e. the configured template.
    setup = profile_embedding_setup(adapter_dir, None, None, "cpu")
    assert setup.template == template.resolve() and setup.model == str(tiny_llama)
    vector = user_from_profile(profile, setup).embedding
    np.testing.assert_array_equal(vector, np.asarray(row["embedding"], dtype=np.float32))

    # The shipped template embeds the same user differently: the template really is the run's.
    shipped = EmbeddingSetup(str(tiny_llama), None, None, "cpu", "float32", REPO / "prompts" / "user_statement.txt")
    assert not np.allclose(user_from_profile(profile, shipped).embedding, vector)


def test_generate_profile_without_a_run_config_needs_the_embedding_model(tmp_path):
    from sage_builder.stages.train.generate import profile_embedding_setup

    with pytest.raises(SageError, match="--profile needs --config"):
        profile_embedding_setup(tmp_path / "adapter", None, None, "cpu")
    setup = profile_embedding_setup(tmp_path / "adapter", None, "some/model", "cpu")
    assert setup.template == REPO / "prompts" / "user_statement.txt" and setup.model == "some/model"


def test_hf_hub_offline_true_keeps_the_embedder_check_offline(tmp_path):
    """HF_HUB_OFFLINE=true (not only 1) means offline: a hub id missing from the cache is refused."""
    code = ("from sage_builder.user_embedding import check_model_available\n"
            "check_model_available('sage-test/not-in-any-cache', 'profiles.embedding_model')\n")
    for value in ("true", "1"):
        env = {**os.environ, "HF_HUB_OFFLINE": value, "HF_HOME": str(tmp_path / "hf")}
        env.pop("TRANSFORMERS_OFFLINE", None)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0, value
        assert "profiles.embedding_model: sage-test/not-in-any-cache is not in the local Hugging Face cache" \
            in result.stderr, (value, result.stderr[-400:])


def test_missing_local_model_folder_is_one_line(tmp_path):
    with pytest.raises(StageInputError, match=r"^llm.model: .*nope does not exist \(no config.json there\)"):
        check_model_available(str(tmp_path / "nope"))
