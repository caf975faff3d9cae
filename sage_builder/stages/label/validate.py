"""``sage validate DIR``: every problem a label dataset directory has, one line each.

Works on the directory alone (a local build or a copy downloaded from the Hub): the vocabulary,
embedding dimension and test prompt index come from the card's ``sage_builder`` front matter.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from sage_builder.errors import SageError
from sage_builder.stages.label.assign import RECORD_SPLITS, choose, uses_test_index
from sage_builder.stages.label.card import split_card

CHECKS = {
    "layout": "files the dataset directory must have",
    "missing-pair": "record whose pair is not in the pairs config",
    "image": "pair image that does not decode or whose sha256 does not match",
    "embedding": "user without an embedding, or of the wrong dimension",
    "label": "label that breaks the rule (banned -> safe; allowed -> own caption's image)",
    "leak": "val or test_unseen user present in train",
    "duplicate": "the same record twice",
    "category": "category outside the vocabulary",
    "index": "record whose prompt index does not belong to its split",
}


@dataclass
class Report:
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, message: str) -> None:
        self.problems[kind].append(message)

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def lines(self, limit: int = 50) -> list[str]:
        out = []
        for kind in CHECKS:
            items = self.problems.get(kind, [])
            for message in items[:limit]:
                out.append(f"{kind}: {message}")
            if len(items) > limit:
                out.append(f"{kind}: ... and {len(items) - limit} more")
        total = sum(len(v) for v in self.problems.values())
        summary = ", ".join(f"{k}={len(self.problems[k])}" for k in CHECKS if self.problems.get(k))
        out.append(f"{total} problem(s): {summary}" if total else
                   "ok: " + ", ".join(f"{k}={v}" for k, v in self.counts.items()))
        return out


def _files(root: Path, config: str, split: str) -> list[Path]:
    return sorted((root / "data" / config).glob(f"{split}-*.parquet"))


def _decodes(data: bytes | None) -> str | None:
    from PIL import Image

    if not data:
        return "no bytes"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the finding
        detail = re.sub(r" <[^>]*>", "", str(exc))[:80]  # drop the BytesIO repr PIL puts in its message
        return f"{exc.__class__.__name__}: {detail}"
    return None


def validate_dataset(root: Path | str, check_images: bool = True) -> Report:
    root = Path(root)
    report = Report()
    card = root / "README.md"
    if not root.is_dir():
        raise SageError(f"{root}: no such dataset directory (stage 4 writes RUN/label/dataset)")
    meta: dict[str, Any] = {}
    if card.exists():
        meta = (split_card(card.read_text())[0] or {}).get("sage_builder") or {}
    else:
        report.add("layout", f"{card}: missing (the card holds configs and the vocabulary)")
    vocabulary = set(meta.get("categories") or [])
    dim = meta.get("embedding_dim")
    test_index = meta.get("test_index")

    users: dict[str, dict[str, Any]] = {}
    user_files = _files(root, "users", "train")
    if not user_files:
        report.add("layout", f"{root / 'data/users'}: no users shards")
    for path in user_files:
        table = pq.read_table(path, columns=["user_id", "split", "banned", "embedding"])
        for row, rec in enumerate(table.to_pylist()):
            emb = rec.pop("embedding")
            users[rec["user_id"]] = rec
            if emb is None:
                report.add("embedding", f"{path.relative_to(root)} row {row}: user {rec['user_id']} has no embedding")
            elif dim is not None and len(emb) != dim:
                report.add("embedding", f"{path.relative_to(root)} row {row}: user {rec['user_id']} embedding has "
                                        f"dimension {len(emb)}, expected {dim}")
            for cat in rec["banned"] or []:
                if vocabulary and cat not in vocabulary:
                    report.add("category", f"{path.relative_to(root)} row {row}: user {rec['user_id']} bans "
                                           f"'{cat}', not in the vocabulary")

    pairs: set[str] = set()
    pair_files = _files(root, "pairs", "train")
    if not pair_files:
        report.add("layout", f"{root / 'data/pairs'}: no pairs shards (records cannot be checked against images)")
    for path in pair_files:
        parquet = pq.ParquetFile(path)
        columns = ["pair_id", "category"] + (["image_unsafe", "image_safe", "sha256_unsafe", "sha256_safe"]
                                             if check_images else [])
        row = 0
        for batch in parquet.iter_batches(batch_size=64, columns=columns):
            for rec in batch.to_pylist():
                pairs.add(rec["pair_id"])
                where = f"{path.relative_to(root)} row {row} (pair {rec['pair_id']})"
                if vocabulary and rec["category"] not in vocabulary:
                    report.add("category", f"{where}: category '{rec['category']}' is not in the vocabulary")
                if check_images:
                    for variant in ("unsafe", "safe"):
                        data = (rec[f"image_{variant}"] or {}).get("bytes")
                        error = _decodes(data)
                        if error:
                            report.add("image", f"{where}: image_{variant} does not decode ({error})")
                        elif hashlib.sha256(data).hexdigest() != rec[f"sha256_{variant}"]:
                            report.add("image", f"{where}: image_{variant} sha256 does not match sha256_{variant}")
                row += 1

    seen_records: dict[str, str] = {}
    seen_keys: dict[tuple[str, str, str], str] = {}
    users_in: dict[str, set[str]] = {s: set() for s in RECORD_SPLITS}
    missing_users: set[str] = set()
    for split in RECORD_SPLITS:
        files = _files(root, "preferences", split)
        if not files:
            report.add("layout", f"{root / 'data/preferences'}: no {split} shards")
        n = 0
        for path in files:
            rel = path.relative_to(root)
            table = pq.read_table(path, columns=["record_id", "user_id", "pair_id", "category", "idx",
                                                 "caption_variant", "chosen_variant", "rejected_variant",
                                                 "reason", "banned"])
            for row, rec in enumerate(table.to_pylist()):
                n += 1
                where = f"{rel} row {row} (record {rec['record_id']})"
                uid = rec["user_id"]
                users_in[split].add(uid)
                if pair_files and rec["pair_id"] not in pairs:
                    report.add("missing-pair", f"{where}: pair {rec['pair_id']} is not in the pairs config")
                if uid not in users:
                    if uid not in missing_users:
                        report.add("embedding", f"{where}: user {uid} is not in the users config (no embedding)")
                        missing_users.add(uid)
                banned = set(rec["banned"] or [])
                if uid in users and set(users[uid]["banned"] or []) != banned:
                    report.add("label", f"{where}: banned list differs from user {uid} in the users config")
                expected = choose(rec["category"] in banned, rec["caption_variant"])
                actual = (rec["chosen_variant"], rec["rejected_variant"], rec["reason"])
                if rec["caption_variant"] not in ("u", "s") or actual != expected:
                    report.add("label", f"{where}: chosen/rejected/reason {'/'.join(map(str, actual))} but "
                                        f"{rec['category']} {'is' if expected[2] == 'banned' else 'is not'} banned "
                                        f"for user {uid} and the caption is '{rec['caption_variant']}', so "
                                        f"{'/'.join(expected)}")
                if vocabulary and rec["category"] not in vocabulary:
                    report.add("category", f"{where}: category '{rec['category']}' is not in the vocabulary")
                if test_index is not None and (rec["idx"] == test_index) != uses_test_index(split):
                    report.add("index", f"{where}: prompt index {rec['idx']} in split {split} (test splits use "
                                        f"{test_index} only, train and val the others)")
                key = (uid, rec["pair_id"], rec["caption_variant"])
                if rec["record_id"] in seen_records:
                    report.add("duplicate", f"{where}: record_id also at {seen_records[rec['record_id']]}")
                elif key in seen_keys:
                    report.add("duplicate", f"{where}: user {uid}, pair {rec['pair_id']}, caption "
                                            f"{rec['caption_variant']} also at {seen_keys[key]}")
                seen_records.setdefault(rec["record_id"], f"{rel} row {row}")
                seen_keys.setdefault(key, f"{rel} row {row}")
        report.counts[split] = n
    for split in ("val", "test_unseen"):
        for uid in sorted(users_in[split] & users_in["train"]):
            report.add("leak", f"user {uid} has {split} records and train records")
    for uid in sorted(users_in["train"]):
        role = users.get(uid, {}).get("split")
        if role in ("val", "test_unseen"):
            report.add("leak", f"user {uid} has split role {role} in the users config but train records")
    report.counts["pairs"] = len(pairs)
    report.counts["users"] = len(users)
    return report
