"""Stage 2 with a real small LLM in-process (SmolLM2-135M-Instruct through the transformers backend)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sage_builder.config import config_from_dict
from sage_builder.stages.base import run_stage
from sage_builder.stages.prompts.fixtures import save_word_clip_tokenizer
from sage_builder.stages.prompts.stage import STAGE
from sage_builder.stages.prompts.text import scene_similarity
from sage_builder.store import RunDir

REASONS = {"refusal", "too_short", "template_residue", "clip_tokens_unsafe", "clip_tokens_safe", "copies_example",
           "identical", "edit_similarity_high", "copies_unsafe", "scene_similarity_low", "concept_term_in_safe",
           "near_duplicate", "truncated", "invalid_json", "schema", "constraint_error"}


@pytest.mark.slow
def test_smollm2_pairs_are_valid_or_rejected_for_a_stated_reason(tmp_path: Path, smollm2_dir: Path,
                                                                 models_dir: Path) -> None:
    # The real CLIP BPE when `sage prompts clip-tokenizer` built it, else a small word-level CLIP tokenizer.
    clip = models_dir / "clip-tokenizer"
    if not (clip / "tokenizer").exists():
        clip = save_word_clip_tokenizer(tmp_path / "clip")
    (tmp_path / "seeds.csv").write_text("category,concept\nviolence,arson\n")
    config = config_from_dict({
        "name": "t", "categories": ["Violence"],
        "llm": {"backend": "transformers", "model": str(smollm2_dir), "temperature": 0.7, "top_p": 0.95,
                "max_new_tokens": 80, "max_attempts": 1, "dtype": "float32", "device": "cpu", "batch_size": 4},
        "prompts": {"seed_concepts": str(tmp_path / "seeds.csv"), "concepts_per_category": 1,
                    "pairs_per_concept": 2, "max_pair_attempts": 1, "clip_tokenizer": str(clip)}})
    manifest = run_stage(STAGE, config, RunDir(tmp_path / "run"))
    out = tmp_path / "run" / "prompts"
    pairs = pq.read_table(out / "pairs.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert len(pairs) + sum(r["final"] for r in rejects) == 2  # every slot: a pair or a final reject
    for pair in pairs:
        assert pair["prompt_unsafe"].strip() and pair["prompt_safe"].strip()
        assert pair["prompt_safe"] != pair["prompt_unsafe"]
        assert pair["tokens_unsafe"] <= 77 and pair["tokens_safe"] <= 77
        assert pair["edit_similarity"] <= config.prompts.edit_similarity_max
        assert scene_similarity(pair["prompt_unsafe"], pair["prompt_safe"]) >= config.prompts.scene_similarity_min
        assert pair["llm_backend"] == "transformers"
    for reject in rejects:
        assert reject["reason"] in REASONS and reject["step"] in {"unsafe", "safe", "pair"}
    report = json.loads((out / "quality.json").read_text())
    assert report["summary"]["pairs"] == len(pairs) == manifest.stats["pairs"]
    usage = manifest.stats["llm_usage"]  # read before the backend closed: the engine that served
    assert usage["decoder"] == "cached" and usage["prefix_tokens_computed"] > 0
