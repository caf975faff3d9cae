"""``sage import --format psalign``: the PSA authors' layout read back into this project's label dataset.

Input: a folder with ``<split>/metadata.jsonl`` + JPEGs (splits ``train``, ``val``, ``test_seen``,
``test_unseen``), an embeddings folder (``{User_ID}.npy``) and a users file in the published
``users.csv`` format. Output: ``RUN/label/dataset/`` with the ``preferences``, ``pairs`` and
``users`` configs, its card, and ``RUN/label/manifest.json`` in the stage-4 shape, so that
``sage validate``, ``sage publish`` and ``sage stage train`` take it as they take stage 4's own.

Ids are rebuilt, since the layout keeps none but the user's:
- ``user_id`` = ``User_ID``; users are rows of the users file (row i = user i);
- a pair is one (category, concept, idx), read from the file names (category matched
  case-insensitively against the configured categories, underscores in the concept read as
  spaces); ``pair_id`` = ``p-`` + stable_hash("psalign", category, concept, idx)[:16],
  ``concept_id`` = ``c-`` + stable_hash("psalign", category, concept)[:12];
- ``record_id`` = ``{user_id}-{pair_id}-{u|s}``, the stage's own construction.

The records are streamed line by line and written as they are read; what is held is per pair
(captions, where the first copy of each image is) and per user, never per record, so memory
stays flat in the number of records. A pair's images are the first copy met; later users' copies
are compared with it by sha256 (``check_copies``).

Input that cannot be imported is a one-line StageInputError (exit 2), and nothing is written (the
dataset is built in ``dataset.tmp`` and moved into place at the end). What can be imported but
looks wrong is a *problem*: one line naming the file and line, all of them in
``RUN/label/import_problems.txt``; ``strict`` turns any problem into a failure.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sage_builder.errors import SageError, StageInputError
from sage_builder.progress import progress
from sage_builder.schemas import profiles_schema
from sage_builder.stages.label.assign import RECORD_SPLITS, choose, uses_test_index
from sage_builder.stages.label.card import generated_blocks, render_card
from sage_builder.stages.label.dataset import (
    PAIR_SCHEMA, PREFERENCE_SCHEMA, SINGLE_SPLIT, SplitWriter, features_for,
)
from sage_builder.stages.label.psalign_input import (
    DEMOGRAPHICS, PsalignUser, embedding_dim, iter_records, load_embedding, model_hidden_size, parse_record,
    read_users_csv, record_names, split_lines,
)
from sage_builder.stages.label.summary import hub_configs, split_size
from sage_builder.stages.label.validate import Report, decode_error
from sage_builder.store import Manifest, RunDir, atomic_write_text, file_sha256, package_versions, stable_hash

IMPORT_CHECKS = {
    "label": "chosen/rejected that break the rule for the user's banned list (banned -> safe; allowed -> own "
             "caption's image)",
    "caption": "a pair whose caption differs between records",
    "image": "a pair image that does not decode",
    "copy": "a user's copy of a pair image that differs from the first copy (the first copy is imported)",
    "user": "record user_data that differs from the users file, or a user without an embedding",
    "index": "a record whose prompt index does not belong to its split",
}
BATCH_RECORDS = 4096
IMPORTED_NAME = "Sage (imported from the psalign layout)"
PAIR_BATCH = 256
USER_BATCH = 64


@dataclass
class PairState:
    """One (category, concept, idx): its captions and the first copy of each image."""

    pair_id: str
    concept_id: str
    category: str
    concept: str
    idx: int
    captions: dict[str, tuple[str, str]] = field(default_factory=dict)  # variant -> (caption, where)
    images: dict[str, tuple[Path, str, str]] = field(default_factory=dict)  # variant -> (path, sha256, where)
    uses: Counter[str] = field(default_factory=Counter)  # split -> users (records captioned u)
    last_copy: dict[str, str] = field(default_factory=dict)  # variant -> the copy checked last


@dataclass
class SplitTally:
    records: int = 0
    chosen_safe: int = 0
    users: set[str] = field(default_factory=set)
    per_category: Counter[str] = field(default_factory=Counter)
    hands: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))  # (user, cat) -> concepts


def pair_key_ids(category: str, concept: str, idx: int) -> tuple[str, str]:
    """(pair_id, concept_id) of an imported pair."""
    return ("p-" + stable_hash("psalign", category, concept, idx, length=16),
            "c-" + stable_hash("psalign", category, concept, length=12))


def cluster_of(value: Any) -> int | None:
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else None


class PsalignImport:
    """One import: ``scan`` checks what can be checked up front, ``write`` streams the dataset."""

    def __init__(self, source: Path, embeddings: Path, users_file: Path, categories: list[str],
                 test_index: int | None = None, check_copies: bool = True):
        self.source, self.embeddings, self.users_file = Path(source), Path(embeddings), Path(users_file)
        self.categories = list(categories)
        self.by_lower = {c.lower(): c for c in self.categories}
        self.test_index = test_index
        self.check_copies = check_copies
        self.report = Report(checks=IMPORT_CHECKS)
        self.pairs: dict[tuple[str, str, int], PairState] = {}
        self.tallies = {s: SplitTally() for s in RECORD_SPLITS}
        self.user_splits: dict[str, set[str]] = defaultdict(set)
        self.user_cluster: dict[str, int | None] = {}
        self.users: dict[str, PsalignUser] = {}
        self.splits: dict[str, int] = {}
        self.split_dirs: dict[str, str] = {}
        self.with_embedding: set[str] = set()
        self.dim = 0

    def scan(self) -> None:
        """Split files, record counts, the users file and the embeddings' size; one line on bad input."""
        if not self.source.is_dir():
            raise StageInputError(f"{self.source}: no such folder (a psalign export: <split>/metadata.jsonl + JPEGs)")
        first_test: tuple[str, str] | None = None  # (where, line) of the first test record
        for split in RECORD_SPLITS:
            folder = self.source / split
            if not folder.is_dir():
                continue
            if not (folder / "metadata.jsonl").is_file():
                raise StageInputError(f"{folder}: no metadata.jsonl (a psalign split folder holds metadata.jsonl "
                                      f"and its JPEGs)")
            self.splits[split], first = split_lines(folder / "metadata.jsonl")
            if uses_test_index(split) and first and first_test is None:
                first_test = (f"{folder / 'metadata.jsonl'} (first record)", first)
        if not self.splits:
            raise StageInputError(f"{self.source}: no metadata.jsonl in any of {', '.join(RECORD_SPLITS)} "
                                  f"(expected <split>/metadata.jsonl)")
        if self.test_index is None:
            self.test_index = 10  # the published test index, when there is no test split to read it from
            if first_test is not None:
                where, line = first_test
                self.test_index = record_names(parse_record(line, where), self.by_lower, where).idx
        self.users = read_users_csv(self.users_file, self.categories)
        self.dim = embedding_dim(self.embeddings, list(self.users))
        self.with_embedding = {uid for uid in self.users if (self.embeddings / f"{uid}.npy").is_file()}
        self.split_dirs = {split: str(self.source / split) for split in self.splits}

    def _pair(self, names: Any) -> PairState:
        key = (names.category, names.concept, names.idx)
        if key not in self.pairs:
            pair_id, concept_id = pair_key_ids(*key)
            self.pairs[key] = PairState(pair_id, concept_id, *key)
        return self.pairs[key]

    def _image(self, pair: PairState, split: str, name: str, variant: str, where: str) -> None:
        path = os.path.join(self.split_dirs[split], name)  # str paths: this runs twice per record
        if not os.path.isfile(path):
            raise StageInputError(f"{where}: image {name} is missing from {self.source / split}")
        first = pair.images.get(variant)
        if first is None:
            pair.images[variant] = (Path(path), file_sha256(Path(path)) if self.check_copies else "", where)
        elif self.check_copies and pair.last_copy.get(variant) != path and str(first[0]) != path:
            # A user's two records (caption u, caption s) name the same copy: it is hashed once.
            pair.last_copy[variant] = path
            if file_sha256(Path(path)) != first[1]:
                self.report.add("copy", f"{where}: {split}/{name} differs from the first copy "
                                        f"{first[0].relative_to(self.source)} ({first[2]})")

    def _check_record(self, names: Any, user: PsalignUser, meta: dict[str, Any], split: str, where: str) -> str:
        """Rule, caption and user checks of one record; returns the rule's reason."""
        banned = names.category in user.banned
        expected = choose(banned, names.caption_variant)
        if (names.chosen_variant, names.rejected_variant) != expected[:2]:
            self.report.add("label", f"{where}: chosen {names.chosen_variant} / rejected {names.rejected_variant}, but "
                                     f"{names.category} is {'' if banned else 'not '}banned for user {user.user_id} "
                                     f"({self.users_file.name} line {user.line}) and the caption is "
                                     f"{names.caption_variant}, so {expected[0]} / {expected[1]}")
        pair = self._pair(names)
        caption = str(meta["caption"])
        known = pair.captions.setdefault(names.caption_variant, (caption, where))
        if known[0] != caption:
            self.report.add("caption", f"{where}: the {names.caption_variant} caption of ({names.category}, "
                                       f"{names.concept}, {names.idx}) differs from the one at {known[1]}")
        if (names.idx == self.test_index) != uses_test_index(split):
            self.report.add("index", f"{where}: prompt index {names.idx} in split {split} (test splits use "
                                     f"{self.test_index} only, train and val the others)")
        if user.user_id not in self.user_cluster:
            self.user_cluster[user.user_id] = cluster_of(meta["user_data"].get("Cluster_ID"))
            differs = [k for k, ours in DEMOGRAPHICS.items()
                       if str(meta["user_data"].get(k)) != str(user.demographics[ours])]
            if differs:
                self.report.add("user", f"{where}: user_data {differs[0]} {meta['user_data'].get(differs[0])!r} "
                                        f"differs from {self.users_file.name} line {user.line} "
                                        f"({user.demographics[DEMOGRAPHICS[differs[0]]]!r}); the users file is used")
        return expected[2]

    def _record(self, split: str, meta: dict[str, Any], where: str) -> dict[str, Any]:
        names = record_names(meta, self.by_lower, where)
        user = self.users.get(names.user_id)
        if user is None:
            raise StageInputError(f"{where}: user {names.user_id} is not in {self.users_file} ({len(self.users)} "
                                  f"users; row i is user i); use the users file of this dataset")
        if user.user_id not in self.with_embedding:
            raise StageInputError(f"{where}: user {user.user_id} has no {self.embeddings / (user.user_id + '.npy')}; "
                                  f"every user with records needs an embedding")
        reason = self._check_record(names, user, meta, split, where)
        pair = self._pair(names)
        for name, variant in ((meta["chosen"], names.chosen_variant), (meta["rejected"], names.rejected_variant)):
            self._image(pair, split, name, variant, where)
        tally = self.tallies[split]
        tally.records += 1
        tally.chosen_safe += names.chosen_variant == "s"
        tally.users.add(user.user_id)
        tally.per_category[names.category] += 1
        if names.caption_variant == "u":
            pair.uses[split] += 1
            tally.hands[(user.user_id, names.category)].append(pair.concept_id)
        self.user_splits[user.user_id].add(split)
        return {"record_id": f"{user.user_id}-{pair.pair_id}-{names.caption_variant}", "user_id": user.user_id,
                "pair_id": pair.pair_id, "concept_id": pair.concept_id, "category": names.category,
                "concept": names.concept, "idx": names.idx, "caption": str(meta["caption"]),
                "caption_variant": names.caption_variant, "chosen_variant": names.chosen_variant,
                "rejected_variant": names.rejected_variant, "reason": reason, **user.demographics,
                "banned": user.banned, "cluster_id": self.user_cluster.get(user.user_id)}

    def _write_split(self, root: Path, split: str, shard_rows: int) -> SplitWriter:
        writer = SplitWriter(root, "preferences", split, PREFERENCE_SCHEMA, self.splits.get(split, 0), shard_rows)
        if split not in self.splits:
            return writer
        label = f"{self.source / split / 'metadata.jsonl'}"
        rows: list[dict[str, Any]] = []
        bar = progress(total=self.splits[split], desc=f"import {split}", unit="record")
        for n, meta in iter_records(self.source / split / "metadata.jsonl", label):
            rows.append(self._record(split, meta, f"{split}/metadata.jsonl line {n}"))
            if len(rows) >= BATCH_RECORDS:
                writer.write(pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA))
                bar.update(len(rows))
                rows = []
        if rows:
            writer.write(pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA))
            bar.update(len(rows))
        bar.close()
        return writer

    def _pair_row(self, pair: PairState) -> dict[str, Any]:
        row: dict[str, Any] = {"pair_id": pair.pair_id, "concept_id": pair.concept_id, "category": pair.category,
                               "concept": pair.concept, "idx": pair.idx, "seed": None}
        for variant, column in (("u", "unsafe"), ("s", "safe")):
            caption = pair.captions.get(variant)
            if caption is None:
                self.report.add("caption", f"({pair.category}, {pair.concept}, {pair.idx}): no record is captioned "
                                           f"with its {column} prompt, so prompt_{column} is empty")
            row[f"prompt_{column}"] = caption[0] if caption else None
            path, _, where = pair.images[variant]
            data = path.read_bytes()
            error = decode_error(data)
            if error:
                self.report.add("image", f"{where}: {path.relative_to(self.source)} does not decode ({error})")
            row[f"image_{column}"] = {"bytes": data, "path": f"{pair.pair_id}_{variant}.jpg"}
            row[f"sha256_{column}"] = hashlib.sha256(data).hexdigest()
        return row

    def _write_pairs(self, root: Path, shard_rows: int) -> SplitWriter:
        order = {c: i for i, c in enumerate(self.categories)}
        pairs = sorted(self.pairs.values(), key=lambda p: (order[p.category], p.concept, p.idx))
        writer = SplitWriter(root, "pairs", SINGLE_SPLIT, PAIR_SCHEMA, len(pairs), shard_rows)
        bar = progress(total=len(pairs), desc="import pairs", unit="pair")
        for start in range(0, len(pairs), PAIR_BATCH):
            chunk = [self._pair_row(p) for p in pairs[start:start + PAIR_BATCH]]
            writer.write(pa.Table.from_pylist(chunk, schema=PAIR_SCHEMA))
            bar.update(len(chunk))
        bar.close()
        return writer

    def _user_row(self, user: PsalignUser) -> dict[str, Any]:
        splits = self.user_splits.get(user.user_id, set())
        role = next((r for r in ("train", "val", "test_unseen") if r in splits),
                    "train" if "test_seen" in splits else "reference")
        if len(splits - {"test_seen"}) > 1:
            self.report.add("user", f"user {user.user_id}: records in {', '.join(sorted(splits))} (a val or "
                                    f"test_unseen user must not be in train); imported with split role {role}")
        embedding = load_embedding(self.embeddings, user.user_id)
        if embedding is None:
            self.report.add("user", f"{self.users_file.name} line {user.line}: user {user.user_id} has no "
                                    f"{user.user_id}.npy in the embeddings folder")
        return {"user_id": user.user_id, **user.demographics, "banned": user.banned, "allowed": user.allowed,
                "labeller": "file", "embedding": embedding, "cluster_id": self.user_cluster.get(user.user_id),
                "level": None, "split": role, "test_seen": "test_seen" in splits}

    def _users_table(self, rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
        """Rows to a table, the embeddings as one float32 block (Python floats would cost ~7x the memory)."""
        vectors = [row.pop("embedding") for row in rows]
        at = schema.get_field_index("embedding")
        table = pa.Table.from_pylist(rows, schema=schema.remove(at))
        flat = np.concatenate([v if v is not None else np.zeros(self.dim, np.float32) for v in vectors])
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), self.dim,
                                                   mask=pa.array([v is None for v in vectors]))
        return table.add_column(at, schema.field("embedding"), column)

    def _write_users(self, root: Path, shard_rows: int) -> SplitWriter:
        schema = profiles_schema(self.dim)
        writer = SplitWriter(root, "users", SINGLE_SPLIT, schema, len(self.users), shard_rows)
        rows: list[dict[str, Any]] = []
        for user in self.users.values():
            rows.append(self._user_row(user))
            if len(rows) >= USER_BATCH:
                writer.write(self._users_table(rows, schema))
                rows = []
        if rows:
            writer.write(self._users_table(rows, schema))
        return writer

    def write(self, root: Path, shard_rows: Any) -> dict[str, Any]:
        """Write the three configs under ``root``; returns what the card and the manifest report."""
        writers = {s: self._write_split(root, s, shard_rows.preferences) for s in RECORD_SPLITS}
        files = [rel for w in writers.values() for rel in w.close()]
        pairs_writer = self._write_pairs(root, shard_rows.pairs)
        users_writer = self._write_users(root, shard_rows.users)
        files += users_writer.close() + pairs_writer.close()
        split_sizes = {"preferences": {s: split_size(w) for s, w in writers.items()},
                       "pairs": {SINGLE_SPLIT: split_size(pairs_writer)},
                       "users": {SINGLE_SPLIT: split_size(users_writer)}}
        features = {"preferences": features_for(PREFERENCE_SCHEMA), "pairs": features_for(PAIR_SCHEMA),
                    "users": features_for(users_writer.schema)}
        configs_yaml, info_yaml = hub_configs(split_sizes, features)
        return {"files": files, "configs": configs_yaml, "dataset_info": info_yaml, **self.figures()}

    def figures(self) -> dict[str, Any]:
        """Counts per split, pair use and repeated concepts, in the shape the label card reads."""
        counts = {}
        for s in RECORD_SPLITS:
            t = self.tallies[s]
            uses = [p.uses[s] for p in self.pairs.values() if p.uses[s]]
            counts[s] = {"records": t.records, "users": len(t.users), "per_category": dict(t.per_category),
                         "chosen_safe_share": t.chosen_safe / t.records if t.records else 0.0,
                         "pair_uses_min": min(uses, default=0), "pair_uses_max": max(uses, default=0),
                         "pair_uses_mean": sum(uses) / len(uses) if uses else 0.0,
                         "repeated_concepts": sum(len(set(v)) < len(v) for v in t.hands.values())}
        per_hand = Counter(len(v) for t in self.tallies.values() for v in t.hands.values())
        n_records = sum(c["records"] for c in counts.values())
        return {"splits": list(RECORD_SPLITS), "categories": self.categories, "counts": counts,
                "n_records": n_records, "pairs_per_category": per_hand.most_common(1)[0][0] if per_hand else 0,
                "test_index": self.test_index,
                "chosen_safe_share": sum(t.chosen_safe for t in self.tallies.values()) / n_records if n_records else 0.0,
                "n_users_with_records": len(self.user_splits),
                "n_pairs": len(self.pairs), "n_users": len(self.users), "embedding_dim": self.dim}


