"""Stage 4 (label): per-user preference records, written as a Hub-layout dataset directory.

Reads ``profiles/profiles.parquet``, ``prompts/pairs.parquet`` and ``render/index.parquet`` (+ the
render shards for image bytes) and writes ``label/dataset/`` (see ``dataset.py`` and ``card.py``).
Labelling streams: users are read in batches and their records written as they are made, so memory
does not grow with users x pairs. The whole stage takes seconds to minutes, so it is not resumed at
item granularity: an interrupted run leaves the previous dataset untouched and simply reruns.

The algorithm lives beside this file: ``inputs`` (what is read and checked), ``assign`` (pools,
decks and the label rule), ``records`` (dealing users into records), ``pairs`` (the image config),
``summary`` (counts and settings for the card), ``card`` and ``dataset`` (the Hub layout).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sage_builder.stages.base import Stage, StageContext, StagePlan
from sage_builder.stages.label.assign import RECORD_SPLITS, Deck, build_pools
from sage_builder.stages.label.card import generated_blocks, render_card
from sage_builder.stages.label.dataset import PAIR_SCHEMA, PREFERENCE_SCHEMA, SINGLE_SPLIT, SplitWriter, features_for
from sage_builder.stages.label.inputs import check_inputs, open_profiles, rendered_pairs, users_per_split
from sage_builder.stages.label.pairs import write_pairs
from sage_builder.stages.label.records import label_users
from sage_builder.stages.label.summary import (
    ban_rates,
    generation_settings,
    hub_configs,
    lineage,
    split_counts,
    split_size,
)
from sage_builder.store import RunDir, atomic_write_text

log = logging.getLogger("sage.label")


def write_users(root: Path, profiles: pq.ParquetFile, shard_rows: int) -> SplitWriter:
    """The ``users`` config: ``profiles.parquet`` as it is, streamed in batches."""
    schema = pa.schema([f.remove_metadata() for f in profiles.schema_arrow])
    writer = SplitWriter(root, "users", SINGLE_SPLIT, schema, profiles.metadata.num_rows, shard_rows)
    for batch in profiles.iter_batches(batch_size=1024):
        writer.write(pa.Table.from_batches([batch]))
    return writer


class LabelStage(Stage):
    name = "label"
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
            "pair_uses_mean": {s: round(info["counts"][s]["pair_uses_mean"], 4) for s in info["splits"]},
            "repeated_concepts": {s: info["counts"][s]["repeated_concepts"] for s in info["splits"]},
            "pairs": info["n_pairs"], "dataset": "label/dataset",  # relative to the run: manifests are published
        })

    def _write(self, ctx: StageContext, root: Path) -> dict[str, Any]:
        """Write the three configs under ``root``; return what the card and the manifest report."""
        config, run, label = ctx.config, ctx.run, ctx.config.label
        categories = list(config.categories)
        k = label.pairs_per_category
        test_index = config.prompts.pairs_per_concept
        profiles_path = run.stage("profiles").file("profiles.parquet")
        pairs = rendered_pairs(run)
        pools = build_pools(pairs, categories, test_index, k, run.stage("prompts").file("pairs.parquet"))
        concept_ids = pairs.column("concept_id").to_pylist()
        decks = {key: Deck(pool, [concept_ids[i] for i in pool]) for key, pool in pools.items()}
        profiles = open_profiles(profiles_path)
        users = users_per_split(profiles, profiles_path)
        per_user = len(categories) * k * 2
        writers = {s: SplitWriter(root, "preferences", s, PREFERENCE_SCHEMA, users[s] * per_user,
                                  label.shard_rows.preferences) for s in RECORD_SPLITS}
        tally = label_users(profiles, profiles_path, pairs, decks, categories, k, config.seed, label.batch_rows,
                            writers)
        files = [rel for writer in writers.values() for rel in writer.close()]
        features = {"preferences": features_for(PREFERENCE_SCHEMA)}
        split_sizes = {"preferences": {s: split_size(w) for s, w in writers.items()}}
        users_writer = write_users(root, profiles, label.shard_rows.users)
        files += users_writer.close()
        features["users"] = features_for(users_writer.schema)
        split_sizes["users"] = {SINGLE_SPLIT: split_size(users_writer)}
        embedding_dim = getattr(users_writer.schema.field("embedding").type, "list_size", None)
        render_settings: dict[str, Any] = {}
        if label.include_pairs:
            pairs_writer, render_settings = write_pairs(root, run, pairs, label.shard_rows.pairs)
            files += pairs_writer.close()
            features["pairs"] = features_for(PAIR_SCHEMA)
            split_sizes["pairs"] = {SINGLE_SPLIT: split_size(pairs_writer)}
        counts = split_counts(writers, users, tally, decks, categories)
        n_records = sum(c["records"] for c in counts.values())
        configs_yaml, info_yaml = hub_configs(split_sizes, features)
        return {
            "files": files, "splits": list(RECORD_SPLITS), "categories": categories, "counts": counts,
            "n_records": n_records, "pairs_per_category": k, "test_index": test_index,
            "chosen_safe_share": sum(tally.chosen_safe.values()) / n_records if n_records else 0.0,
            "n_users_with_records": sum(users[s] for s in ("train", "val", "test_unseen")),
            "n_pairs": pairs.num_rows, "n_users": users_writer.rows, "embedding_dim": embedding_dim,
            "settings": generation_settings(config, run, render_settings), "lineage": lineage(run, self.inputs),
            "ban_rates": ban_rates(profiles_path, categories, run),
            "screening": run.stage("render").read_manifest().stats.get("screen"),
            "configs": configs_yaml, "dataset_info": info_yaml,
            "sage_meta": {"categories": categories, "embedding_dim": embedding_dim, "pairs_per_category": k,
                          "test_index": test_index, "seed": config.seed,
                          "records": {s: counts[s]["records"] for s in RECORD_SPLITS}},
        }


STAGE = LabelStage()
