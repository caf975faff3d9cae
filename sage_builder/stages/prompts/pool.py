"""The concept pool of every category: seeds, an LLM description per seed, LLM expansion rounds.

Dedupe rules live in ``concepts.py`` (``ConceptPool``); this module decides what is asked and in
which order, so that the pool is a function of the cached replies alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sage_builder.config import hashable_dump
from sage_builder.llm.base import LLMRequest
from sage_builder.stages.prompts.concepts import ConceptPool, load_seeds, load_synonyms
from sage_builder.stages.prompts.replies import StageLLM, refusal_check
from sage_builder.stages.prompts.schemas import ConceptDescription, ConceptExpansion
from sage_builder.store import stable_hash

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig
    from sage_builder.templates import PromptTemplate


def build_concept_pools(config: PipelineConfig, templates: dict[str, PromptTemplate], llm: StageLLM
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(kept concepts, dropped concepts, stats) over ``config.categories``, in category order."""
    llm_hash = hashable_dump(config.llm)
    pools = seed_pools(config)
    missing_descriptions = describe_seeds(pools, templates["concept_describe"], llm_hash, llm)
    failed_rounds = expand_pools(pools, config, templates["concept_expand"], llm_hash, llm)
    target = config.prompts.concepts_per_category
    concepts = [row for pool in pools.values() for row in pool.kept]
    dropped = [vars(d) for pool in pools.values() for d in pool.dropped]
    stats = {"descriptions_missing": missing_descriptions,
             "expand_requests_rejected": failed_rounds,
             "short_of_target": {c: target - len(p) for c, p in pools.items() if len(p) < target}}
    return concepts, dropped, stats


def seed_pools(config: PipelineConfig) -> dict[str, ConceptPool]:
    """One pool per category with its seeds (the first ``seeds_per_category``, up to the target)."""
    prompts = config.prompts
    seeds = load_seeds(prompts.seed_concepts, config.categories)
    synonyms = load_synonyms(prompts.synonyms)
    pools: dict[str, ConceptPool] = {}
    for category in config.categories:
        pool = ConceptPool(category, synonyms)
        chosen = seeds[category][:prompts.seeds_per_category] if prompts.seeds_per_category else seeds[category]
        for seed in chosen:
            if len(pool) >= prompts.concepts_per_category:
                break
            pool.offer(seed.concept, seed.description, "seed")
        pools[category] = pool
    return pools


def describe_seeds(pools: dict[str, ConceptPool], describe: PromptTemplate, llm_hash: str, llm: StageLLM) -> int:
    """Seeds without a description in the data get one from the LLM; returns how many got none."""
    requests, where = [], {}
    for category, pool in pools.items():
        for row in pool.kept:
            if row["description"]:
                continue
            key = stable_hash("describe", category, row["concept"], describe.sha256, llm_hash)
            requests.append(LLMRequest(key, describe.render(category=category, concept=row["concept"]),
                                       ConceptDescription, check=refusal_check))
            where[key] = row
    replies = llm.ask("describe", requests, "describe seed concepts")
    missing = 0
    for key, row in where.items():
        reply = replies.get(key)
        if reply and reply["ok"]:
            row["description"] = " ".join(ConceptDescription.model_validate_json(reply["value"]).description.split())
        else:
            missing += 1
    return missing


def expand_pools(pools: dict[str, ConceptPool], config: PipelineConfig, expand: PromptTemplate, llm_hash: str,
                 llm: StageLLM) -> dict[str, int]:
    """Expansion rounds: one request per category still short of its target, until none is.

    Returns the number of rejected expansion requests per category.
    """
    prompts = config.prompts
    target = prompts.concepts_per_category
    failed_rounds: dict[str, int] = {}
    for round_no in range(1, prompts.expand_max_rounds + 1):
        short = {c: p for c, p in pools.items() if len(p) < target}
        if not short:
            break
        requests, where = [], {}
        for category, pool in short.items():
            count = min(prompts.expand_batch, target - len(pool))
            existing = "\n".join(f"- {name}" for name in pool.names())
            key = stable_hash("expand", category, round_no, pool.names(), count, expand.sha256, llm_hash)
            requests.append(LLMRequest(key, expand.render(category=category, existing=existing, count=count),
                                       ConceptExpansion, check=refusal_check,
                                       max_new_tokens=max(config.llm.max_new_tokens, 40 * count)))
            where[key] = category
        replies = llm.ask("expand", requests, f"expand concepts (round {round_no})")
        for key, category in where.items():
            reply = replies.get(key)
            pool = pools[category]
            if not reply or not reply["ok"]:
                failed_rounds[category] = failed_rounds.get(category, 0) + 1
                continue
            for item in ConceptExpansion.model_validate_json(reply["value"]).concepts:
                if len(pool) >= target:
                    break
                pool.offer(item.concept, " ".join(item.description.split()), "llm")
    return failed_rounds
