"""The concept pool of a category: seeds from data, LLM additions, and the dedupe between them.

Two concepts are the same when they differ only in case, whitespace, punctuation or plural form
('Troll farms' = 'troll farm'), in word order ('abuse of authority' = 'authority abuse'), by a
spelling variant (string similarity >= ``FUZZY_RATIO`` on the normal form), or when a synonym
group in ``prompts/concept_synonyms.txt`` lists both. The first one kept wins; every later one is
dropped with the reason and the concept it duplicates.
"""

from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from sage_builder.errors import StageInputError
from sage_builder.llm.refusal import looks_like_refusal
from sage_builder.stages.prompts.text import STOPWORDS, normal_form, normal_words
from sage_builder.store import stable_hash

FUZZY_RATIO = 0.92
MAX_CONCEPT_WORDS = 6


@dataclass(frozen=True)
class SeedConcept:
    category: str
    concept: str
    description: str | None
    weight: int


def concept_id(category: str, concept: str) -> str:
    """Stable id: the category and the concept's normal form, nothing about run or order."""
    return "c-" + stable_hash(category.lower(), normal_form(concept), length=12)


def load_seeds(path: Path, categories: list[str]) -> dict[str, list[SeedConcept]]:
    """Seeds per configured category (case-insensitive match), most frequent in published data first."""
    if not path.exists():
        raise StageInputError(f"prompts.seed_concepts: {path} does not exist")
    by_name = {c.lower(): c for c in categories}
    seeds: dict[str, list[SeedConcept]] = {c: [] for c in categories}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"category", "concept"} - set(reader.fieldnames or [])
        if missing:
            raise StageInputError(f"prompts.seed_concepts: {path} lacks the column(s) {sorted(missing)}; "
                                  f"expected category,concept[,description][,records_in_published_val_test]")
        for line, row in enumerate(reader, start=2):
            category = by_name.get((row.get("category") or "").strip().lower())
            concept = " ".join((row.get("concept") or "").split())
            if category is None or not concept:
                continue
            weight = row.get("records_in_published_val_test") or "0"
            try:
                weight_value = int(weight)
            except ValueError:
                raise StageInputError(f"prompts.seed_concepts: {path} line {line}: "
                                      f"records_in_published_val_test '{weight}' is not an integer") from None
            description = " ".join((row.get("description") or "").split()) or None
            seeds[category].append(SeedConcept(category, concept, description, weight_value))
    for category in seeds:
        seeds[category].sort(key=lambda s: (-s.weight, s.concept.lower()))
    return seeds


def load_synonyms(path: Path) -> list[set[str]]:
    """Groups of near-synonyms, one '|'-separated group a line; '#' starts a comment."""
    if not path.exists():
        raise StageInputError(f"prompts.synonyms: {path} does not exist")
    groups = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            group = {normal_form(term) for term in line.split("|") if term.strip()}
            if len(group) > 1:
                groups.append(group)
    return groups


@dataclass
class Dropped:
    category: str
    concept: str
    source: str
    reason: str
    duplicate_of: str | None


@dataclass
class ConceptPool:
    """The kept concepts of one category, in the order they were kept."""

    category: str
    synonyms: list[set[str]]
    kept: list[dict] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    _normal: dict[str, str] = field(default_factory=dict)
    _compact: dict[str, str] = field(default_factory=dict)
    _wordset: dict[frozenset, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.kept)

    def names(self) -> list[str]:
        return [row["concept"] for row in self.kept]

    def _duplicate(self, concept: str) -> tuple[str, str] | None:
        norm = normal_form(concept)
        if norm in self._normal:
            return "duplicate", self._normal[norm]
        compact = norm.replace(" ", "")
        if compact in self._compact:
            return "duplicate", self._compact[compact]
        wordset = frozenset(w for w in normal_words(concept) if w not in STOPWORDS)
        if wordset in self._wordset:
            return "duplicate_word_order", self._wordset[wordset]
        for group in self.synonyms:
            if norm in group:
                for other_norm, other in self._normal.items():
                    if other_norm in group:
                        return "near_synonym", other
        for other_norm, other in self._normal.items():
            if difflib.SequenceMatcher(None, norm, other_norm).ratio() >= FUZZY_RATIO:
                return "near_synonym_spelling", other
        return None

    def offer(self, concept: str, description: str | None, source: str) -> bool:
        """Keep ``concept`` unless it is invalid or a duplicate; return whether it was kept."""
        concept = " ".join(concept.split()).strip(" .,;:-\"'")
        reason, other = None, None
        if not concept or not normal_form(concept):
            reason = "empty"
        elif looks_like_refusal(concept) or looks_like_refusal(description or ""):
            reason = "refusal"
        elif len(concept.split()) > MAX_CONCEPT_WORDS or len(concept) > 60:
            reason = "not_a_concept"
        else:
            found = self._duplicate(concept)
            if found:
                reason, other = found
        if reason:
            self.dropped.append(Dropped(self.category, concept, source, reason, other))
            return False
        norm = normal_form(concept)
        self._normal[norm] = concept
        self._compact[norm.replace(" ", "")] = concept
        self._wordset[frozenset(w for w in normal_words(concept) if w not in STOPWORDS)] = concept
        self.kept.append({"concept_id": concept_id(self.category, concept), "category": self.category,
                          "concept": concept, "description": description, "source": source})
        return True
