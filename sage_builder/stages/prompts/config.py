"""Stage 2 (prompts) configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from sage_builder.config_base import ConfigPath, OptionalModelRef, StrictModel, execution, project_file


class PromptTemplates(StrictModel):
    """The LLM instructions of this stage; their content (not their path) is hashed."""

    concept_describe: ConfigPath = execution(project_file("prompts", "concept_describe.txt"),
                                             description="concept -> description instruction")
    concept_expand: ConfigPath = execution(project_file("prompts", "concept_expand.txt"),
                                           description="seed concepts -> new concepts instruction")
    pair_unsafe: ConfigPath = execution(project_file("prompts", "pair_unsafe.txt"),
                                        description="concept -> unsafe prompt instruction")
    pair_safe: ConfigPath = execution(project_file("prompts", "pair_safe.txt"),
                                      description="unsafe prompt -> its safe counterpart instruction")

    def as_dict(self) -> dict[str, Path]:
        return {name: getattr(self, name) for name in type(self).model_fields}


class PromptsConfig(StrictModel):
    seed_concepts: ConfigPath = execution(project_file("prompts", "seed_concepts.csv"),
                                          description="seed concepts per category (content is hashed)")
    synonyms: ConfigPath = execution(project_file("prompts", "concept_synonyms.txt"),
                                     description="near-synonym groups for concept dedupe, one '|'-separated group "
                                                 "a line (content is hashed)")
    seeds_per_category: int | None = Field(None, ge=1, description="use only the first K seeds of each category "
                                                                   "(most frequent in the published data first)")
    concepts_per_category: int = Field(120, ge=1, description="target pool size per category; the LLM expands "
                                                              "the seeds up to it")
    expand_batch: int = Field(20, ge=1, le=100, description="new concepts asked for per expansion request")
    expand_max_rounds: int = Field(8, ge=1, description="expansion requests per category before giving up short")
    pairs_per_concept: int = Field(10, ge=2, description="N; index N is reserved for the test splits")
    max_pair_attempts: int = Field(3, ge=1, le=20, description="new p_h/p_s requests for a rejected pair before "
                                                               "it stays in the rejects table")
    safe_temperature: float | None = Field(None, ge=0.0, le=2.0, description="sampling temperature of the p_s "
                                                                            "requests (null: llm.temperature); a "
                                                                            "small model copies p_h less at a "
                                                                            "higher one")
    max_clip_tokens: int = Field(77, ge=8, le=77, description="CLIP text encoder limit, BOS/EOS included")
    edit_similarity_max: float = Field(0.9, ge=0.0, le=1.0, description="word-level similarity p_h vs p_s above "
                                                                        "which p_s is nearly identical (must "
                                                                        "really change p_h)")
    copied_share_max: float = Field(0.8, gt=0.0, le=1.0, description="share of p_s's words that are one verbatim "
                                                                     "run of p_h above which p_s is a fragment of "
                                                                     "p_h (published pairs: at most 0.68)")
    scene_similarity_min: float = Field(0.06, ge=0.0, le=1.0, description="scene similarity p_h vs p_s (word order "
                                                                          "or scene words kept) below which p_s is "
                                                                          "no rewrite of p_h; 0.06 accepts 299 of "
                                                                          "300 published pairs")
    near_duplicate_ngram: int = Field(3, ge=1, le=8, description="word n-grams compared between pairs of a concept")
    near_duplicate_jaccard: float = Field(0.5, gt=0.0, le=1.0, description="n-gram Jaccard at or above which a "
                                                                           "pair duplicates an earlier one")
    clip_tokenizer: OptionalModelRef = Field(None, description="model folder or hub id whose tokenizer/ (and "
                                                         "tokenizer_2/) count CLIP tokens; default render.model")
    templates: PromptTemplates = Field(default_factory=PromptTemplates, description="the stage's LLM "
                                       "instruction files (prompts/)")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "edit_similarity_min" in data:
            raise ValueError("prompts.edit_similarity_min was replaced by prompts.scene_similarity_min (word overlap "
                             "rejected published rewrites that keep the scene in new words); rename the key, 0.06 "
                             "is calibrated on published pairs")
        return data

    @model_validator(mode="after")
    def _band(self) -> PromptsConfig:
        if self.scene_similarity_min >= self.edit_similarity_max:
            raise ValueError(f"prompts.scene_similarity_min ({self.scene_similarity_min}) must be below "
                             f"prompts.edit_similarity_max ({self.edit_similarity_max})")
        return self