@dataclass
class ImportResult:
    dataset: Path
    counts: dict[str, int]
    report: Report
    problems_file: Path | None


def _check_run_dir(run: RunDir) -> None:
    """Import into a run of its own: never over stage 1-4 outputs this project made."""
    for stage in ("profiles", "prompts", "render"):
        if run.stage(stage).manifest_path.exists():
            raise StageInputError(f"{run.stage(stage).manifest_path}: this run has its own stage '{stage}'; "
                                  f"import into a new --run-dir")
    label = run.stage("label").read_manifest()
    if label is not None and "imported" not in label.stats:
        raise StageInputError(f"{run.stage('label').manifest_path}: this run has its own stage 4 dataset; import "
                              f"into a new --run-dir")


def _check_embedding_model(job: PsalignImport, embedding_model: str | None, key: str) -> None:
    if not embedding_model:
        return
    hidden = model_hidden_size(embedding_model)
    if hidden != job.dim:
        raise StageInputError(f"{job.embeddings}: the embeddings are {job.dim}-d, but {key} {embedding_model} has "
                              f"hidden size {hidden}; pass the model that made them as --embedding-model (the "
                              f"published Sage: Qwen/Qwen2.5-7B-Instruct, 3,584)")


def _card_info(job: PsalignImport, info: dict[str, Any], embedding_model: str | None) -> dict[str, Any]:
    sources = {f"{s}/metadata.jsonl": file_sha256(job.source / s / "metadata.jsonl") for s in job.splits}
    sources[job.users_file.name] = file_sha256(job.users_file)
    info["settings"] = {
        "source": f"psalign folder {job.source.name} (sage import)", "users file": job.users_file.name,
        "embeddings": f"{job.dim}-d float32 from {job.embeddings.name}/",
        "embedding model": embedding_model or "not given",
        "ids": "rebuilt: one pair per (category, concept, idx), pair_id/concept_id hashed from them",
    }
    info["lineage"] = {"psalign import": {"content_hash": stable_hash(sources),
                                          "fingerprint": stable_hash(job.categories, job.test_index)}}
    info["sage_meta"] = {"categories": job.categories, "embedding_dim": job.dim,
                         "pairs_per_category": info["pairs_per_category"], "test_index": job.test_index,
                         "records": {s: info["counts"][s]["records"] for s in RECORD_SPLITS},
                         "imported_from": "psalign", "embedding_model": embedding_model}
    return info


