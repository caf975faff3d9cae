"""The rules a prompt pair must pass; each failure is a short reason stored in the rejects table.

Single-prompt rules run as the LLM request's ``check`` (a failing reply is retried at once with a
new seed); the near-duplicate rule needs the other pairs of the concept and runs in the stage.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from sage_builder.llm.refusal import looks_like_refusal
from sage_builder.stages.prompts.text import content_words, contains_phrase, edit_similarity, jaccard, ngrams, words

MIN_WORDS = 5


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

    def avoid_terms(self, concept: dict[str, Any]) -> list[str]:
        """The words p_s must not contain: the concept, its content words, the category name."""
        terms = [concept["concept"], concept["category"].lower()]
        terms += [w for w in content_words(concept["concept"]) if w not in terms]
        return list(dict.fromkeys(terms))

    def _common(self, value: BaseModel, role: str) -> str | None:
        text = getattr(value, "prompt", "")
        if getattr(value, "refused", False) or looks_like_refusal(text):
            return "refusal"
        if len(words(text)) < MIN_WORDS:
            return "too_short"
        if self.tokens(text) > self.config.max_clip_tokens:
            return f"clip_tokens_{role}"
        grams = ngrams(text, self.config.near_duplicate_ngram)
        if any(jaccard(grams, example) >= self.config.near_duplicate_jaccard for example in self._examples):
            return "copies_example"
        return None

    def unsafe_check(self, value: BaseModel) -> str | None:
        return self._common(value, "unsafe")

    def safe_check(self, p_h: str, concept: dict[str, Any]):  # type: ignore[no-untyped-def]
        def check(value: BaseModel) -> str | None:
            reason = self._common(value, "safe")
            if reason:
                return reason
            p_s = value.prompt  # type: ignore[attr-defined]
            if words(p_s) == words(p_h):
                return "identical"
            similarity = edit_similarity(p_h, p_s)
            if similarity > self.config.edit_similarity_max:
                return "edit_similarity_high"
            if similarity < self.config.edit_similarity_min:
                return "edit_similarity_low"
            for term in self.avoid_terms(concept):
                if contains_phrase(p_s, term):
                    return "concept_term_in_safe"
            return None

        return check

    def pair_grams(self, p_h: str, p_s: str) -> set:
        return ngrams(p_h, self.config.near_duplicate_ngram) | ngrams(p_s, self.config.near_duplicate_ngram)

    @staticmethod
    def overlap(a: set, b: set) -> float:
        return jaccard(a, b)
