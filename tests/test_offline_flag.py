"""``HF_HUB_OFFLINE=true`` (not only ``1``) keeps every model-loading place off the network.

Each place is asked for a hub id that is not in the (empty) Hugging Face cache, in a fresh
interpreter whose environment says ``HF_HUB_OFFLINE=true``, with name lookups and connections
recorded and refused. A place passes when it tried no network at all and ended in a one-line
SageError. The flag's spelling is huggingface_hub's (1, true, yes, on: ``sage_builder.runtime``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "sage-test/not-cached-model"

SCRIPT = r'''
import json, socket, sys
attempts = []

def refuse(*args, **kwargs):
    attempts.append(str(args[:2])[:80])
    raise OSError("network refused by the offline test")

socket.getaddrinfo = refuse
socket.socket.connect = lambda self, *a: refuse(*a)
socket.socket.connect_ex = lambda self, *a: refuse(*a)

HUB_ID = sys.argv[1]


def render():
    from sage_builder.stages.render.config import RenderConfig
    from sage_builder.diffusion import load_pipeline

    load_pipeline(RenderConfig(model=HUB_ID, backbone="sd15"), "cpu")


def transformers_llm():
    from sage_builder.config import LLMConfig
    from sage_builder.llm.factory import make_backend

    make_backend(LLMConfig(backend="transformers", model=HUB_ID, device="cpu"))


def profile_embedder():
    from sage_builder.user_embedding import StatementEmbedder, check_model_available

    check_model_available(HUB_ID)
    StatementEmbedder(HUB_ID, device="cpu")


def prompts_clip_tokenizer():
    from sage_builder.stages.prompts.clip_tokens import ClipTokenCounter

    ClipTokenCounter(HUB_ID).load()


def train_pipeline():
    from sage_builder.stages.train.trainer import load_base_pipeline

    load_base_pipeline("sd15", HUB_ID)


results = {}
for place in (render, transformers_llm, profile_embedder, prompts_clip_tokenizer, train_pipeline):
    attempts.clear()
    error = None
    try:
        place()
        outcome = "loaded"
    except Exception as exc:
        from sage_builder.errors import SageError

        outcome = "sage_error" if isinstance(exc, SageError) else type(exc).__name__
        error = str(exc)
    results[place.__name__] = {"outcome": outcome, "error": error, "network": list(attempts)}
print("RESULTS " + json.dumps(results))
'''

PLACES = ["render", "transformers_llm", "profile_embedder", "prompts_clip_tokenizer", "train_pipeline"]


@pytest.fixture(scope="module")
def offline_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    home = tmp_path_factory.mktemp("empty-hf-home")
    env = {key: value for key, value in os.environ.items() if key not in {"TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"}}
    env.update({"HF_HUB_OFFLINE": "true", "HF_HOME": str(home), "SAGE_NO_PROGRESS": "1"})
    result = subprocess.run([sys.executable, "-c", SCRIPT, HUB_ID], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, result.stdout + result.stderr
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.slow
@pytest.mark.parametrize("place", PLACES)
def test_hf_hub_offline_true_keeps_the_place_offline(offline_results: dict[str, dict], place: str) -> None:
    found = offline_results[place]
    assert found["network"] == [], f"{place} went to the network with HF_HUB_OFFLINE=true: {found}"
    assert found["outcome"] == "sage_error", found
    assert "\n" not in found["error"].strip() and HUB_ID in found["error"], found