def _manifest(run: RunDir, info: dict[str, Any], job: PsalignImport, embedding_model: str | None,
              started: float) -> Manifest:
    stage_dir = run.stage("label")
    outputs = stage_dir.describe_outputs([f"dataset/{rel}" for rel in ["README.md", *info["files"]]])
    counts, finished = info["counts"], time.time()
    problems = {k: len(v) for k, v in job.report.problems.items() if v}
    stats = {"records": {s: counts[s]["records"] for s in RECORD_SPLITS},
             "users": {s: counts[s]["users"] for s in RECORD_SPLITS},
             "chosen_safe_share": round(info["chosen_safe_share"], 4),
             "pair_uses": {s: [counts[s]["pair_uses_min"], counts[s]["pair_uses_max"]] for s in RECORD_SPLITS},
             "pair_uses_mean": {s: round(counts[s]["pair_uses_mean"], 4) for s in RECORD_SPLITS},
             "repeated_concepts": {s: counts[s]["repeated_concepts"] for s in RECORD_SPLITS},
             "pairs": info["n_pairs"], "dataset": "label/dataset",
             "imported": {"format": "psalign", "source": job.source.name, "problems": problems}}
    lineage = info["lineage"]["psalign import"]
    return Manifest(stage="label", fingerprint=stable_hash("import", "psalign", lineage),
                    config_hash=lineage["fingerprint"], models={"embedding": {"model": embedding_model,
                                                                              "dim": job.dim}},
                    outputs=outputs, rows={k: v.rows for k, v in outputs.items() if v.rows is not None},
                    packages=package_versions(), started_at=started, finished_at=finished,
                    seconds=round(finished - started, 3), stats=stats)


