"""Stage 4 dealing on the 550 published concepts: users per pair, repeated concepts, old vs new.

A synthetic run (``sage_builder.testing.fake_run``) with the concepts of ``prompts/seed_concepts.csv``
(the 550 concepts of the published val/test splits; hate 89 ... shocking 112), 10 prompt indices
per concept, ``--users`` users split 900/50/50 (+50 test_seen) per 1,000 and K = 3, labelled by the
real stage. From the records written it counts, per split, users per pair over every pair of the
split's pools (min/mean/max) and user-category cells that hold one concept twice. The same users
are then dealt again with the previous dealing (K distinct pairs from one flat pile per pool, same
per-user generators) to count its repeats, and both dealings are timed alone (ratio new/old).

    python benchmarks/bench_label_dealing.py [--users 1000] [--concepts prompts/seed_concepts.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("SAGE_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402

from sage_builder.config import DEFAULT_CATEGORIES  # noqa: E402
from sage_builder.stages import get_stage  # noqa: E402
from sage_builder.stages.base import run_stage  # noqa: E402
from sage_builder.stages.label.assign import RECORD_SPLITS, Deck, Pile, build_pools, record_splits, user_rng  # noqa: E402
from sage_builder.stages.label.inputs import rendered_pairs  # noqa: E402
from sage_builder.testing.fake_run import make_fake_run  # noqa: E402


def published_concepts(path: Path) -> dict[str, list[str]]:
    by_lower = {c.lower(): c for c in DEFAULT_CATEGORIES}
    names: dict[str, list[str]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            names[by_lower[row["category"].lower()]].append(row["concept"])
    return dict(names)


def record_stats(dataset: Path, pools: dict, pairs) -> dict[str, dict]:
    """Users per pair (over the whole pool) and repeated-concept cells, counted from the records."""
    pair_ids = pairs.column("pair_id").to_pylist()
    out = {}
    for split in RECORD_SPLITS:
        users_of: dict[str, set[str]] = defaultdict(set)
        cells: dict[tuple[str, str], list[str]] = defaultdict(list)
        for path in sorted((dataset / "data/preferences").glob(f"{split}-*.parquet")):
            table = pq.read_table(path, columns=["user_id", "pair_id", "category", "concept_id", "caption_variant"])
            for rec in table.to_pylist():
                users_of[rec["pair_id"]].add(rec["user_id"])
                if rec["caption_variant"] == "u":
                    cells[(rec["user_id"], rec["category"])].append(rec["concept_id"])
        per_pool = {c: [len(users_of.get(pair_ids[i], ())) for i in pool] for (s, c), pool in pools.items()
                    if s == split}
        uses = [n for pool_uses in per_pool.values() for n in pool_uses]
        out[split] = {"pairs_in_pools": len(uses), "users_per_pair_min": min(uses),
                      "per_category_min_max": {c: [min(v), max(v)] for c, v in per_pool.items()},
                      "users_per_pair_mean": round(sum(uses) / len(uses), 3), "users_per_pair_max": max(uses),
                      "user_category_cells": len(cells),
                      "cells_repeating_a_concept": sum(len(set(v)) < len(v) for v in cells.values())}
    return out


def deal_all(profiles: list[dict], pools: dict, concept_ids: list[str], categories: list[str], k: int, seed: int,
             flat: bool) -> tuple[float, dict[str, int]]:
    """Seconds to deal every user, and repeated-concept cells per split (old flat pile or new deck)."""
    decks = {key: Pile(list(pool)) if flat else Deck(pool, [concept_ids[i] for i in pool])
             for key, pool in pools.items()}
    repeats: Counter[str] = Counter()
    t0 = time.perf_counter()
    for user in profiles:
        rng = user_rng(seed, user["user_id"])
        for split in record_splits(user["split"], bool(user["test_seen"])):
            for category in categories:
                hand = decks[(split, category)].draw(rng, k)
                repeats[split] += len({concept_ids[i] for i in hand}) < len(hand)
    return time.perf_counter() - t0, {s: repeats[s] for s in RECORD_SPLITS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--concepts", type=Path, default=ROOT / "prompts" / "seed_concepts.csv")
    args = parser.parse_args()
    names = published_concepts(args.concepts)
    with tempfile.TemporaryDirectory(prefix="bench-dealing-") as tmp:
        run, config = make_fake_run(Path(tmp) / "run", n_users=args.users, pairs_per_concept=10,
                                    pairs_per_category=args.k, image_bytes=False, include_pairs=False,
                                    concepts=names)
        t0 = time.perf_counter()
        manifest = run_stage(get_stage("label"), config, run)
        stage_seconds = time.perf_counter() - t0
        pairs = rendered_pairs(run)
        categories = list(config.categories)
        pools = build_pools(pairs, categories, 10, args.k, run.stage("prompts").file("pairs.parquet"))
        stats = record_stats(run.stage("label").file("dataset"), pools, pairs)
        profiles = pq.read_table(run.stage("profiles").file("profiles.parquet"),
                                 columns=["user_id", "split", "test_seen"]).to_pylist()
        concept_ids = pairs.column("concept_id").to_pylist()
        old_s, old_repeats = deal_all(profiles, pools, concept_ids, categories, args.k, config.seed, flat=True)
        new_s, new_repeats = deal_all(profiles, pools, concept_ids, categories, args.k, config.seed, flat=False)
    print(json.dumps({
        "users": args.users, "k": args.k, "concepts": {c: len(v) for c, v in names.items()},
        "records": manifest.stats["records"], "stage_seconds": round(stage_seconds, 2),
        "from_records": stats, "manifest_repeated_concepts": manifest.stats["repeated_concepts"],
        "old_dealing_cells_repeating_a_concept": old_repeats, "new_dealing_cells_repeating_a_concept": new_repeats,
        "deal_seconds_old": round(old_s, 3), "deal_seconds_new": round(new_s, 3),
        "deal_new_over_old": round(new_s / old_s, 2) if old_s else None,
    }, indent=1))


if __name__ == "__main__":
    main()
