"""Pair rounds: per open slot (concept, idx) a p_h request, then a p_s request that rewrites it.

A round asks every pending slot's p_h, then the p_s of each p_h that passed its checks, then
judges the slots in slot order (``validate.py``, plus near-duplicates against the concept's kept
pairs). A rejected slot gets a new attempt (a new item key, so a new sampling seed) up to
``max_pair_attempts``; what still fails stays out of the pairs and is marked ``final`` in rejects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from sage_builder.config import hashable_dump
from sage_builder.llm.base import LLMRequest, reply_settings
from sage_builder.stages.prompts.replies import StageLLM, last_text
from sage_builder.stages.prompts.schemas import ImagePrompt
from sage_builder.stages.prompts.validate import CHECKS_VERSION, PairValidator, validator_for
from sage_builder.store import stable_hash
from sage_builder.templates import PromptTemplate, load_template

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig

PAIR_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("concept_id", pa.string()), ("category", pa.string()),
    ("concept", pa.string()), ("idx", pa.int32()), ("prompt_unsafe", pa.string()),
    ("prompt_safe", pa.string()), ("tokens_unsafe", pa.int32()), ("tokens_safe", pa.int32()),
    ("edit_similarity", pa.float32()), ("attempt", pa.int32()), ("seed_unsafe", pa.int64()),
    ("seed_safe", pa.int64()), ("llm_backend", pa.string()), ("llm_model", pa.string()),
    ("llm_revision", pa.string()), ("llm_temperature", pa.float32()), ("llm_temperature_safe", pa.float32()),
    ("llm_top_p", pa.float32()),
    ("llm_max_new_tokens", pa.int32()), ("llm_seed", pa.int64()), ("template_unsafe", pa.string()),
    ("template_safe", pa.string()),
])
REJECT_SCHEMA = pa.schema([("pair_id", pa.string()), ("concept_id", pa.string()), ("category", pa.string()),
                           ("concept", pa.string()), ("idx", pa.int32()), ("attempt", pa.int32()),
                           ("step", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                           ("prompt_unsafe", pa.string()), ("prompt_safe", pa.string()), ("final", pa.bool_())])


@dataclass(frozen=True)
class PairSlot:
    """One (concept, idx) place that a pair fills; ``pair_id`` does not depend on the attempt."""

    pair_id: str
    concept: dict[str, Any]
    idx: int
    order: int


@dataclass
class Verdict:
    """The outcome of one attempt at a slot: no ``reason`` means the pair is kept."""

    p_h: str | None
    p_s: str | None
    step: str | None = None
    reason: str | None = None
    detail: str = ""


def pair_slots(concepts: list[dict[str, Any]], n: int, hashes: dict[str, str], settings: dict[str, Any]
               ) -> list[PairSlot]:
    slots: list[PairSlot] = []
    for concept in concepts:
        for idx in range(1, n + 1):
            pair_id = "p-" + stable_hash(concept["concept_id"], concept["concept"], idx,
                                         hashes["pair_unsafe"], hashes["pair_safe"], settings, length=16)
            slots.append(PairSlot(pair_id, concept, idx, len(slots)))
    return slots


def pair_rounds(config: PipelineConfig, hashes: dict[str, str], counter: Any) -> PairRounds:
    """The rounds of this config, judged with ``counter`` (a loaded ``ClipTokenCounter``)."""
    prompts = config.prompts
    templates = {name: load_template(getattr(prompts.templates, name)) for name in ("pair_unsafe", "pair_safe")}
    validator = validator_for(prompts, counter)
    # The tokenizer enters keys by content, not by path: a moved folder must not redo items.
    rules = {"max_clip_tokens": prompts.max_clip_tokens, "tokenizer": counter.identity(),
             "band": [prompts.scene_similarity_min, prompts.edit_similarity_max], "checks": CHECKS_VERSION,
             "copied_share_max": prompts.copied_share_max}
    return PairRounds(config, templates, hashes, validator, rules)


def _prompt(row: dict[str, Any] | None) -> str | None:
    return ImagePrompt.model_validate_json(row["value"]).prompt if row and row["ok"] else None


@dataclass
class PairRounds:
    """Every pair slot of the concept pool, asked and judged round by round."""

    config: PipelineConfig
    templates: dict[str, PromptTemplate]
    hashes: dict[str, str]
    validator: PairValidator
    rules: dict[str, Any]
    slots: list[PairSlot] = field(default_factory=list)
    attempt: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    grams_by_concept: dict[str, list[tuple[str, set]]] = field(default_factory=dict)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.llm_hash = hashable_dump(self.config.llm)
        self.n = self.config.prompts.pairs_per_concept

    def run(self, llm: StageLLM, concepts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(kept pairs in slot order, every rejected attempt in slot then attempt order)."""
        self.slots = pair_slots(concepts, self.n, self.hashes, reply_settings(self.config.llm))
        self.attempt = {s.pair_id: 1 for s in self.slots}
        pending = list(self.slots)
        while pending:
            round_no = max(self.attempt[s.pair_id] for s in pending)
            unsafe_keys = {s.pair_id: self._unsafe_key(s) for s in pending}
            unsafe = llm.ask("unsafe", self._unsafe_requests(pending, unsafe_keys), f"p_h (attempt {round_no})")
            safe_keys, safe_requests = self._safe_requests(pending, unsafe_keys, unsafe)
            safe = llm.ask("safe", safe_requests, f"p_s (attempt {round_no})")
            # slot order: the outcome never depends on which reply came first
            pending = [s for s in pending
                       if self._settle(s, unsafe.get(unsafe_keys[s.pair_id]), safe.get(safe_keys.get(s.pair_id, "")))]
        return self._tables()

    def _unsafe_key(self, slot: PairSlot) -> str:
        # Everything the p_h request's text and check depend on: the template shows idx "of n".
        return stable_hash("unsafe", slot.pair_id, slot.concept["description"], self.n,
                           self.attempt[slot.pair_id], self.rules, self.llm_hash)

    def _unsafe_requests(self, pending: list[PairSlot], keys: dict[str, str]) -> list[LLMRequest]:
        template = self.templates["pair_unsafe"]
        return [LLMRequest(keys[s.pair_id],
                           template.render(category=s.concept["category"], concept=s.concept["concept"],
                                           description=s.concept["description"] or "no description",
                                           idx=s.idx, n=self.n),
                           ImagePrompt, check=self.validator.unsafe_check)
                for s in pending]

    def _safe_requests(self, pending: list[PairSlot], unsafe_keys: dict[str, str],
                       unsafe: dict[str, dict[str, Any]]) -> tuple[dict[str, str], list[LLMRequest]]:
        template = self.templates["pair_safe"]
        temperature = self.config.prompts.safe_temperature
        keys: dict[str, str] = {}
        requests = []
        for s in pending:
            p_h = _prompt(unsafe.get(unsafe_keys[s.pair_id]))
            if p_h is None:
                continue
            own = [] if temperature is None else [temperature]  # keys without it stay as they were
            key = stable_hash("safe", unsafe_keys[s.pair_id], p_h, self.rules, self.llm_hash, *own)
            keys[s.pair_id] = key
            requests.append(LLMRequest(
                key, template.render(category=s.concept["category"], concept=s.concept["concept"], prompt=p_h,
                                     avoid=", ".join(self.validator.avoid_terms(s.concept))),
                ImagePrompt, check=self.validator.safe_check(p_h, s.concept), temperature=temperature))
        return keys, requests

    def _judge(self, slot: PairSlot, u_row: dict[str, Any] | None, s_row: dict[str, Any] | None) -> Verdict:
        if u_row is None or not u_row["ok"]:
            return Verdict(last_text(u_row), _prompt(s_row), "unsafe", (u_row or {}).get("reason") or "no_reply",
                           (u_row or {}).get("errors") or "")
        p_h = _prompt(u_row)
        if s_row is None or not s_row["ok"]:
            return Verdict(p_h, last_text(s_row), "safe", (s_row or {}).get("reason") or "no_reply",
                           (s_row or {}).get("errors") or "")
        p_s = _prompt(s_row)
        grams = self.validator.pair_grams(p_h, p_s)
        for other_id, other in self.grams_by_concept.get(slot.concept["concept_id"], []):
            score = self.validator.overlap(grams, other)
            if score >= self.config.prompts.near_duplicate_jaccard:
                return Verdict(p_h, p_s, "pair", "near_duplicate", f"n-gram Jaccard {score:.2f} with {other_id}")
        return Verdict(p_h, p_s)

    def _settle(self, slot: PairSlot, u_row: dict[str, Any] | None, s_row: dict[str, Any] | None) -> bool:
        """Keep or reject this attempt; True when the slot gets another attempt."""
        a = self.attempt[slot.pair_id]
        verdict = self._judge(slot, u_row, s_row)
        if verdict.reason is None:
            assert verdict.p_h is not None and verdict.p_s is not None and u_row and s_row
            self.grams_by_concept.setdefault(slot.concept["concept_id"], []).append(
                (slot.pair_id, self.validator.pair_grams(verdict.p_h, verdict.p_s)))
            self.accepted[slot.pair_id] = self._pair_row(slot, a, verdict.p_h, verdict.p_s, u_row, s_row)
            return False
        self.rejects.append({"pair_id": slot.pair_id, "concept_id": slot.concept["concept_id"],
                             "category": slot.concept["category"], "concept": slot.concept["concept"],
                             "idx": slot.idx, "attempt": a, "step": verdict.step, "reason": verdict.reason,
                             "detail": verdict.detail[:500], "prompt_unsafe": verdict.p_h,
                             "prompt_safe": verdict.p_s, "final": False})
        if a < self.config.prompts.max_pair_attempts:
            self.attempt[slot.pair_id] = a + 1
            return True
        return False

    def _tables(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        for row in self.rejects:
            row["final"] = row["pair_id"] not in self.accepted and row["attempt"] == self.attempt[row["pair_id"]]
        pairs = [self.accepted[s.pair_id] for s in self.slots if s.pair_id in self.accepted]
        order = {s.pair_id: s.order for s in self.slots}
        self.rejects.sort(key=lambda r: (order[r["pair_id"]], r["attempt"]))
        return pairs, self.rejects

    def _pair_row(self, slot: PairSlot, attempt: int, p_h: str, p_s: str, u_row: dict, s_row: dict
                  ) -> dict[str, Any]:
        llm, validator = self.config.llm, self.validator
        return {"pair_id": slot.pair_id, "concept_id": slot.concept["concept_id"],
                "category": slot.concept["category"], "concept": slot.concept["concept"], "idx": slot.idx,
                "prompt_unsafe": p_h, "prompt_safe": p_s, "tokens_unsafe": validator.tokens(p_h),
                "tokens_safe": validator.tokens(p_s), "edit_similarity": validator.similarity(p_h, p_s),
                "attempt": attempt, "seed_unsafe": u_row["seed"], "seed_safe": s_row["seed"],
                "llm_backend": llm.backend, "llm_model": llm.served_model_name or llm.model,
                "llm_revision": llm.revision, "llm_temperature": llm.temperature,
                "llm_temperature_safe": (llm.temperature if self.config.prompts.safe_temperature is None
                                         else self.config.prompts.safe_temperature),
                "llm_top_p": llm.top_p,
                "llm_max_new_tokens": llm.max_new_tokens, "llm_seed": llm.seed,
                "template_unsafe": self.hashes["pair_unsafe"], "template_safe": self.hashes["pair_safe"]}
