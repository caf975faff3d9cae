"""Stage 2 (prompts): the concept pool per category, and per concept N pairs (p_h, p_s).

Steps, each a batch of LLM requests whose finished items land in the stage's item cache:

1. seeds from ``prompts.seed_concepts`` (the published concepts), a description for each seed;
2. expansion rounds: the LLM proposes new concepts until a category reaches
   ``concepts_per_category`` (deduplicated, see ``concepts.py``) -> ``concepts.parquet``;
3. pair rounds: for every open pair slot (concept, idx) a p_h request, then a p_s request that
   rewrites that p_h; the pair is judged (``validate.py``) and a rejected slot gets a new attempt
   (a new item key, so a new sampling seed) up to ``max_pair_attempts`` -> ``pairs.parquet`` and
   ``rejects.parquet`` (every rejected attempt, with its reason; ``final`` marks slots left empty).

Every decision is a function of cached replies taken in a fixed order, so a rerun after a crash
asks only for what is missing and produces the same tables as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pydantic import BaseModel

from sage_builder.config import hashable_dump
from sage_builder.errors import StageInputError
from sage_builder.executors import make_stage_backend
from sage_builder.llm.base import LLMRequest, LLMResult, reply_settings
from sage_builder.progress import progress
from sage_builder.stages.base import Stage, StageContext, StagePlan, template_hashes
from sage_builder.stages.prompts.concepts import ConceptPool, load_seeds, load_synonyms
from sage_builder.stages.prompts.quality import quality_report
from sage_builder.stages.prompts.schemas import ConceptDescription, ConceptExpansion, ImagePrompt
from sage_builder.stages.prompts.validate import PairValidator
from sage_builder.store import file_sha256, stable_hash
from sage_builder.templates import PromptTemplate, load_template

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig
    from sage_builder.llm.base import LLMBackend
    from sage_builder.store import RunDir

log = logging.getLogger("sage.prompts")

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
REJECT_SCHEMA = pa.schema([("pair_id", pa.string()), ("concept_id", pa.string()), ("category", pa.string()),
                           ("concept", pa.string()), ("idx", pa.int32()), ("attempt", pa.int32()),
                           ("step", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                           ("prompt_unsafe", pa.string()), ("prompt_safe", pa.string()), ("final", pa.bool_())])


def refusal_check(value: BaseModel) -> str | None:
    return "refusal" if getattr(value, "refused", False) else None


@dataclass(frozen=True)
class PairSlot:
    """One (concept, idx) place that a pair fills; ``pair_id`` does not depend on the attempt."""

    pair_id: str
    concept: dict[str, Any]
    idx: int
    order: int


class _LazyBackend:
    """Load the LLM only if some item is missing: a finished rerun never pays for the model."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.backend: LLMBackend | None = ctx.options.get("llm_backend")
        self.owned = False

    def get(self) -> LLMBackend:
        if self.backend is None:
            self.backend = make_stage_backend(self.ctx.config)
            self.owned = True
        return self.backend

    def close(self) -> None:
        if self.owned and self.backend is not None:
            self.backend.close()


