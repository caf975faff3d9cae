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
from sage_builder.stages.label.dataset import hub_split, shard_files

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
    "card": "dataset card (README.md) whose counts disagree with the shards",
    "manifest": "file that differs from the label manifest (README.md: the card was edited or overwritten)",
}


@dataclass
class Report:
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    counts: dict[str, int] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=lambda: CHECKS)  # kinds, in the order lines() lists them

    def add(self, kind: str, message: str) -> None:
        self.problems[kind].append(message)

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def lines(self, limit: int = 50) -> list[str]:
        out = []
        for kind in self.checks:
            items = self.problems.get(kind, [])
            for message in items[:limit]:
                out.append(f"{kind}: {message}")
            if len(items) > limit:
                out.append(f"{kind}: ... and {len(items) - limit} more")
        total = sum(len(v) for v in self.problems.values())
        summary = ", ".join(f"{k}={len(self.problems[k])}" for k in self.checks if self.problems.get(k))
        out.append(f"{total} problem(s): {summary}" if total else
                   "ok: " + ", ".join(f"{k}={v}" for k, v in self.counts.items()))
        return out


def decode_error(data: bytes | None) -> str | None:
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


def _card_meta(root: Path, report: Report) -> dict[str, Any]:
    """The card's ``sage_builder`` front matter (vocabulary, embedding dimension, test index)."""
    card = root / "README.md"
    if not card.exists():
        report.add("layout", f"{card}: missing (the card holds configs and the vocabulary)")
        return {}
    return (split_card(card.read_text())[0] or {}).get("sage_builder") or {}


def _check_users(root: Path, report: Report, vocabulary: set[str], dim: int | None) -> dict[str, dict[str, Any]]:
    """Users by id (split role, banned list); embeddings and banned categories checked on the way."""
    users: dict[str, dict[str, Any]] = {}
    user_files = shard_files(root, "users", "train")
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
    return users


def _check_pair_images(report: Report, where: str, rec: dict[str, Any]) -> None:
    for variant in ("unsafe", "safe"):
        data = (rec[f"image_{variant}"] or {}).get("bytes")
        error = decode_error(data)
        if error:
            report.add("image", f"{where}: image_{variant} does not decode ({error})")
        elif hashlib.sha256(data).hexdigest() != rec[f"sha256_{variant}"]:
            report.add("image", f"{where}: image_{variant} sha256 does not match sha256_{variant}")


def _check_pairs(root: Path, report: Report, vocabulary: set[str], check_images: bool) -> set[str] | None:
    """Pair ids of the pairs config (None when it has no shards); categories and images checked."""
    pair_files = shard_files(root, "pairs", "train")
    if not pair_files:
        report.add("layout", f"{root / 'data/pairs'}: no pairs shards (records cannot be checked against images)")
        return None
    pairs: set[str] = set()
    columns = ["pair_id", "category"] + (["image_unsafe", "image_safe", "sha256_unsafe", "sha256_safe"]
                                         if check_images else [])
    for path in pair_files:
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=columns):
            for rec in batch.to_pylist():
                pairs.add(rec["pair_id"])
                where = f"{path.relative_to(root)} row {row} (pair {rec['pair_id']})"
                if vocabulary and rec["category"] not in vocabulary:
                    report.add("category", f"{where}: category '{rec['category']}' is not in the vocabulary")
                if check_images:
                    _check_pair_images(report, where, rec)
                row += 1
    return pairs


