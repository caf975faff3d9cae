"""Preference records: each user's dealt pairs become two records (caption u, caption s) per pair.

``label_users`` streams ``profiles.parquet`` in batches of users: each user draws K pairs per
category from the split's decks (``assign.Deck``, seeded by the user id), the label rule picks
chosen/rejected, and the batch's records go straight to the split writers, so memory does not
grow with users x pairs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sage_builder.errors import StageInputError
from sage_builder.progress import progress
from sage_builder.stages.label.assign import RECORD_SPLITS, Deck, choose_arrays, record_splits, user_rng
from sage_builder.stages.label.dataset import USER_COLUMNS, SplitWriter
from sage_builder.stages.label.inputs import PROFILE_COLUMNS

# (user position in the batch, pair position in the pair table, category banned for the user), per split
Dealt = dict[str, tuple[list[int], list[int], list[bool]]]


@dataclass
class Tally:
    """What the card and manifest report about the records written."""

    per_category: dict[str, Counter[str]] = field(default_factory=lambda: {s: Counter() for s in RECORD_SPLITS})
    chosen_safe: Counter[str] = field(default_factory=Counter)


def pair_records(users: pa.Table, pairs: pa.Table, user_pos: list[int], pair_pos: list[int],
                 is_banned: list[bool]) -> pa.Table:
    """Two records (caption u, caption s) per assigned pair, built column-wise."""
    n = len(user_pos)
    u_idx = pa.array(np.repeat(np.asarray(user_pos, dtype=np.int64), 2))
    p_idx = pa.array(np.repeat(np.asarray(pair_pos, dtype=np.int64), 2))
    variants = np.tile(np.array(["u", "s"]), n)
    chosen, rejected, reason = choose_arrays(np.repeat(np.asarray(is_banned, dtype=bool), 2), variants)
    p = pairs.take(p_idx)
    u = users.take(u_idx)
    caption = pc.if_else(pa.array(variants == "u"), p.column("prompt_unsafe"), p.column("prompt_safe"))
    cv = pa.array(variants)
    record_id = pc.binary_join_element_wise(u.column("user_id"), p.column("pair_id"), cv, "-")
    columns = {
        "record_id": record_id, "user_id": u.column("user_id"), "pair_id": p.column("pair_id"),
        "concept_id": p.column("concept_id"), "category": p.column("category"), "concept": p.column("concept"),
        "idx": p.column("idx"), "caption": caption, "caption_variant": cv, "chosen_variant": pa.array(chosen),
        "rejected_variant": pa.array(rejected), "reason": pa.array(reason, pa.string()),
    }
    for name in USER_COLUMNS:
        columns[name] = u.column(name)
    return pa.table(columns)


def deal_batch(users: pa.Table, decks: dict[tuple[str, str], Deck], categories: list[str], k: int, seed: int,
               profiles_path: Path, first_row: int) -> Dealt:
    """K pairs per category for every user of a batch, in id order, per record split."""
    known = set(categories)
    dealt: Dealt = {s: ([], [], []) for s in RECORD_SPLITS}
    for pos, (uid, role, seen, banned) in enumerate(zip(
            *(users.column(c).to_pylist() for c in ("user_id", "split", "test_seen", "banned")))):
        banned_set = set(banned or [])
        unknown = banned_set - known
        if unknown:
            raise StageInputError(f"{profiles_path} row {first_row + pos} (user {uid}): banned category "
                                  f"'{sorted(unknown)[0]}' is not in config.categories; rerun stage 1")
        rng = user_rng(seed, uid)
        for split in record_splits(role, bool(seen)):
            user_pos, pair_pos, is_banned = dealt[split]
            for category in categories:
                hand = decks[(split, category)].draw(rng, k)
                user_pos.extend([pos] * len(hand))
                pair_pos.extend(hand)
                is_banned.extend([category in banned_set] * len(hand))
    return dealt


def label_users(profiles: pq.ParquetFile, profiles_path: Path, pairs: pa.Table, decks: dict[tuple[str, str], Deck],
                categories: list[str], k: int, seed: int, batch_rows: int,
                writers: dict[str, SplitWriter]) -> Tally:
    """Deal and label every user of ``profiles``, writing each batch's records to its split's writer."""
    tally = Tally()
    per_user = len(categories) * k * 2
    n_rows = 0
    bar = progress(total=profiles.metadata.num_rows, desc="label users", unit="user")
    for batch in profiles.iter_batches(batch_size=max(1, batch_rows // per_user), columns=PROFILE_COLUMNS):
        users = pa.Table.from_batches([batch])
        dealt = deal_batch(users, decks, categories, k, seed, profiles_path, n_rows)
        for split, (user_pos, pair_pos, is_banned) in dealt.items():
            if user_pos:
                table = pair_records(users, pairs, user_pos, pair_pos, is_banned)
                for item in pc.value_counts(table.column("category")).to_pylist():
                    tally.per_category[split][item["values"]] += item["counts"]
                tally.chosen_safe[split] += pc.sum(pc.equal(table.column("chosen_variant"), "s")).as_py() or 0
                writers[split].write(table)
        n_rows += users.num_rows
        bar.update(users.num_rows)
    bar.close()
    return tally
