"""Stage 2 (prompts): the concept pool per category, and per concept N pairs (p_h, p_s).

Steps, each a batch of LLM requests whose finished items land in the stage's item cache
(``replies.py``):

1. seeds from ``prompts.seed_concepts`` (the published concepts), a description for each seed;
2. expansion rounds: the LLM proposes new concepts until a category reaches
   ``concepts_per_category`` (``pool.py``; dedupe in ``concepts.py``) -> ``concepts.parquet``;
3. pair rounds (``pairs.py``): for every open pair slot (concept, idx) a p_h request, then a p_s
   request that rewrites that p_h; the pair is judged (``validate.py``) and a rejected slot gets a
   new attempt (a new item key, so a new sampling seed) up to ``max_pair_attempts`` ->
   ``pairs.parquet`` and ``rejects.parquet`` (every rejected attempt, with its reason; ``final``
   marks slots left empty); ``quality.py`` -> ``quality.json``.

Every decision is a function of cached replies taken in a fixed order, so a rerun after a crash
asks only for what is missing and produces the same tables as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from sage_builder.config import hashable_dump
from sage_builder.errors import StageInputError
from sage_builder.llm.base import reply_settings
from sage_builder.stages.base import Stage, StageContext, StageOptions, StagePlan, template_hashes
from sage_builder.stages.prompts.concepts import load_seeds, load_synonyms
from sage_builder.stages.prompts.pairs import PAIR_SCHEMA, REJECT_SCHEMA, pair_rounds
from sage_builder.stages.prompts.pool import build_concept_pools
from sage_builder.stages.prompts.quality import quality_report
from sage_builder.stages.prompts.replies import StageLLM
from sage_builder.store import atomic_write_text, file_sha256
from sage_builder.templates import load_template

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig
    from sage_builder.llm.base import LLMBackend
    from sage_builder.store import RunDir

TEMPLATE_VARIABLES = {
    "concept_describe": {"category", "concept"},
    "concept_expand": {"category", "existing", "count"},
    "pair_unsafe": {"category", "concept", "description", "idx", "n"},
    "pair_safe": {"category", "concept", "prompt", "avoid"},
}
CONCEPT_SCHEMA = pa.schema([("concept_id", pa.string()), ("category", pa.string()), ("concept", pa.string()),
                            ("description", pa.string()), ("source", pa.string())])
DROPPED_SCHEMA = pa.schema([("category", pa.string()), ("concept", pa.string()), ("source", pa.string()),
                            ("reason", pa.string()), ("duplicate_of", pa.string())])


@dataclass(frozen=True)
class PromptsOptions(StageOptions):
    llm_backend: LLMBackend | None = None  # a backend to use instead of the configured one (tests)


class PromptsStage(Stage):
    name = "prompts"
    distributed = True
    uses_llm = True
    options_type = PromptsOptions
    inputs = ()  # needs only config.categories, not the profiles
    summary = "concept pool per category and (p_h, p_s) prompt pairs"

    # -- what determines the output -------------------------------------------------------------

    def templates(self, config: PipelineConfig) -> dict[str, Any]:
        return config.prompts.templates.as_dict()

    def tokenizer_ref(self, config: PipelineConfig) -> tuple[str, str | None, str]:
        if config.prompts.clip_tokenizer:
            return config.prompts.clip_tokenizer, None, "prompts.clip_tokenizer"
        return config.render.model, config.render.revision, "render.model"

    def model_ids(self, config: PipelineConfig) -> dict[str, dict[str, Any]]:
        model, revision, _ = self.tokenizer_ref(config)
        return {"llm": reply_settings(config.llm), "clip_tokenizer": {"model": model, "revision": revision}}

    def fingerprint_parts(self, config: PipelineConfig) -> dict[str, Any]:
        prompts = config.prompts
        return {"categories": config.categories, "llm": hashable_dump(config.llm),
                "seed_concepts": file_sha256(prompts.seed_concepts) if prompts.seed_concepts.exists() else None,
                "synonyms": file_sha256(prompts.synonyms) if prompts.synonyms.exists() else None}

    # -- checks before anything is written ------------------------------------------------------

    def check(self, config: PipelineConfig, run: RunDir) -> None:
        prompts = config.prompts
        seeds = load_seeds(prompts.seed_concepts, config.categories)
        for category, rows in seeds.items():
            if not rows:
                raise StageInputError(f"prompts.seed_concepts: no seed concepts for category '{category}' in "
                                      f"{prompts.seed_concepts}; add rows '{category.lower()},<concept>' or drop "
                                      f"the category from `categories`")
        load_synonyms(prompts.synonyms)
        for name, path in self.templates(config).items():
            missing = TEMPLATE_VARIABLES[name] - load_template(path).variables
            if missing:
                raise StageInputError(f"prompts.templates.{name}: {path} lacks the placeholder(s) "
                                      f"{', '.join('{{' + m + '}}' for m in sorted(missing))}")
        self.token_counter(config).load()

    def token_counter(self, config: PipelineConfig) -> Any:
        """The CLIP token counter of ``config`` (``prompts.clip_tokenizer``, else ``render.model``), not loaded."""
        from sage_builder.stages.prompts.clip_tokens import ClipTokenCounter

        model, revision, key = self.tokenizer_ref(config)
        return ClipTokenCounter(model, revision, key)

    def plan(self, config: PipelineConfig) -> StagePlan:
        prompts = config.prompts
        seeds = load_seeds(prompts.seed_concepts, config.categories)
        n_seeds = sum(min(len(rows), prompts.seeds_per_category or len(rows), prompts.concepts_per_category)
                      for rows in seeds.values())
        n_concepts = prompts.concepts_per_category * len(config.categories)
        pairs = n_concepts * prompts.pairs_per_concept
        expand = math.ceil(max(0, n_concepts - n_seeds) / prompts.expand_batch)
        return StagePlan(items=pairs, unit="pairs", llm_calls=n_seeds + expand + 2 * pairs,
                         notes=[f"{n_concepts} concepts ({n_seeds} seeds), {prompts.pairs_per_concept} pairs each; "
                                f"rejected pairs retried up to {prompts.max_pair_attempts} times"])

    # -- the run ----------------------------------------------------------------------------------

    def run(self, ctx: StageContext) -> None:
        config = ctx.config
        llm = StageLLM(ctx)
        try:
            templates = {name: load_template(path) for name, path in self.templates(config).items()}
            concepts, dropped, concept_stats = build_concept_pools(config, templates, llm)
            ctx.write_table("concepts.parquet", pa.Table.from_pylist(concepts, schema=CONCEPT_SCHEMA))
            ctx.write_table("concepts_dropped.parquet", pa.Table.from_pylist(dropped, schema=DROPPED_SCHEMA))
            rounds = pair_rounds(config, template_hashes(self, config), self.token_counter(config).load())
            pairs, rejects = rounds.run(llm, concepts)
        finally:
            if llm.backend is not None:  # before close(): the transformers backend drops its engine then
                ctx.stats["llm_usage"] = llm.backend.usage()
            llm.close()
        ctx.write_table("pairs.parquet", pa.Table.from_pylist(pairs, schema=PAIR_SCHEMA))
        ctx.write_table("rejects.parquet", pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
        report = quality_report(config.categories, concepts, dropped, pairs, rejects,
                                config.prompts.pairs_per_concept)
        report["concepts"].update(concept_stats)
        atomic_write_text(ctx.stage_dir.file("quality.json"), json.dumps(report, indent=2, sort_keys=False) + "\n")
        ctx.add_output("quality.json")
        ctx.stats.update(report["summary"])
        ctx.stats["concepts_per_category"] = report["concepts"]["per_category"]
        ctx.stats["rejects_by_reason"] = report["rejects_by_reason"]


STAGE = PromptsStage()
