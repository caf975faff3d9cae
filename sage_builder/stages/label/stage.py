"""Stage 4 (label): per-user preference records, written as a Hub-layout dataset directory.

Reads ``profiles/profiles.parquet``, ``prompts/pairs.parquet`` and ``render/index.parquet`` (+ the
render shards for image bytes) and writes ``label/dataset/`` (see ``dataset.py`` and ``card.py``).
Labelling streams: users are read in batches and their records written as they are made, so memory
does not grow with users x pairs. The whole stage takes seconds to minutes, so it is not resumed at
item granularity: an interrupted run leaves the previous dataset untouched and simply reruns.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sage_builder.errors import StageInputError
from sage_builder.progress import progress
from sage_builder.stages.base import Stage, StageContext, StagePlan
from sage_builder.stages.label.assign import (
    RECORD_SPLITS, Deck, choose_arrays, record_splits, user_rng, uses_test_index,
)
from sage_builder.stages.label.card import generated_blocks, render_card
from sage_builder.stages.label.dataset import (
    PAIR_SCHEMA, PREFERENCE_SCHEMA, SINGLE_SPLIT, USER_COLUMNS, SplitWriter, features_for,
)
from sage_builder.store import RunDir, atomic_write_text, file_sha256

log = logging.getLogger("sage.label")

PAIR_COLUMNS = ["pair_id", "concept_id", "category", "concept", "idx", "prompt_unsafe", "prompt_safe"]
PROFILE_COLUMNS = ["user_id", *USER_COLUMNS, "split", "test_seen"]
ROLES = {"train", "val", "test_unseen", "reference"}


def check_inputs(run: RunDir) -> None:
    """Upstream outputs exist, match their manifests, and come from one run (lineage hashes agree)."""
    manifests = {}
    for stage, files in (("profiles", ["profiles.parquet"]), ("prompts", ["pairs.parquet"]),
                         ("render", ["index.parquet"])):
        stage_dir = run.stage(stage)
        manifest = stage_dir.read_manifest()
        if manifest is None:
            raise StageInputError(f"{stage_dir.manifest_path}: missing, so stage '{stage}' is not done; "
                                  f"run `sage stage {stage} --run-dir {run.root}` first")
        for rel in files:
            path = stage_dir.file(rel)
            if not path.exists():
                raise StageInputError(f"{path}: missing (stage '{stage}' output); rerun `sage stage {stage} "
                                      f"--run-dir {run.root} --force`")
            recorded = manifest.outputs.get(rel)
            if recorded is not None and file_sha256(path) != recorded.sha256:
                raise StageInputError(f"{path}: sha256 does not match {stage_dir.manifest_path} (the file comes "
                                      f"from another run or was edited); restore it or rerun `sage stage {stage}`")
        manifests[stage] = manifest
    for stage, manifest in manifests.items():
        for upstream, recorded in manifest.inputs.items():
            if upstream in manifests and manifests[upstream].content_hash() != recorded:
                raise StageInputError(
                    f"{run.stage(upstream).manifest_path}: hash {manifests[upstream].content_hash()[:12]} is not the "
                    f"input {recorded[:12]} that {run.stage(stage).manifest_path} was built from (outputs of "
                    f"different runs are mixed); rerun `sage stage {stage} --run-dir {run.root}`")


def rendered_pairs(run: RunDir) -> pa.Table:
    """Rows of pairs.parquet whose two images are both rendered, in file order, with ``row``."""
    pairs_path = run.stage("prompts").file("pairs.parquet")
    pairs = pq.read_table(pairs_path, columns=PAIR_COLUMNS)
    pairs = pairs.append_column("row", pa.array(range(pairs.num_rows), pa.int64()))
    index = pq.read_table(run.stage("render").file("index.parquet"), columns=["pair_id", "variant"])
    have: dict[str, set[str]] = defaultdict(set)
    for pid, variant in zip(index.column("pair_id").to_pylist(), index.column("variant").to_pylist()):
        have[pid].add(variant)
    mask = [have.get(pid) == {"u", "s"} for pid in pairs.column("pair_id").to_pylist()]
    return pairs.filter(pa.array(mask, pa.bool_()))


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
    for (split, category), pool in pools.items():
        if len(pool) < k:
            where = f"idx {test_index}" if uses_test_index(split) else f"idx 1-{test_index - 1}"
            shown = ", ".join(str(rows[i]) for i in pool[:8]) or "none"
            raise StageInputError(
                f"{pairs_path} rows {shown}: category '{category}' has {len(pool)} rendered pairs with {where} "
                f"(for {split}), fewer than label.pairs_per_category={k}; lower label.pairs_per_category "
                f"or generate more concepts/pairs")
    return pools


class LabelStage(Stage):
    name = "label"
    number = 4
    inputs = ("profiles", "prompts", "render")
    summary = "per-user preference records, splits and the Hub-layout dataset directory"

    def fingerprint_parts(self, config: Any) -> dict[str, Any]:
        return {"seed": config.seed, "categories": config.categories,
                "test_index": config.prompts.pairs_per_concept, "license": config.publish.license}

    def check(self, config: Any, run: RunDir) -> None:
        check_inputs(run)
        pairs = rendered_pairs(run)
        build_pools(pairs, config.categories, config.prompts.pairs_per_concept,
                    config.label.pairs_per_category, run.stage("prompts").file("pairs.parquet"))

    def plan(self, config: Any) -> StagePlan:
        k = config.label.pairs_per_category
        splits = config.profiles.splits
        # Record-bearing users per 1,000: train + val + test_unseen, plus test_seen counted again.
        per_thousand = splits.train + splits.val + splits.test_unseen + splits.test_seen
        users = config.profiles.n_users * per_thousand / max(1, splits.train + splits.val + splits.test_unseen)
        records = round(users) * len(config.categories) * k * 2
        return StagePlan(items=int(records), unit="records",
                         notes=[f"{k} pairs per category per user, 2 records per pair"])

    def run(self, ctx: StageContext) -> None:
        config = ctx.config
        label = config.label
        out = ctx.stage_dir.file("dataset")
        tmp = ctx.stage_dir.file("dataset.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            info = self._write(ctx, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        existing = (out / "README.md").read_text() if (out / "README.md").exists() else None
        shutil.rmtree(out / "data", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        (tmp / "data").rename(out / "data")
        shutil.rmtree(tmp, ignore_errors=True)
        meta = {"license": config.publish.license, "pretty_name": label.pretty_name,
                "configs": info.pop("configs"), "dataset_info": info.pop("dataset_info"),
                "sage_meta": info["sage_meta"], "n_records": info["n_records"]}
        card = render_card(existing, meta, generated_blocks(info), label.pretty_name)
        atomic_write_text(out / "README.md", card)
        for rel in ["README.md", *info["files"]]:
            ctx.add_output(f"dataset/{rel}")
        ctx.stats.update({
            "records": {s: info["counts"][s]["records"] for s in info["splits"]},
            "users": {s: info["counts"][s]["users"] for s in info["splits"]},
            "chosen_safe_share": round(info["chosen_safe_share"], 4),
            "pair_uses": {s: [info["counts"][s]["pair_uses_min"], info["counts"][s]["pair_uses_max"]]
                          for s in info["splits"]},
            "pairs": info["n_pairs"], "dataset": str(out),
        })

    def _write(self, ctx: StageContext, root: Path) -> dict[str, Any]:
        config, run, label = ctx.config, ctx.run, ctx.config.label
        categories = list(config.categories)
        k = label.pairs_per_category
        test_index = config.prompts.pairs_per_concept
        profiles_path = run.stage("profiles").file("profiles.parquet")
        pairs_path = run.stage("prompts").file("pairs.parquet")
        pairs = rendered_pairs(run)
        pools = build_pools(pairs, categories, test_index, k, pairs_path)
        decks = {key: Deck(pool) for key, pool in pools.items()}

        # Without pre-buffering, pyarrow decodes a row group page by page: stage 1 may write all users
        # (embeddings included) as one row group, and memory must not grow with it.
        profiles = pq.ParquetFile(profiles_path, pre_buffer=False, buffer_size=1 << 20)
        missing = [c for c in PROFILE_COLUMNS + ["embedding", "allowed", "level"]
                   if c not in profiles.schema_arrow.names]
        if missing:
            raise StageInputError(f"{profiles_path}: missing column(s) {', '.join(missing)}; rerun stage 1")
        # First pass: users per record split, so that shard names can say "-of-MMMMM".
        users_per_split: Counter[str] = Counter()
        row = 0
        for batch in profiles.iter_batches(batch_size=8192, columns=["user_id", "split", "test_seen"]):
            for uid, role, seen in zip(*(batch.column(c).to_pylist() for c in range(3))):
                if role not in ROLES:
                    raise StageInputError(f"{profiles_path} row {row} (user {uid}): split '{role}' is not one of "
                                          f"{', '.join(sorted(ROLES))}; rerun stage 1")
                for split in record_splits(role, bool(seen)):
                    users_per_split[split] += 1
                row += 1
        per_user = len(categories) * k * 2
        writers = {s: SplitWriter(root, "preferences", s, PREFERENCE_SCHEMA, users_per_split[s] * per_user,
                                  label.shard_rows.preferences) for s in RECORD_SPLITS}
        per_category: dict[str, Counter[str]] = {s: Counter() for s in RECORD_SPLITS}
        chosen_safe: Counter[str] = Counter()
        known = set(categories)
        n_rows = 0
        bar = progress(total=profiles.metadata.num_rows, desc="label users", unit="user")
        for batch in profiles.iter_batches(batch_size=max(1, label.batch_rows // per_user),
                                           columns=PROFILE_COLUMNS):
            users = pa.Table.from_batches([batch])
            assigned: dict[str, tuple[list[int], list[int], list[bool]]] = {s: ([], [], []) for s in RECORD_SPLITS}
            for pos, (uid, role, seen, banned) in enumerate(zip(
                    *(users.column(c).to_pylist() for c in ("user_id", "split", "test_seen", "banned")))):
                banned_set = set(banned or [])
                unknown = banned_set - known
                if unknown:
                    raise StageInputError(f"{profiles_path} row {n_rows + pos} (user {uid}): banned category "
                                          f"'{sorted(unknown)[0]}' is not in config.categories; rerun stage 1")
                rng = user_rng(config.seed, uid)
                for split in record_splits(role, bool(seen)):
                    user_pos, pair_pos, is_banned = assigned[split]
                    for category in categories:
                        hand = decks[(split, category)].draw(rng, k)
                        user_pos.extend([pos] * len(hand))
                        pair_pos.extend(hand)
                        is_banned.extend([category in banned_set] * len(hand))
            for split, (user_pos, pair_pos, is_banned) in assigned.items():
                if user_pos:
                    table = self._records(users, pairs, user_pos, pair_pos, is_banned)
                    for item in pc.value_counts(table.column("category")).to_pylist():
                        per_category[split][item["values"]] += item["counts"]
                    chosen_safe[split] += pc.sum(pc.equal(table.column("chosen_variant"), "s")).as_py() or 0
                    writers[split].write(table)
            n_rows += users.num_rows
            bar.update(users.num_rows)
        bar.close()
        files = []
        for writer in writers.values():
            files += writer.close()
        features = {"preferences": features_for(PREFERENCE_SCHEMA)}
        split_sizes: dict[str, dict[str, dict[str, int]]] = {
            "preferences": {s: {"num_examples": w.rows, "num_bytes": w.nbytes} for s, w in writers.items()}}

        users_writer = self._write_users(root, profiles, label.shard_rows.users)
        files += users_writer.close()
        features["users"] = features_for(users_writer.schema)
        split_sizes["users"] = {SINGLE_SPLIT: {"num_examples": users_writer.rows, "num_bytes": users_writer.nbytes}}
        embedding_dim = users_writer.schema.field("embedding").type
        embedding_dim = getattr(embedding_dim, "list_size", None)

        render_settings: dict[str, Any] = {}
        if label.include_pairs:
            pairs_writer, render_settings = self._write_pairs(root, run, pairs, label.shard_rows.pairs)
            files += pairs_writer.close()
            features["pairs"] = features_for(PAIR_SCHEMA)
            split_sizes["pairs"] = {SINGLE_SPLIT: {"num_examples": pairs_writer.rows,
                                                   "num_bytes": pairs_writer.nbytes}}

        counts = {}
        for s in RECORD_SPLITS:
            deck_spread = [decks[(s, c)].spread() for c in categories]
            records = writers[s].rows
            counts[s] = {"records": records, "users": users_per_split[s],
                         "per_category": dict(per_category[s]),
                         "chosen_safe_share": chosen_safe[s] / records if records else 0.0,
                         "pair_uses_min": min(a for a, _ in deck_spread), "pair_uses_max": max(b for _, b in deck_spread)}
        n_records = sum(c["records"] for c in counts.values())
        configs_yaml, info_yaml = [], []
        for name in ("preferences", "pairs", "users"):
            if name not in split_sizes:
                continue
            entry: dict[str, Any] = {"config_name": name}
            if name == "preferences":
                entry["default"] = True
            entry["data_files"] = [{"split": s, "path": f"data/{name}/{s}-*.parquet"} for s in split_sizes[name]]
            configs_yaml.append(entry)
            info_yaml.append({"config_name": name, "features": features[name]._to_yaml_list(),
                              "splits": [{"name": s, **v} for s, v in split_sizes[name].items()]})
        lineage = {}
        for stage in self.inputs:
            m = run.stage(stage).read_manifest()
            assert m is not None
            lineage[stage] = {"content_hash": m.content_hash(), "fingerprint": m.fingerprint}
        settings = self._settings(ctx, render_settings)
        return {
            "files": files, "splits": list(RECORD_SPLITS), "categories": categories, "counts": counts,
            "n_records": n_records, "pairs_per_category": k, "test_index": test_index,
            "chosen_safe_share": sum(chosen_safe.values()) / n_records if n_records else 0.0,
            "n_users_with_records": sum(users_per_split[s] for s in ("train", "val", "test_unseen")),
            "n_pairs": pairs.num_rows, "n_users": users_writer.rows, "embedding_dim": embedding_dim,
            "settings": settings, "lineage": lineage, "configs": configs_yaml, "dataset_info": info_yaml,
            "sage_meta": {"categories": categories, "embedding_dim": embedding_dim, "pairs_per_category": k,
                          "test_index": test_index, "seed": config.seed,
                          "records": {s: counts[s]["records"] for s in RECORD_SPLITS}},
        }

    @staticmethod
    def _records(users: pa.Table, pairs: pa.Table, user_pos: list[int], pair_pos: list[int],
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

    @staticmethod
    def _write_users(root: Path, profiles: pq.ParquetFile, shard_rows: int) -> SplitWriter:
        schema = pa.schema([f.remove_metadata() for f in profiles.schema_arrow])
        writer = SplitWriter(root, "users", SINGLE_SPLIT, schema, profiles.metadata.num_rows, shard_rows)
        for batch in profiles.iter_batches(batch_size=1024):
            writer.write(pa.Table.from_batches([batch]))
        return writer

    @staticmethod
    def _write_pairs(root: Path, run: RunDir, pairs: pa.Table, shard_rows: int) -> tuple[SplitWriter, dict[str, Any]]:
        """One row per rendered pair with both images, read shard by shard from the render index."""
        render = run.stage("render")
        index = pq.read_table(render.file("index.parquet"), columns=["pair_id", "variant", "shard", "row", "sha256"])
        where = {(pid, v): (shard, row, sha) for pid, v, shard, row, sha in zip(
            *(index.column(c).to_pylist() for c in ("pair_id", "variant", "shard", "row", "sha256")))}
        writer = SplitWriter(root, "pairs", SINGLE_SPLIT, PAIR_SCHEMA, pairs.num_rows, shard_rows)
        cache: dict[str, pa.Table] = {}
        settings: dict[str, Any] = {}

        def image(pid: str, variant: str) -> tuple[bytes, str, int, dict[str, Any]]:
            shard, row, sha = where[(pid, variant)]
            if shard not in cache:
                path = render.file(shard)
                if not path.exists():
                    raise StageInputError(f"{path}: missing render shard (named in {render.file('index.parquet')}); "
                                          f"rerun `sage stage render --run-dir {run.root}`")
                cache.clear()  # shards are read in render order: keep one in memory
                cache[shard] = pq.read_table(path)
            table = cache[shard]
            if row >= table.num_rows:
                raise StageInputError(f"{render.file(shard)} row {row}: no such row (index.parquet is stale); "
                                      f"rerun `sage stage render --force`")
            rec = table.slice(row, 1).to_pylist()[0]
            data = rec["image"]
            if rec["pair_id"] != pid or rec["variant"] != variant or hashlib.sha256(data).hexdigest() != sha:
                raise StageInputError(f"{render.file(shard)} row {row}: image of pair {pid} ({variant}) does not "
                                      f"match render/index.parquet (sha256 or ids differ); rerun stage render")
            return data, rec.get("encoding") or "jpeg", rec["seed"], rec

        bar = progress(total=pairs.num_rows, desc="label pairs", unit="pair")
        rows: list[dict[str, Any]] = []
        for pair in pairs.select(PAIR_COLUMNS).to_pylist():
            pid = pair["pair_id"]
            u_bytes, ext, seed, rec = image(pid, "u")
            s_bytes, ext_s, _, _ = image(pid, "s")
            if not settings:
                settings = {k: rec.get(k) for k in ("model", "revision", "scheduler", "steps", "guidance",
                                                     "height", "width", "encoding", "quality")}
            ext = {"jpeg": "jpg"}.get(ext, ext)
            ext_s = {"jpeg": "jpg"}.get(ext_s, ext_s)
            rows.append({**pair, "seed": seed,
                         "image_unsafe": {"bytes": u_bytes, "path": f"{pid}_u.{ext}"},
                         "image_safe": {"bytes": s_bytes, "path": f"{pid}_s.{ext_s}"},
                         "sha256_unsafe": hashlib.sha256(u_bytes).hexdigest(),
                         "sha256_safe": hashlib.sha256(s_bytes).hexdigest()})
            if len(rows) >= 256:
                writer.write(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA))
                rows = []
            bar.update(1)
        if rows:
            writer.write(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA))
        bar.close()
        return writer, settings

    @staticmethod
    def _settings(ctx: StageContext, render_settings: dict[str, Any]) -> dict[str, Any]:
        config = ctx.config
        llm = config.llm
        settings: dict[str, Any] = {
            "LLM": f"{llm.model} ({llm.backend}" + (f", revision {llm.revision}" if llm.revision else "") + ")",
            "LLM sampling": f"temperature {llm.temperature}, top_p {llm.top_p}, seed {llm.seed}",
            "global seed": config.seed,
        }
        for stage in ("profiles", "prompts", "render"):
            m = ctx.run.stage(stage).read_manifest()
            if m is None:
                continue
            for name, sha in m.templates.items():
                settings[f"template {stage}/{name}"] = sha[:16]
            for name, model in m.models.items():
                settings[f"model {stage}/{name}"] = ", ".join(f"{k}={v}" for k, v in model.items())
        r = config.render
        settings["image model"] = render_settings.get("model") or r.model
        if render_settings.get("revision") or r.revision:
            settings["image model revision"] = render_settings.get("revision") or r.revision
        if render_settings.get("scheduler"):
            settings["scheduler"] = render_settings["scheduler"]
        settings["steps"] = render_settings.get("steps", r.steps)
        settings["guidance"] = render_settings.get("guidance", r.guidance)
        settings["size"] = f"{render_settings.get('width', r.width)}x{render_settings.get('height', r.height)}"
        if render_settings.get("encoding"):
            settings["encoding"] = f"{render_settings['encoding']} (quality {render_settings.get('quality')})"
        settings["seeds"] = "one seed per pair, derived from the pair; both images of a pair share it"
        settings["pairs per category per user"] = config.label.pairs_per_category
        return settings


STAGE = LabelStage()
