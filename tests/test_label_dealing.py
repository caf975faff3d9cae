"""Dealing (stage 4): a user never gets two pairs of one concept within a category, pairs are used evenly."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sage_builder.errors import StageInputError
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.stages.label.assign import Deck, Pile, user_rng
from sage_builder.stages.label.dataset import hub_split
from sage_builder.testing.fake_run import make_fake_run


def deal(n_users: int, n_concepts: int, pairs_per_concept: list[int], k: int, seed: int = 7):
    """(hands, deck) for users 1..n over one pool; pair position -> concept is position // 100."""
    pool = [c * 100 + i for c in range(n_concepts) for i in range(pairs_per_concept[c])]
    deck = Deck(pool, [f"c{p // 100}" for p in pool])
    hands = [deck.draw(user_rng(seed, f"{u:07d}"), k) for u in range(1, n_users + 1)]
    return hands, deck


CASES = [(n_users, n_concepts, m, k) for n_users in (1, 7, 50, 333) for n_concepts in (3, 4, 11, 40)
         for m in (1, 2, 9) for k in (1, 2, 3) if n_concepts >= k]


@pytest.mark.parametrize("n_users,n_concepts,m,k", CASES)
def test_no_user_gets_a_concept_twice_and_use_is_even(n_users, n_concepts, m, k):
    hands, deck = deal(n_users, n_concepts, [m] * n_concepts, k)
    for hand in hands:
        assert len(hand) == k
        assert len({p // 100 for p in hand}) == k, hand  # k distinct concepts, hence k distinct pairs
    uses = Counter(p for hand in hands for p in hand)
    per_pair = [uses.get(p, 0) for p in deck.pool]
    assert max(per_pair) - min(per_pair) <= 1
    assert deck.spread() == (min(per_pair), max(per_pair))
    assert sorted(deck.pair_uses()) == sorted(per_pair)
    assert deck.repeats == 0


def test_unequal_concepts_keep_concept_use_even():
    sizes = [9, 9, 4, 1, 9, 7]
    hands, deck = deal(200, len(sizes), sizes, 3)
    assert all(len({p // 100 for p in hand}) == 3 for hand in hands)
    concept_uses = Counter(p // 100 for hand in hands for p in hand)
    assert max(concept_uses.values()) - min(concept_uses.values()) <= 1  # 600 draws over 6 concepts: 100 each
    for c, size in enumerate(sizes):  # within a concept, its pairs are used evenly
        uses = [Counter(p for hand in hands for p in hand).get(c * 100 + i, 0) for i in range(size)]
        assert max(uses) - min(uses) <= 1


def test_a_flat_pile_of_pairs_would_repeat_concepts():
    # The property above can fail: drawing K distinct *pairs* (the old dealing) repeats concepts.
    pool = [c * 100 + i for c in range(4) for i in range(9)]
    pile = Pile(pool)
    hands = [pile.draw(user_rng(7, f"{u:07d}"), 3) for u in range(1, 201)]
    assert sum(len({p // 100 for p in hand}) < 3 for hand in hands) > 0


def test_dealing_is_deterministic_per_seed():
    assert deal(50, 11, [9] * 11, 3)[0] == deal(50, 11, [9] * 11, 3)[0]
    assert deal(50, 11, [9] * 11, 3, seed=8)[0] != deal(50, 11, [9] * 11, 3)[0]


def test_pile_refuses_more_cards_than_it_holds():
    with pytest.raises(ValueError, match="3 distinct cards from a pile of 2"):
        Pile([1, 2]).draw(random.Random(0), 3)


def test_stage_records_never_repeat_a_concept(tmp_path):
    # 3 concepts x idx 1-9 per category and K = 3: every user must get each concept once per category.
    run, config = make_fake_run(tmp_path / "run", n_users=60, concepts_per_category=3, pairs_per_concept=10,
                                pairs_per_category=3, image_bytes=False, include_pairs=False)
    manifest = run_stage(get_stage("label"), config, run)
    dataset = run.stage("label").file("dataset")
    for split in ("train", "val", "test_seen", "test_unseen"):
        cells: dict[tuple[str, str], list[str]] = {}
        for path in sorted((dataset / "data/preferences").glob(f"{hub_split(split)}-*.parquet")):
            table = pq.read_table(path, columns=["user_id", "category", "concept_id", "pair_id", "caption_variant"])
            for rec in table.to_pylist():
                if rec["caption_variant"] == "u":
                    cells.setdefault((rec["user_id"], rec["category"]), []).append(rec["concept_id"])
        assert cells and all(len(v) == 3 == len(set(v)) for v in cells.values())
        assert manifest.stats["repeated_concepts"][split] == 0
        lo, hi = manifest.stats["pair_uses"][split]
        assert hi - lo <= 1
    # 54 train users x 3 pairs over 27 train pairs per category: 6 users per pair.
    assert manifest.stats["pair_uses"]["train"] == [6, 6] and manifest.stats["pair_uses_mean"]["train"] == 6.0


def test_pool_with_too_few_concepts_is_one_line(tmp_path):
    # 2 concepts x 3 train pairs = 6 pairs, enough pairs for K = 3 but not enough concepts.
    run, config = make_fake_run(tmp_path / "run", n_users=8, concepts_per_category=2, pairs_per_concept=4,
                                pairs_per_category=3, image_bytes=False)
    with pytest.raises(StageInputError) as err:
        run_stage(get_stage("label"), config, run)
    message = str(err.value)
    assert "\n" not in message and not run.stage("label").path.exists()
    assert "category 'Hate' has 2 concept(s) with rendered pairs at idx 1-3 (for train)" in message
    assert "a pool of at least 3 concepts" in message


def test_published_concept_pool_at_1000_users(tmp_path):
    # The 550 concepts of the published val/test splits (prompts/seed_concepts.csv), 10 indices each.
    import csv

    from sage_builder.config import DEFAULT_CATEGORIES

    by_lower = {c.lower(): c for c in DEFAULT_CATEGORIES}
    names: dict[str, list[str]] = {}
    with open(Path(__file__).resolve().parents[1] / "prompts" / "seed_concepts.csv", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            names.setdefault(by_lower[row["category"]], []).append(row["concept"])
    assert sum(len(v) for v in names.values()) == 550
    run, config = make_fake_run(tmp_path / "run", n_users=1000, pairs_per_concept=10, pairs_per_category=3,
                                image_bytes=False, include_pairs=False, concepts=names)
    manifest = run_stage(get_stage("label"), config, run)
    assert manifest.stats["repeated_concepts"] == {"train": 0, "val": 0, "test_seen": 0, "test_unseen": 0}
    repeats = 0
    for path in (run.stage("label").file("dataset") / "data/preferences").glob("*.parquet"):
        table = pq.read_table(path, columns=["user_id", "category", "concept_id", "caption_variant"])
        cells = Counter((r["user_id"], r["category"], r["concept_id"]) for r in table.to_pylist()
                        if r["caption_variant"] == "u")
        repeats += sum(n > 1 for n in cells.values())
    assert repeats == 0