def import_psalign(source: Path | str, embeddings: Path | str, users_file: Path | str, run_dir: Path | str,
                   config: Any = None, embedding_model: str | None = None, test_index: int | None = None,
                   check_copies: bool = True, strict: bool = False) -> ImportResult:
    """Import a psalign folder into ``RUN/label``; bad input raises before anything is moved into place."""
    from sage_builder.config import DEFAULT_CATEGORIES
    from sage_builder.stages.label.config import LabelConfig
    from sage_builder.stages.publish.config import PublishConfig

    started = time.time()
    run = RunDir(run_dir)
    _check_run_dir(run)
    categories = list(config.categories) if config is not None else list(DEFAULT_CATEGORIES)
    if test_index is None and config is not None:
        test_index = config.prompts.pairs_per_concept
    key = "--embedding-model"
    if embedding_model is None and config is not None:
        embedding_model = config.profiles.embedding_model or config.llm.model
        key = "profiles.embedding_model" if config.profiles.embedding_model else "llm.model (profiles.embedding_model)"
    label_config = config.label if config is not None else LabelConfig(pretty_name=IMPORTED_NAME)
    job = PsalignImport(Path(source), Path(embeddings), Path(users_file), categories, test_index, check_copies)
    job.scan()
    _check_embedding_model(job, embedding_model, key)
    stage_dir = run.stage("label")
    tmp = stage_dir.file("dataset.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = _card_info(job, job.write(tmp, label_config.shard_rows), embedding_model)
        if strict and not job.report.ok:
            raise SageError(f"{sum(len(v) for v in job.report.problems.values())} problem(s) in {job.source} "
                            f"(first: {job.report.lines(1)[0]}); nothing written (--strict)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out = stage_dir.file("dataset")
    stage_dir.invalidate()
    shutil.rmtree(out, ignore_errors=True)
    meta = {"license": (config.publish if config is not None else PublishConfig()).license,
            "pretty_name": label_config.pretty_name, "configs": info.pop("configs"),
            "dataset_info": info.pop("dataset_info"), "sage_meta": info["sage_meta"], "n_records": info["n_records"]}
    atomic_write_text(tmp / "README.md", render_card(None, meta, generated_blocks(info), label_config.pretty_name))
    tmp.rename(out)
    problems_file = None
    if not job.report.ok:
        problems_file = stage_dir.file("import_problems.txt")
        atomic_write_text(problems_file, "\n".join(job.report.lines(limit=10**9)) + "\n")
    stage_dir.write_manifest(_manifest(run, info, job, embedding_model, started))
    counts = {s: info["counts"][s]["records"] for s in RECORD_SPLITS}
    counts.update(pairs=info["n_pairs"], users=info["n_users"])
    return ImportResult(out, counts, job.report, problems_file)
