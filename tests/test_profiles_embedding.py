"""The shared profile -> statement -> embedding path: the offline flag is read as the Hub reads it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sage_builder.errors import StageInputError
from sage_builder.user_embedding import check_model_available


def test_hf_hub_offline_true_keeps_the_embedder_check_offline(tmp_path):
    """HF_HUB_OFFLINE=true (not only 1) means offline: a hub id missing from the cache is refused."""
    code = ("from sage_builder.user_embedding import check_model_available\n"
            "check_model_available('sage-test/not-in-any-cache', 'profiles.embedding_model')\n")
    for value in ("true", "1", "yes"):
        env = {**os.environ, "HF_HUB_OFFLINE": value, "HF_HOME": str(tmp_path / "hf")}
        env.pop("TRANSFORMERS_OFFLINE", None)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0, value
        assert "profiles.embedding_model: sage-test/not-in-any-cache is not in the local Hugging Face cache" \
            in result.stderr, (value, result.stderr[-400:])


def test_missing_local_model_folder_is_one_line(tmp_path):
    with pytest.raises(StageInputError, match=r"^llm.model: .*nope does not exist \(no config.json there\)"):
        check_model_available(str(tmp_path / "nope"))