class PromptsStage(Stage):
    name = "prompts"
    number = 2
    distributed = True
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
        self._counter(config).load()

    def _counter(self, config: PipelineConfig) -> Any:
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
        backend = _LazyBackend(ctx)
        try:
            concepts, dropped, concept_stats = self._concepts(ctx, backend)
            ctx.write_table("concepts.parquet", pa.Table.from_pylist(concepts, schema=CONCEPT_SCHEMA))
            ctx.write_table("concepts_dropped.parquet", pa.Table.from_pylist(dropped, schema=DROPPED_SCHEMA))
            pairs, rejects = self._pairs(ctx, backend, concepts)
        finally:
            backend.close()
        if backend.backend is not None:
            ctx.stats["llm_usage"] = backend.backend.usage()
        ctx.write_table("pairs.parquet", pa.Table.from_pylist(pairs, schema=self._pair_schema()))
        ctx.write_table("rejects.parquet", pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
        report = quality_report(config.categories, concepts, dropped, pairs, rejects,
                                config.prompts.pairs_per_concept)
        report["concepts"].update(concept_stats)
        path = ctx.stage_dir.file("quality.json")
        from sage_builder.store import atomic_write_text

        atomic_write_text(path, json.dumps(report, indent=2, sort_keys=False) + "\n")
        ctx.add_output("quality.json")
        ctx.stats.update(report["summary"])
        ctx.stats["concepts_per_category"] = report["concepts"]["per_category"]
        ctx.stats["rejects_by_reason"] = report["rejects_by_reason"]

    @staticmethod
    def _pair_schema() -> pa.Schema:
        return pa.schema([
            ("pair_id", pa.string()), ("concept_id", pa.string()), ("category", pa.string()),
            ("concept", pa.string()), ("idx", pa.int32()), ("prompt_unsafe", pa.string()),
            ("prompt_safe", pa.string()), ("tokens_unsafe", pa.int32()), ("tokens_safe", pa.int32()),
            ("edit_similarity", pa.float32()), ("attempt", pa.int32()), ("seed_unsafe", pa.int64()),
            ("seed_safe", pa.int64()), ("llm_backend", pa.string()), ("llm_model", pa.string()),
            ("llm_revision", pa.string()), ("llm_temperature", pa.float32()), ("llm_top_p", pa.float32()),
            ("llm_max_new_tokens", pa.int32()), ("llm_seed", pa.int64()), ("template_unsafe", pa.string()),
            ("template_safe", pa.string()),
        ])

    def _ask(self, ctx: StageContext, backend: _LazyBackend, cache_name: str,
             requests: list[LLMRequest], desc: str) -> dict[str, dict[str, Any]]:
        """Settle every request (from the item cache when done before); key -> cached row."""
        cache = ctx.stage_dir.items(cache_name)
        done = cache.done_keys()
        todo = [r for r in requests if r.key not in done]
        if todo:
            bar = progress(total=len(todo), desc=f"prompts: {desc}", unit="req")
            with cache.writer(flush_rows=32, flush_seconds=15.0) as writer:
                for result in backend.get().run(todo):
                    writer.add(_result_row(result))
                    bar.update(1)
            bar.close()
        table = cache.read(keys=[r.key for r in requests])
        rows = table.to_pylist() if table is not None else []
        return {row["item_key"]: row for row in rows}

    # -- concepts ---------------------------------------------------------------------------------

    def _concepts(self, ctx: StageContext, backend: _LazyBackend
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        config = ctx.config
        prompts = config.prompts
        templates = {name: load_template(path) for name, path in self.templates(config).items()}
        llm_hash = hashable_dump(config.llm)
        seeds = load_seeds(prompts.seed_concepts, config.categories)
        synonyms = load_synonyms(prompts.synonyms)
        target = prompts.concepts_per_category
        pools: dict[str, ConceptPool] = {}
        for category in config.categories:
            pool = ConceptPool(category, synonyms)
            chosen = seeds[category][:prompts.seeds_per_category] if prompts.seeds_per_category else seeds[category]
            for seed in chosen:
                if len(pool) >= target:
                    break
                pool.offer(seed.concept, seed.description, "seed")
            pools[category] = pool

        # Seeds without a description in the data get one from the LLM.
        describe = templates["concept_describe"]
        requests, where = [], {}
        for category, pool in pools.items():
            for row in pool.kept:
                if row["description"]:
                    continue
                key = stable_hash("describe", category, row["concept"], describe.sha256, llm_hash)
                requests.append(LLMRequest(key, describe.render(category=category, concept=row["concept"]),
                                           ConceptDescription, check=refusal_check))
                where[key] = row
        replies = self._ask(ctx, backend, "describe", requests, "describe seed concepts")
        missing_descriptions = 0
        for key, row in where.items():
            reply = replies.get(key)
            if reply and reply["ok"]:
                row["description"] = " ".join(ConceptDescription.model_validate_json(reply["value"])
                                              .description.split())
            else:
                missing_descriptions += 1

        # Expansion rounds: one request per category still short of its target, until none is.
        expand = templates["concept_expand"]
        failed_rounds: dict[str, int] = {}
        for round_no in range(1, prompts.expand_max_rounds + 1):
            short = {c: p for c, p in pools.items() if len(p) < target}
            if not short:
                break
            requests, where_round = [], {}
            for category, pool in short.items():
                count = min(prompts.expand_batch, target - len(pool))
                existing = "\n".join(f"- {name}" for name in pool.names())
                key = stable_hash("expand", category, round_no, pool.names(), count, expand.sha256, llm_hash)
                requests.append(LLMRequest(key, expand.render(category=category, existing=existing, count=count),
                                           ConceptExpansion, check=refusal_check,
                                           max_new_tokens=max(config.llm.max_new_tokens, 40 * count)))
                where_round[key] = category
            replies = self._ask(ctx, backend, "expand", requests, f"expand concepts (round {round_no})")
            for key, category in where_round.items():
                reply = replies.get(key)
                pool = pools[category]
                if not reply or not reply["ok"]:
                    failed_rounds[category] = failed_rounds.get(category, 0) + 1
                    continue
                for item in ConceptExpansion.model_validate_json(reply["value"]).concepts:
                    if len(pool) >= target:
                        break
                    pool.offer(item.concept, " ".join(item.description.split()), "llm")

        concepts = [row for pool in pools.values() for row in pool.kept]
        dropped = [vars(d) for pool in pools.values() for d in pool.dropped]
        stats = {"descriptions_missing": missing_descriptions,
                 "expand_requests_rejected": failed_rounds,
                 "short_of_target": {c: target - len(p) for c, p in pools.items() if len(p) < target}}
        return concepts, dropped, stats

    # -- pairs ------------------------------------------------------------------------------------

    def _pairs(self, ctx: StageContext, backend: _LazyBackend, concepts: list[dict[str, Any]]
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        config = ctx.config
        prompts = config.prompts
        unsafe_t = load_template(prompts.templates.pair_unsafe)
        safe_t = load_template(prompts.templates.pair_safe)
        hashes = template_hashes(self, config)
        settings = reply_settings(config.llm)
        llm_hash = hashable_dump(config.llm)
        counter = self._counter(config).load()
        validator = PairValidator(counter, prompts, _example_prompts(unsafe_t) + _example_prompts(safe_t))
        # The tokenizer enters keys by content, not by path: a moved folder must not redo items.
        rules = {"max_clip_tokens": prompts.max_clip_tokens, "tokenizer": counter.identity(),
                 "band": [prompts.edit_similarity_min, prompts.edit_similarity_max]}
        n = prompts.pairs_per_concept

        slots = []
        for concept in concepts:
            for idx in range(1, n + 1):
                pair_id = "p-" + stable_hash(concept["concept_id"], concept["concept"], idx,
                                             hashes["pair_unsafe"], hashes["pair_safe"], settings, length=16)
                slots.append(PairSlot(pair_id, concept, idx, len(slots)))

        attempt = {s.pair_id: 1 for s in slots}
        accepted: dict[str, dict[str, Any]] = {}
        grams_by_concept: dict[str, list[tuple[str, set]]] = {}
        rejects: list[dict[str, Any]] = []
        pending = list(slots)
        while pending:
            round_no = max(attempt[s.pair_id] for s in pending)
            # Everything the p_h request's text and check depend on: the template shows idx "of n".
            unsafe_keys = {s.pair_id: stable_hash("unsafe", s.pair_id, s.concept["description"], n,
                                                  attempt[s.pair_id], rules, llm_hash) for s in pending}
            unsafe_requests = [
                LLMRequest(unsafe_keys[s.pair_id],
                           unsafe_t.render(category=s.concept["category"], concept=s.concept["concept"],
                                           description=s.concept["description"] or "no description",
                                           idx=s.idx, n=n),
                           ImagePrompt, check=validator.unsafe_check)
                for s in pending]
            unsafe = self._ask(ctx, backend, "unsafe", unsafe_requests, f"p_h (attempt {round_no})")

            safe_keys: dict[str, str] = {}
            safe_requests = []
            for s in pending:
                reply = unsafe.get(unsafe_keys[s.pair_id])
                if not reply or not reply["ok"]:
                    continue
                p_h = ImagePrompt.model_validate_json(reply["value"]).prompt
                key = stable_hash("safe", unsafe_keys[s.pair_id], p_h, rules, llm_hash)
                safe_keys[s.pair_id] = key
                safe_requests.append(LLMRequest(
                    key, safe_t.render(category=s.concept["category"], concept=s.concept["concept"], prompt=p_h,
                                       avoid=", ".join(validator.avoid_terms(s.concept))),
                    ImagePrompt, check=validator.safe_check(p_h, s.concept)))
            safe = self._ask(ctx, backend, "safe", safe_requests, f"p_s (attempt {round_no})")

            still_pending = []
            for s in pending:  # slot order: the outcome never depends on which reply came first
                a = attempt[s.pair_id]
                u_row = unsafe.get(unsafe_keys[s.pair_id])
                s_row = safe.get(safe_keys.get(s.pair_id, ""))
                p_h = ImagePrompt.model_validate_json(u_row["value"]).prompt if u_row and u_row["ok"] else None
                p_s = ImagePrompt.model_validate_json(s_row["value"]).prompt if s_row and s_row["ok"] else None
                step, reason, detail = None, None, ""
                if u_row is None or not u_row["ok"]:
                    step, reason = "unsafe", (u_row or {}).get("reason") or "no_reply"
                    detail = (u_row or {}).get("errors") or ""
                    p_h = _last_text(u_row)
                elif s_row is None or not s_row["ok"]:
                    step, reason = "safe", (s_row or {}).get("reason") or "no_reply"
                    detail = (s_row or {}).get("errors") or ""
                    p_s = _last_text(s_row)
                else:
                    grams = validator.pair_grams(p_h, p_s)
                    for other_id, other in grams_by_concept.get(s.concept["concept_id"], []):
                        score = validator.overlap(grams, other)
                        if score >= prompts.near_duplicate_jaccard:
                            step, reason = "pair", "near_duplicate"
                            detail = f"n-gram Jaccard {score:.2f} with {other_id}"
                            break
                if reason is None:
                    grams_by_concept.setdefault(s.concept["concept_id"], []).append(
                        (s.pair_id, validator.pair_grams(p_h, p_s)))
                    accepted[s.pair_id] = self._pair_row(s, a, p_h, p_s, u_row, s_row, validator, config, hashes)
                    continue
                rejects.append({"pair_id": s.pair_id, "concept_id": s.concept["concept_id"],
                                "category": s.concept["category"], "concept": s.concept["concept"], "idx": s.idx,
                                "attempt": a, "step": step, "reason": reason, "detail": detail[:500],
                                "prompt_unsafe": p_h, "prompt_safe": p_s, "final": False})
                if a < prompts.max_pair_attempts:
                    attempt[s.pair_id] = a + 1
                    still_pending.append(s)
            pending = still_pending

        for row in rejects:
            row["final"] = row["pair_id"] not in accepted and row["attempt"] == attempt[row["pair_id"]]
        pairs = [accepted[s.pair_id] for s in slots if s.pair_id in accepted]
        order = {s.pair_id: s.order for s in slots}
        rejects.sort(key=lambda r: (order[r["pair_id"]], r["attempt"]))
        return pairs, rejects

    @staticmethod
    def _pair_row(slot: PairSlot, attempt: int, p_h: str, p_s: str, u_row: dict, s_row: dict,
                  validator: PairValidator, config: PipelineConfig, hashes: dict[str, str]) -> dict[str, Any]:
        llm = config.llm
        return {"pair_id": slot.pair_id, "concept_id": slot.concept["concept_id"],
                "category": slot.concept["category"], "concept": slot.concept["concept"], "idx": slot.idx,
                "prompt_unsafe": p_h, "prompt_safe": p_s, "tokens_unsafe": validator.tokens(p_h),
                "tokens_safe": validator.tokens(p_s), "edit_similarity": validator.similarity(p_h, p_s),
                "attempt": attempt, "seed_unsafe": u_row["seed"], "seed_safe": s_row["seed"],
                "llm_backend": llm.backend, "llm_model": llm.served_model_name or llm.model,
                "llm_revision": llm.revision, "llm_temperature": llm.temperature, "llm_top_p": llm.top_p,
                "llm_max_new_tokens": llm.max_new_tokens, "llm_seed": llm.seed,
                "template_unsafe": hashes["pair_unsafe"], "template_safe": hashes["pair_safe"]}


def _result_row(result: LLMResult) -> dict[str, Any]:
    return {"item_key": result.key, "ok": result.ok, "reason": result.reason,
            "value": result.value.model_dump_json() if result.value is not None else None,
            "raw": result.raw, "seed": result.seed, "attempts": result.attempts,
            "errors": "; ".join(result.errors)}


def _example_prompts(template: PromptTemplate) -> list[str]:
    """The prompts of a template's worked examples (its assistant turns)."""
    found = []
    for role, text in template.messages:
        if role == "assistant":
            try:
                found.append(str(json.loads(text)["prompt"]))
            except (ValueError, KeyError, TypeError):
                continue
    return found


def _last_text(row: dict[str, Any] | None) -> str | None:
    """The prompt text of a rejected reply when it parsed (shown in rejects), else None."""
    if not row or not row.get("raw"):
        return None
    try:
        return str(json.loads(row["raw"]).get("prompt")) or None
    except (ValueError, AttributeError):
        return None


STAGE = PromptsStage()
