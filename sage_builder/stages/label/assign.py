"""Which pairs each user gets, and which image each record prefers (SPEC §4).

Assignment: per record split and category there is one *deck* holding the pool of pairs that
split may use (test splits: the reserved last prompt index N; train and val: 1..N-1). Users are
dealt in id order, each with a generator seeded by the user id. A deck deals in two levels, so
that a user never gets two pairs of the same concept within one category (the published data
never does): the user draws K distinct *concepts* from the pool's concepts, then one pair of each
drawn concept from that concept's own pairs. Both levels are piles that are refilled whole when
they run out, so every concept of a pool is drawn equally often (max - min <= 1), and so is every
pair of a concept. When a pool's concepts have equally many pairs (always so for the test pools,
one pair per concept) every pair of the pool is used equally often (max - min <= 1); a concept
with fewer rendered pairs uses each of its pairs more often. A pool needs at least K concepts.

Label rule: category banned -> the safe image is chosen in both records of the pair; allowed ->
the image rendered from the record's own caption is chosen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sage_builder.errors import StageInputError

RECORD_SPLITS = ("train", "val", "test_seen", "test_unseen")


def record_splits(role: str, test_seen: bool) -> list[str]:
    """Record splits a user of this split role contributes to (the reference user: none)."""
    if role == "train":
        return ["train", "test_seen"] if test_seen else ["train"]
    if role in ("val", "test_unseen"):
        return [role]
    return []


def uses_test_index(split: str) -> bool:
    return split.startswith("test")


def choose(category_banned: bool, caption_variant: str) -> tuple[str, str, str]:
    """(chosen_variant, rejected_variant, reason) of one record."""
    if category_banned:
        return "s", "u", "banned"
    return caption_variant, ("s" if caption_variant == "u" else "u"), "allowed"


def choose_arrays(category_banned: np.ndarray, caption_variant: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`choose` over arrays of records (the same rule, vectorized for the stage)."""
    chosen = np.where(category_banned, "s", caption_variant)
    rejected = np.where(chosen == "u", "s", "u")
    reason = np.where(category_banned, "banned", "allowed")
    return chosen, rejected, reason


@dataclass
class Pile:
    """Cards dealt evenly: every card once before any card twice; a hand never holds a card twice."""

    cards: list[Any]
    remaining: list[Any] = field(default_factory=list)
    uses: dict[Any, int] = field(default_factory=dict)

    def draw(self, rng: random.Random, k: int) -> list[Any]:
        if k > len(self.cards):
            raise ValueError(f"cannot draw {k} distinct cards from a pile of {len(self.cards)}")
        hand: list[Any] = []
        while len(hand) < k:
            if not self.remaining:
                self.remaining = list(self.cards)
            # A card already in the hand (only possible right after a refill) stays in the pile.
            while True:
                i = rng.randrange(len(self.remaining))
                card = self.remaining[i]
                if card not in hand:
                    break
            self.remaining[i] = self.remaining[-1]
            self.remaining.pop()
            hand.append(card)
            self.uses[card] = self.uses.get(card, 0) + 1
        return hand


class Deck:
    """The pool of one (split, category): K distinct concepts per hand, then one pair of each."""

    def __init__(self, pool: list[int], concepts: list[str]):
        by_concept: dict[str, list[int]] = {}
        for position, concept in zip(pool, concepts):
            by_concept.setdefault(concept, []).append(position)
        self.pool = list(pool)
        self.concepts = Pile(list(by_concept))
        self.pairs = {concept: Pile(positions) for concept, positions in by_concept.items()}
        self.repeats = 0  # hands holding a concept twice (0 by construction; counted, not assumed)

    def draw(self, rng: random.Random, k: int) -> list[int]:
        concepts = self.concepts.draw(rng, k)
        self.repeats += len(concepts) != len(set(concepts))
        return [self.pairs[concept].draw(rng, 1)[0] for concept in concepts]

    def pair_uses(self) -> list[int]:
        """Users per pair, for every pair of the pool (a user never holds a pair twice)."""
        return [pile.uses.get(position, 0) for pile in self.pairs.values() for position in pile.cards]

    def spread(self) -> tuple[int, int]:
        counts = self.pair_uses()
        return (min(counts), max(counts)) if counts else (0, 0)


def user_rng(seed: int, user_id: str) -> random.Random:
    # random.Random seeds a str through SHA-512: the same on every machine and Python run.
    return random.Random(f"sage-label:{seed}:{user_id}")


def build_pools(pairs: pa.Table, categories: list[str], test_index: int, k: int, pairs_path: Path) -> dict[tuple[str, str], list[int]]:
    """Positions (in ``pairs``) each (record split, category) may draw from; K must fit every pool."""
    cats = pairs.column("category").to_pylist()
    idxs = pairs.column("idx").to_pylist()
    rows = pairs.column("row").to_pylist()
    known = set(categories)
    for cat, row in zip(cats, rows):
        if cat not in known:
            raise StageInputError(f"{pairs_path} row {row}: category '{cat}' is not in config.categories "
                                  f"({', '.join(categories)}); fix the categories list or rerun stage 2")
    pools: dict[tuple[str, str], list[int]] = {}
    for split in RECORD_SPLITS:
        test = uses_test_index(split)
        for category in categories:
            pools[(split, category)] = [i for i, (c, x) in enumerate(zip(cats, idxs))
                                        if c == category and ((x == test_index) if test else (x < test_index))]
    concept_ids = pairs.column("concept_id").to_pylist()
    for (split, category), pool in pools.items():
        n_concepts = len({concept_ids[i] for i in pool})
        if n_concepts < k:
            where = f"idx {test_index}" if uses_test_index(split) else f"idx 1-{test_index - 1}"
            shown = ", ".join(str(rows[i]) for i in pool[:8]) or "none"
            raise StageInputError(
                f"{pairs_path} rows {shown}: category '{category}' has {n_concepts} concept(s) with rendered pairs "
                f"at {where} (for {split}), and dealing label.pairs_per_category={k} pairs per user without "
                f"repeating a concept needs a pool of at least {k} concepts; lower label.pairs_per_category "
                f"or generate more concepts/pairs")
    return pools