@dataclass
class RecordChecks:
    """The per-record checks of the preferences config, with what they remember across records."""

    report: Report
    users: dict[str, dict[str, Any]]
    pairs: set[str] | None
    vocabulary: set[str]
    test_index: int | None
    seen_records: dict[str, str] = field(default_factory=dict)
    seen_keys: dict[tuple[str, str, str], str] = field(default_factory=dict)
    missing_users: set[str] = field(default_factory=set)

    def check(self, rec: dict[str, Any], split: str, at: str) -> None:
        """``at`` is "FILE row N"; every problem of the record is added to the report."""
        report, uid = self.report, rec["user_id"]
        where = f"{at} (record {rec['record_id']})"
        if self.pairs is not None and rec["pair_id"] not in self.pairs:
            report.add("missing-pair", f"{where}: pair {rec['pair_id']} is not in the pairs config")
        if uid not in self.users and uid not in self.missing_users:
            report.add("embedding", f"{where}: user {uid} is not in the users config (no embedding)")
            self.missing_users.add(uid)
        self.check_label(rec, where)
        if self.vocabulary and rec["category"] not in self.vocabulary:
            report.add("category", f"{where}: category '{rec['category']}' is not in the vocabulary")
        if self.test_index is not None and (rec["idx"] == self.test_index) != uses_test_index(split):
            report.add("index", f"{where}: prompt index {rec['idx']} in split {split} (test splits use "
                                f"{self.test_index} only, train and val the others)")
        self.check_duplicate(rec, where, at)

    def check_label(self, rec: dict[str, Any], where: str) -> None:
        uid = rec["user_id"]
        banned = set(rec["banned"] or [])
        if uid in self.users and set(self.users[uid]["banned"] or []) != banned:
            self.report.add("label", f"{where}: banned list differs from user {uid} in the users config")
        expected = choose(rec["category"] in banned, rec["caption_variant"])
        actual = (rec["chosen_variant"], rec["rejected_variant"], rec["reason"])
        if rec["caption_variant"] not in ("u", "s") or actual != expected:
            self.report.add("label", f"{where}: chosen/rejected/reason {'/'.join(map(str, actual))} but "
                                     f"{rec['category']} {'is' if expected[2] == 'banned' else 'is not'} banned "
                                     f"for user {uid} and the caption is '{rec['caption_variant']}', so "
                                     f"{'/'.join(expected)}")

    def check_duplicate(self, rec: dict[str, Any], where: str, at: str) -> None:
        uid = rec["user_id"]
        key = (uid, rec["pair_id"], rec["caption_variant"])
        if rec["record_id"] in self.seen_records:
            self.report.add("duplicate", f"{where}: record_id also at {self.seen_records[rec['record_id']]}")
        elif key in self.seen_keys:
            self.report.add("duplicate", f"{where}: user {uid}, pair {rec['pair_id']}, caption "
                                         f"{rec['caption_variant']} also at {self.seen_keys[key]}")
        self.seen_records.setdefault(rec["record_id"], at)
        self.seen_keys.setdefault(key, at)


RECORD_COLUMNS = ["record_id", "user_id", "pair_id", "category", "idx", "caption_variant", "chosen_variant",
                  "rejected_variant", "reason", "banned"]


def _check_records(root: Path, checks: RecordChecks) -> dict[str, set[str]]:
    """Every record of every split through ``checks``; returns the users seen per split."""
    users_in: dict[str, set[str]] = {s: set() for s in RECORD_SPLITS}
    for split in RECORD_SPLITS:
        files = shard_files(root, "preferences", split)
        if not files:
            checks.report.add("layout", f"{root / 'data/preferences'}: no {hub_split(split)} shards")
        n = 0
        for path in files:
            rel = path.relative_to(root)
            for row, rec in enumerate(pq.read_table(path, columns=RECORD_COLUMNS).to_pylist()):
                n += 1
                users_in[split].add(rec["user_id"])
                checks.check(rec, split, f"{rel} row {row}")
        checks.report.counts[split] = n
    return users_in


def _check_leaks(report: Report, users: dict[str, dict[str, Any]], users_in: dict[str, set[str]]) -> None:
    for split in ("val", "test_unseen"):
        for uid in sorted(users_in[split] & users_in["train"]):
            report.add("leak", f"user {uid} has {split} records and train records")
    for uid in sorted(users_in["train"]):
        role = users.get(uid, {}).get("split")
        if role in ("val", "test_unseen"):
            report.add("leak", f"user {uid} has split role {role} in the users config but train records")


