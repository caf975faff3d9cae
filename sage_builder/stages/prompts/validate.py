"""The rules a prompt pair must pass; each failure is a short reason stored in the rejects table.

Single-prompt rules run as the LLM request's ``check`` (a failing reply is retried at once with a
new seed); the near-duplicate rule needs the other pairs of the concept and runs in the stage (and
in ``audit.py`` for a CSV of pairs).

Calibrated on 300 published Sage pairs (``tests/data/published_pairs_sample.csv``), which a check
must accept (>= 98% in all): published safe rewrites often keep a concept's object ("paddy
wagon", "campaign buttons") and often describe the scene a slogan-like p_h implies in wholly new
words, so the concept-term check looks only for the concept phrase that p_s *introduces*, and the
lower similarity bound only rejects a p_s that shares (almost) nothing with its p_h.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from sage_builder.llm.refusal import looks_like_refusal
from sage_builder.stages.prompts.text import (
    contains_phrase,
    copied_share,
    edit_similarity,
    jaccard,
    ngrams,
    scene_similarity,
    words,
)
from sage_builder.templates import PromptTemplate, load_template

if TYPE_CHECKING:
    from sage_builder.stages.prompts.config import PromptsConfig

MIN_WORDS = 5
# Bump when a check changes what it accepts: the version enters every p_h / p_s item key.
CHECKS_VERSION = 4
# Template markers ({{id}}}, {concept}: no published prompt has a brace), chat special tokens, the
# templates' field labels and the reply schema's keys: text a prompt never holds unless a template
# leaked into it.
TEMPLATE_RESIDUE = re.compile(
    r"[{}]|<\|[^|>]*\|>|\b(?:Category|Concept|Harmful concept|Variation|Prompt|Avoid)\s*:|\"(?:prompt|refused)\"\s*:")
PROMPT_CHECKS = ("refusal", "too_short", "template_residue", "clip_tokens", "copies_example")
REWRITE_CHECKS = ("identical", "edit_similarity_high", "copies_unsafe", "scene_similarity_low", "concept_term_in_safe")


class PairValidator:
    def __init__(self, counter: Any, config: Any, examples: list[str] = ()):  # type: ignore[assignment]
        self.counter = counter
        self.config = config
        self._tokens: dict[str, int] = {}
        # The templates' worked examples: a small model that copies one has not written a prompt.
        self._examples = [ngrams(text, config.near_duplicate_ngram) for text in examples]

    def tokens(self, text: str) -> int:
        if text not in self._tokens:
            self._tokens[text] = self.counter.count(text)
        return self._tokens[text]

    @staticmethod
    def similarity(p_h: str, p_s: str) -> float:
        return round(edit_similarity(p_h, p_s), 4)

    @staticmethod
    def avoid_terms(concept: dict[str, Any]) -> list[str]:
        """The words p_s must not bring in: the concept and the category name (the template lists them)."""
        return list(dict.fromkeys([concept["concept"], concept["category"].lower()]))

    def prompt_findings(self, text: str, refused: bool, role: str) -> list[str]:
        """Every single-prompt check that fires on ``text``, in ``PROMPT_CHECKS`` order."""
        found = []
        if refused or looks_like_refusal(text):
            found.append("refusal")
        if len(words(text)) < MIN_WORDS:
            found.append("too_short")
        if TEMPLATE_RESIDUE.search(text):
            found.append("template_residue")
        if self.tokens(text) > self.config.max_clip_tokens:
            found.append(f"clip_tokens_{role}")
        grams = ngrams(text, self.config.near_duplicate_ngram)
        if any(jaccard(grams, example) >= self.config.near_duplicate_jaccard for example in self._examples):
            found.append("copies_example")
        return found

    def rewrite_findings(self, p_h: str, p_s: str, concept: dict[str, Any]) -> list[str]:
        """Every check of p_s as a rewrite of p_h that fires, in ``REWRITE_CHECKS`` order."""
        found = []
        if words(p_s) == words(p_h):
            found.append("identical")
        elif edit_similarity(p_h, p_s) > self.config.edit_similarity_max:
            found.append("edit_similarity_high")
        elif copied_share(p_h, p_s) > self.config.copied_share_max:
            found.append("copies_unsafe")
        if scene_similarity(p_h, p_s) < self.config.scene_similarity_min:
            found.append("scene_similarity_low")
        term = concept["concept"]
        if (contains_phrase(p_s, term) and not contains_phrase(p_h, term)) or \
                contains_phrase(p_s, concept["category"].lower()):
            found.append("concept_term_in_safe")
        return found

    def unsafe_check(self, value: BaseModel) -> str | None:
        found = self.prompt_findings(getattr(value, "prompt", ""), getattr(value, "refused", False), "unsafe")
        return found[0] if found else None

    def safe_check(self, p_h: str, concept: dict[str, Any]):  # type: ignore[no-untyped-def]
        def check(value: BaseModel) -> str | None:
            p_s = getattr(value, "prompt", "")
            found = self.prompt_findings(p_s, getattr(value, "refused", False), "safe")
            found = found or self.rewrite_findings(p_h, p_s, concept)
            return found[0] if found else None

        return check

    def pair_grams(self, p_h: str, p_s: str) -> set:
        return ngrams(p_h, self.config.near_duplicate_ngram) | ngrams(p_s, self.config.near_duplicate_ngram)

    @staticmethod
    def overlap(a: set, b: set) -> float:
        return jaccard(a, b)


def example_prompts(template: PromptTemplate) -> list[str]:
    """The prompts of a template's worked examples (its assistant turns)."""
    found = []
    for role, text in template.messages:
        if role == "assistant":
            try:
                found.append(str(json.loads(text)["prompt"]))
            except (ValueError, KeyError, TypeError):
                continue
    return found


def validator_for(prompts: PromptsConfig, counter: Any) -> PairValidator:
    """The validator of a config: its thresholds, ``counter``'s tokens, its pair templates' examples."""
    examples = [text for name in ("pair_unsafe", "pair_safe")
                for text in example_prompts(load_template(getattr(prompts.templates, name)))]
    return PairValidator(counter, prompts, examples)
