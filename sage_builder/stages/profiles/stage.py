"""Stage 1 (profiles): simulated users with demographics, banned/allowed categories, an embedding,
a cluster, a strictness level for the reference users, and a split role.

Steps, each in the module named for it and resumable where it is costly:
1. sample demographics (``demographics.py``; no cache needed, it is deterministic and instant);
2. label: banned categories per user, from the LLM (items ``bans``, keyed by user id, attributes,
   template, sampling settings and, with ``rules: enforce``, the user's mandatory rules), from the
   rules, or from a file in the published users.csv format (``labelling.py``, ``labels_file.py``);
3. embed: a statement per user embedded by the LLM (items ``embeddings``, keyed by statement and
   model; ``embedding.py`` over the shared ``sage_builder/user_embedding.py``);
4. cluster: k-means, reference users and levels, t-SNE map, splits seeded or the published ones
   (``clustering.py``; instant, recomputed).
This module holds the stage's hooks and its I/O; ``report.py`` assembles ``report.json``.

Outputs: ``profiles.parquet`` (one row per user, id order), ``rejects.parquet`` (LLM replies that
failed after every attempt), ``report.json`` (rule agreement, ban rates beside the published ones,
levels, splits) and ``tsne.png``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sage_builder.config import PipelineConfig, hashable_dump
from sage_builder.errors import ConfigError, SageError
from sage_builder.executors import make_stage_backend
from sage_builder.llm.factory import make_backend
from sage_builder.schemas import profiles_schema
from sage_builder.stages.base import Stage, StageContext, StagePlan
from sage_builder.stages.profiles import clustering, embedding, labelling
from sage_builder.stages.profiles.demographics import (
    Demographics, check_categories, load_demographics, sample_users, user_id,
)
from sage_builder.stages.profiles.labels_file import read_labels_file
from sage_builder.stages.profiles.report import build_report, levels_line, stage_stats
from sage_builder.store import RunDir, atomic_path, atomic_write_text, file_sha256
from sage_builder.templates import load_template
from sage_builder.user_embedding import EmbeddingSetup, check_model_available, load_statement_template

log = logging.getLogger("sage.profiles")

REJECT_SCHEMA = pa.schema([("user_id", pa.string()), ("item_key", pa.string()), ("reason", pa.string()),
                           ("errors", pa.list_(pa.string())), ("raw", pa.string()), ("attempts", pa.int64())])
BAN_TEMPLATE_VARS = {"user", "categories"}
ENFORCED_TEMPLATE_VARS = {"user", "rules", "decided", "categories"}


def _config_source(config: PipelineConfig) -> str:
    return str(config.source) if config.source else "config"


def _sha256_or_none(path: Path) -> str | None:
    return file_sha256(path) if Path(path).exists() else None


class ProfilesStage(Stage):
    name = "profiles"
    distributed = True
    uses_llm = True
    inputs = ()
    summary = "simulated users: demographics, banned categories, embedding, clusters, splits"

    def templates(self, config: PipelineConfig) -> dict[str, Any]:
        pc = config.profiles
        out = {"user_statement": pc.statement_template}
        if pc.labeller == "llm":
            out["ban_categories"] = pc.enforced_ban_template if pc.rules == "enforce" else pc.ban_template
        return out

    def model_ids(self, config: PipelineConfig) -> dict[str, dict[str, Any]]:
        setup = EmbeddingSetup.from_config(config)
        out = {"embedding": {"model": setup.model, "revision": setup.revision, "gguf_file": setup.gguf_file,
                             "pooling": config.profiles.embedding_pooling}}
        if config.profiles.labeller == "llm":
            out["llm"] = {"backend": config.llm.backend, "model": config.llm.model, "revision": config.llm.revision,
                          "gguf_file": config.llm.gguf_file}
        return out

    def fingerprint_parts(self, config: PipelineConfig) -> dict[str, Any]:
        parts: dict[str, Any] = {"seed": config.seed, "categories": config.categories,
                                 "demographics_sha256": file_sha256(config.profiles.demographics)
                                 if config.profiles.demographics.exists() else None,
                                 "embedding_dtype": config.llm.dtype}
        if config.profiles.labeller == "llm":
            parts["llm"] = hashable_dump(config.llm)
        if config.profiles.labeller == "file" and config.profiles.labels_file:
            parts["labels_file_sha256"] = _sha256_or_none(config.profiles.labels_file)
        if config.profiles.splits.method == "psalign":
            parts["splits_file_sha256"] = _sha256_or_none(config.profiles.splits.file)
        return parts

    def check(self, config: PipelineConfig, run: RunDir) -> None:
        pc = config.profiles
        spec = load_demographics(pc.demographics)
        check_categories(spec, config.categories, _config_source(config))
        load_statement_template(pc.statement_template)
        if pc.splits.method == "psalign":
            clustering.read_published_splits(pc.splits.file, pc.n_users)
        else:
            clustering.split_sizes(pc.n_users, pc.splits.train, pc.splits.val, pc.splits.test_unseen,
                                   pc.splits.test_seen)
        key = "profiles.embedding_model" if pc.embedding_model else "llm.model"
        check_model_available(EmbeddingSetup.from_config(config).model, key)
        if pc.labeller == "file" or (pc.labeller == "llm" and pc.rules == "enforce"):
            # Instant: the labels file is read and every user's mandatory rules are decided here, so
            # a bad row or contradicting rules stop the stage before anything is written.
            sampled = {user_id(i + 1): u for i, u in enumerate(sample_users(spec, pc.sampler, pc.n_users,
                                                                            config.seed))}
            if pc.labeller == "file":
                assert pc.labels_file is not None  # the config requires it
                read_labels_file(pc.labels_file, sampled, config.categories)
            else:
                for user in sampled.values():
                    labelling.mandate_of(spec, user, config.categories)
        if pc.labeller == "llm":
            template_path = pc.enforced_ban_template if pc.rules == "enforce" else pc.ban_template
            wanted = ENFORCED_TEMPLATE_VARS if pc.rules == "enforce" else BAN_TEMPLATE_VARS
            ban = load_template(template_path)
            if ban.variables != wanted:
                names = " ".join(f"{{{{{v}}}}}" for v in sorted(wanted))
                raise ConfigError(f"{template_path}: with profiles.rules: {pc.rules} the template must use exactly "
                                  f"the placeholders {names} (has {sorted(ban.variables)})")
            if config.llm.backend == "openai":
                # Pings the endpoint: an unreachable server fails here, before anything is written.
                make_backend(config.llm).close()
            else:
                check_model_available(config.llm.model, "llm.model")

    def plan(self, config: PipelineConfig) -> StagePlan:
        pc = config.profiles
        n = pc.n_users + int(pc.add_permissive_user)
        embedder = EmbeddingSetup.from_config(config).model
        labeller = f"{pc.labeller} (rules: {pc.rules})" if pc.labeller == "llm" else pc.labeller
        notes = [f"sampler {pc.sampler}, labeller {labeller}, splits {pc.splits.method}, embeddings from {embedder}"]
        llm_calls = None
        if pc.labeller == "llm":
            llm_calls = pc.n_users
            notes.append(f"up to {pc.n_users * config.llm.max_attempts} LLM calls if every reply needs "
                         f"all {config.llm.max_attempts} attempts")
        return StagePlan(items=n, unit="users", llm_calls=llm_calls, notes=notes)

    def run(self, ctx: StageContext) -> None:
        config, pc = ctx.config, ctx.config.profiles
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        spec = load_demographics(pc.demographics)
        check_categories(spec, config.categories, _config_source(config))
        sampled = {user_id(i + 1): u for i, u in enumerate(sample_users(spec, pc.sampler, pc.n_users, config.seed))}
        timings["sample"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        labels = labelling.label_users(config, spec, sampled, ctx.stage_dir.items("bans"),
                                       lambda: make_stage_backend(config))
        timings["label"] = time.perf_counter() - t0
        kept = self._keep_accepted(ctx, sampled, labels)
        users = dict(kept)
        labeller_of = {uid: pc.labeller for uid in users}
        permissive_id = user_id(pc.n_users + 1) if pc.add_permissive_user else None
        if permissive_id:
            users[permissive_id] = spec.permissive()
            labels.banned[permissive_id] = []
            labeller_of[permissive_id] = "fixed"

        t0 = time.perf_counter()
        vectors, dim = embedding.embed_users(EmbeddingSetup.from_config(config), users, labels.banned,
                                             config.categories, ctx.stage_dir.items("embeddings"),
                                             pc.embedding_batch_size)
        timings["embed"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        placement = clustering.place_users(vectors, list(kept), permissive_id, labels.banned, pc, config.seed)
        self._write_tsne(ctx, placement)
        timings["cluster"] = time.perf_counter() - t0

        self._write_profiles(ctx, users, labels.banned, labeller_of, vectors, dim, placement)
        report = build_report(config, spec, sampled, kept, users.get(permissive_id) if permissive_id else None,
                              labels, placement, dim, timings)
        atomic_write_text(ctx.stage_dir.file("report.json"), json.dumps(report, indent=2, ensure_ascii=False))
        ctx.add_output("report.json")
        ctx.stats.update(stage_stats(report))
        log.info("profiles: %d users, mean %.2f banned, embedding dim %d", len(placement.ids),
                 report["bans"]["mean_banned"] or 0, dim)
        log.info("profiles: %s", levels_line(report))
        for warning in report["warnings"]:
            log.warning("profiles: %s", warning)

    def _keep_accepted(self, ctx: StageContext, sampled: dict[str, Demographics], labels: labelling.Labels
                       ) -> dict[str, Demographics]:
        """Write rejects.parquet; stop if a user was rejected and on_rejected is fail, else drop them."""
        config = ctx.config
        rejects = labels.rejects
        ctx.write_table("rejects.parquet", pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
        rejected = {r["user_id"] for r in rejects}
        if rejected and config.profiles.on_rejected == "fail":
            first = rejects[0]
            raise SageError(
                f"{len(rejected)} of {len(sampled)} users have no valid LLM labelling after "
                f"{config.llm.max_attempts} attempts (e.g. user {first['user_id']}: {first['reason']}; all in "
                f"{ctx.stage_dir.file('rejects.parquet')}): raise llm.max_attempts, change the model, or set "
                f"profiles.on_rejected: exclude; rerunning keeps the accepted labels")
        kept = {uid: u for uid, u in sampled.items() if uid not in rejected}
        if not kept:
            raise SageError("no user is left after excluding the rejected ones; see rejects.parquet")
        return kept

    def _write_tsne(self, ctx: StageContext, placement: clustering.Placement) -> None:
        ids = placement.ids
        with atomic_path(ctx.stage_dir.file("tsne.png")) as tmp:
            clustering.plot_tsne(tmp, placement.coords, [placement.cluster_of[uid] for uid in ids],
                                 {ids.index(uid): lvl for uid, lvl in placement.levels.items()},
                                 f"{ctx.config.name}: {len(ids)} users, k={placement.clusters.k} "
                                 f"(rings: reference users)")
        ctx.add_output("tsne.png")

    def _write_profiles(self, ctx: StageContext, users: dict[str, Demographics], banned: dict[str, list[str]],
                        labeller_of: dict[str, str], vectors: dict[str, np.ndarray], dim: int,
                        placement: clustering.Placement) -> None:
        rows = []
        for uid in placement.ids:
            rows.append({**{"user_id": uid}, **users[uid].as_dict(), "banned": banned[uid],
                         "allowed": labelling.allowed_of(banned[uid], ctx.config.categories),
                         "labeller": labeller_of[uid], "embedding": vectors[uid].tolist(),
                         "cluster_id": int(placement.cluster_of[uid]), "level": placement.levels.get(uid),
                         "split": placement.split_of[uid], "test_seen": uid in placement.seen})
        ctx.write_table("profiles.parquet", pa.Table.from_pylist(rows, schema=profiles_schema(dim)))


STAGE = ProfilesStage()