def validate_dataset(root: Path | str, check_images: bool = True) -> Report:
    root = Path(root)
    report = Report()
    if not root.is_dir():
        raise SageError(f"{root}: no such dataset directory (stage 4 writes RUN/label/dataset)")
    meta = _card_meta(root, report)
    vocabulary = set(meta.get("categories") or [])
    users = _check_users(root, report, vocabulary, meta.get("embedding_dim"))
    pairs = _check_pairs(root, report, vocabulary, check_images)
    checks = RecordChecks(report, users, pairs, vocabulary, meta.get("test_index"))
    users_in = _check_records(root, checks)
    _check_leaks(report, users, users_in)
    report.counts["pairs"] = len(pairs or ())
    report.counts["users"] = len(users)
    _check_card(root, report)
    _check_manifest(root, report)
    return report


def _check_card(root: Path, report: Report) -> None:
    """The card's ``dataset_info`` row counts and ``sage_builder.records`` against the shards as counted."""
    card = root / "README.md"
    if not card.exists():
        return
    meta = split_card(card.read_text())[0] or {}
    written = {hub_split(s): report.counts.get(s) for s in RECORD_SPLITS}
    for entry in meta.get("dataset_info") or []:
        if entry.get("config_name") != "preferences":
            continue
        for split in entry.get("splits") or []:
            name, n = split.get("name"), split.get("num_examples")
            if name not in written:
                report.add("card", f"README.md: dataset_info lists a preferences split '{name}' the shards lack")
            elif n != written[name]:
                report.add("card", f"README.md: dataset_info says preferences/{name} has {n} records, the shards "
                                   f"hold {written[name]}")
    for split, n in ((meta.get("sage_builder") or {}).get("records") or {}).items():
        actual = report.counts.get(split, report.counts.get({"validation": "val"}.get(split, split)))
        if actual is not None and n != actual:
            report.add("card", f"README.md: sage_builder.records says {split} has {n} records, the shards hold "
                               f"{actual}")


def label_manifest_of(root: Path) -> Path | None:
    """The label manifest describing ``root``: ``RUN/label/manifest.json`` beside ``RUN/label/dataset``, or
    ``manifests/label.json`` in a published copy."""
    for path in (root.parent / "manifest.json", root / "manifests" / "label.json"):
        if path.is_file():
            return path
    return None


def _check_manifest(root: Path, report: Report) -> None:
    """Every ``dataset/`` file of the label manifest is there with its size and sha256, and no other shard."""
    import json

    from sage_builder.store import file_sha256

    path = label_manifest_of(root)
    if path is None:
        return
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        report.add("manifest", f"{path.name}: not readable JSON ({exc})")
        return
    if data.get("stage") != "label":
        return
    listed = {rel.removeprefix("dataset/"): out for rel, out in (data.get("outputs") or {}).items()
              if rel.startswith("dataset/")}
    fix = "rerun `sage stage label --force`, or restore the file"
    for rel, out in sorted(listed.items()):
        file = root / rel
        if not file.is_file():
            report.add("manifest", f"{rel}: listed in {path.name} but missing; {fix}")
        elif file.stat().st_size != out.get("bytes") or file_sha256(file) != out.get("sha256"):
            what = "the card was edited or overwritten since stage 4 wrote it" if rel == "README.md" else \
                "its bytes differ"
            report.add("manifest", f"{rel}: differs from {path.name} ({what}); {fix}")
    for file in sorted((root / "data").rglob("*.parquet")) if (root / "data").is_dir() else []:
        rel = file.relative_to(root).as_posix()
        if rel not in listed:
            report.add("manifest", f"{rel}: not listed in {path.name} (a stray shard `datasets` would load)")
