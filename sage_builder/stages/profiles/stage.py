"""Stage 1 (profiles): simulated users with demographics, banned/allowed categories, an embedding,
a cluster, a strictness level for the reference users, and a split role.

Steps, each resumable where it is costly:
1. sample demographics (``demographics.py``; no cache needed, it is deterministic and instant);
2. banned categories per user, from the LLM (items ``bans``, keyed by user id, attributes, template
   and sampling settings) or from the rules;
3. a statement per user embedded by the LLM (items ``embeddings``, keyed by statement and model);
4. k-means, reference users and levels, t-SNE map, splits (instant, recomputed).

Outputs: ``profiles.parquet`` (one row per user, id order), ``rejects.parquet`` (LLM replies that
failed after every attempt), ``report.json`` (rule agreement, ban rates beside the published ones,
levels, splits) and ``tsne.png``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from sage_builder.config import PipelineConfig, hashable_dump, model_identity
from sage_builder.errors import ConfigError, SageError
from sage_builder.executors import make_stage_backend
from sage_builder.llm.base import LLMResult, reply_settings
from sage_builder.llm.factory import make_backend
from sage_builder.progress import progress
from sage_builder.stages.base import Stage, StageContext, StagePlan
from sage_builder.stages.profiles import clustering, embedding, labelling
from sage_builder.stages.profiles.demographics import (
    Demographics, DemographicsSpec, check_categories, load_demographics, sample_users, user_id,
)
from sage_builder.store import RunDir, atomic_path, atomic_write_text, file_sha256, stable_hash
from sage_builder.templates import load_template

log = logging.getLogger("sage.profiles")

REJECT_SCHEMA = pa.schema([("user_id", pa.string()), ("item_key", pa.string()), ("reason", pa.string()),
                           ("errors", pa.list_(pa.string())), ("raw", pa.string()), ("attempts", pa.int64())])
BAN_TEMPLATE_VARS = {"user", "categories"}
STATEMENT_VARS = {"age", "age_group", "gender", "religion", "physical_condition", "mental_condition",
                  "banned", "allowed"}


def profiles_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("user_id", pa.string()), ("age", pa.int64()), ("age_group", pa.string()), ("gender", pa.string()),
        ("religion", pa.string()), ("physical_condition", pa.string()), ("mental_condition", pa.string()),
        ("banned", pa.list_(pa.string())), ("allowed", pa.list_(pa.string())), ("labeller", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)), ("cluster_id", pa.int64()), ("level", pa.int64()),
        ("split", pa.string()), ("test_seen", pa.bool_()),
    ])


def _embedding_model(config: PipelineConfig) -> str:
    return config.profiles.embedding_model or config.llm.model


def _same_model(config: PipelineConfig) -> bool:
    return config.profiles.embedding_model in (None, config.llm.model)


def _config_source(config: PipelineConfig) -> str:
    return str(config.source) if config.source else "config"


def statement_messages(template: Any, user: Demographics, banned: list[str], allowed: list[str]
                       ) -> list[dict[str, str]]:
    return template.render(**user.as_dict(), banned=", ".join(banned) or "none",
                           allowed=", ".join(allowed) or "none")


class ProfilesStage(Stage):
    name = "profiles"
    number = 1
    distributed = True
    inputs = ()
    summary = "simulated users: demographics, banned categories, embedding, clusters, splits"

    def templates(self, config: PipelineConfig) -> dict[str, Any]:
        out = {"user_statement": config.profiles.statement_template}
        if config.profiles.labeller == "llm":
            out["ban_categories"] = config.profiles.ban_template
        return out

    def model_ids(self, config: PipelineConfig) -> dict[str, dict[str, Any]]:
        same = _same_model(config)
        out = {"embedding": {"model": _embedding_model(config), "revision": config.llm.revision if same else None,
                             "gguf_file": config.llm.gguf_file if same else None,
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
        return parts

    def check(self, config: PipelineConfig, run: RunDir) -> None:
        pc = config.profiles
        spec = load_demographics(pc.demographics)
        check_categories(spec, config.categories, _config_source(config))
        statement = load_template(pc.statement_template)
        unknown = statement.variables - STATEMENT_VARS
        if unknown:
            raise ConfigError(f"{pc.statement_template}: unknown placeholder {{{{{sorted(unknown)[0]}}}}} "
                              f"(known: {', '.join(sorted(STATEMENT_VARS))})")
        clustering.split_sizes(pc.n_users, pc.splits.train, pc.splits.val, pc.splits.test_unseen,
                               pc.splits.test_seen)
        key = "profiles.embedding_model" if pc.embedding_model else "llm.model"
        embedding.check_model_available(_embedding_model(config), key)
        if pc.labeller == "llm":
            ban = load_template(pc.ban_template)
            if ban.variables != BAN_TEMPLATE_VARS:
                raise ConfigError(f"{pc.ban_template}: the template must use exactly the placeholders "
                                  f"{{{{user}}}} and {{{{categories}}}} (has {sorted(ban.variables)})")
            if config.llm.backend == "openai":
                # Pings the endpoint: an unreachable server fails here, before anything is written.
                make_backend(config.llm).close()
            else:
                embedding.check_model_available(config.llm.model, "llm.model")

    def plan(self, config: PipelineConfig) -> StagePlan:
        pc = config.profiles
        n = pc.n_users + int(pc.add_permissive_user)
        notes = [f"sampler {pc.sampler}, labeller {pc.labeller}, embeddings from {_embedding_model(config)}"]
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
        llm_info: dict[str, Any] | None = None
        rejects: list[dict[str, Any]] = []
        if pc.labeller == "rules":
            banned = {uid: labelling.rules_banned(spec, u, config.categories) for uid, u in sampled.items()}
        else:
            banned, rejects, llm_info = self._label_with_llm(ctx, spec, sampled)
        timings["label"] = time.perf_counter() - t0
        ctx.write_table("rejects.parquet", pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
        rejected = [r["user_id"] for r in rejects]
        if rejected and pc.on_rejected == "fail":
            first = rejects[0]
            raise SageError(
                f"{len(rejected)} of {len(sampled)} users have no valid LLM labelling after "
                f"{config.llm.max_attempts} attempts (e.g. user {first['user_id']}: {first['reason']}; all in "
                f"{ctx.stage_dir.file('rejects.parquet')}): raise llm.max_attempts, change the model, or set "
                f"profiles.on_rejected: exclude; rerunning keeps the accepted labels")
        kept = {uid: u for uid, u in sampled.items() if uid not in set(rejected)}
        if not kept:
            raise SageError("no user is left after excluding the rejected ones; see rejects.parquet")
        users = dict(kept)
        labeller_of = {uid: pc.labeller for uid in users}
        if pc.add_permissive_user:
            pid = user_id(pc.n_users + 1)
            users[pid] = spec.permissive()
            banned[pid] = []
            labeller_of[pid] = "fixed"

        t0 = time.perf_counter()
        vectors, dim = self._embed(ctx, users, banned)
        timings["embed"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ids = list(users)
        sampled_ids = list(kept)
        matrix = np.stack([vectors[uid] for uid in ids])
        extra = matrix[len(sampled_ids):]
        clusters = clustering.cluster_users(matrix[:len(sampled_ids)], pc.n_clusters, config.seed, extra)
        cluster_of = dict(zip(sampled_ids, clusters.labels.tolist()))
        cluster_of.update(zip(ids[len(sampled_ids):], clusters.predict_extra.tolist()))
        reference_ids = [sampled_ids[i] for i in clusters.reference]
        candidates = ([(ids[-1], 0)] if pc.add_permissive_user else []) + \
            [(uid, len(banned[uid])) for uid in reference_ids]
        levels = clustering.assign_levels(candidates)
        sizes = clustering.split_sizes(len(sampled_ids), pc.splits.train, pc.splits.val, pc.splits.test_unseen,
                                       pc.splits.test_seen)
        split_of, seen = clustering.assign_splits(sampled_ids, sizes, config.seed)
        if pc.add_permissive_user:
            split_of[ids[-1]] = "reference"
        all_z = np.vstack([clusters.standardized, clusters.extra_standardized])
        coords, perplexity = clustering.tsne_map(all_z, config.seed, pc.tsne_perplexity)
        with atomic_path(ctx.stage_dir.file("tsne.png")) as tmp:
            clustering.plot_tsne(tmp, coords, [cluster_of[uid] for uid in ids],
                                 {ids.index(uid): lvl for uid, lvl in levels.items()},
                                 f"{config.name}: {len(ids)} users, k={clusters.k} (rings: reference users)")
        ctx.add_output("tsne.png")
        timings["cluster"] = time.perf_counter() - t0

        rows = []
        for uid in ids:
            user = users[uid]
            rows.append({**{"user_id": uid}, **user.as_dict(), "banned": banned[uid],
                         "allowed": labelling.allowed_of(banned[uid], config.categories),
                         "labeller": labeller_of[uid], "embedding": vectors[uid].tolist(),
                         "cluster_id": int(cluster_of[uid]), "level": levels.get(uid),
                         "split": split_of[uid], "test_seen": uid in seen})
        ctx.write_table("profiles.parquet", pa.Table.from_pylist(rows, schema=profiles_schema(dim)))

        sampled_kept = [kept[uid] for uid in sampled_ids]
        bans_kept = [banned[uid] for uid in sampled_ids]
        report = {
            "users": len(ids),
            "sampled_users": len(sampled),
            "sampler": pc.sampler,
            "seed": config.seed,
            "labeller": pc.labeller,
            "llm": llm_info,
            "rejected_users": rejected,
            "on_rejected": pc.on_rejected,
            "age_groups": _age_group_shares(sampled_kept, spec, users.get(user_id(pc.n_users + 1))
                                            if pc.add_permissive_user else None),
            "bans": labelling.ban_statistics(bans_kept, config.categories),
            "rule_agreement": labelling.rule_agreement(spec, sampled_kept, bans_kept),
            "embedding": {"model": _embedding_model(config), "dim": dim, "pooling": embedding.POOLING,
                          "layer": embedding.LAYER},
            "clusters": {"k": clusters.k, "sizes": {str(c): int((clusters.labels == c).sum())
                                                    for c in range(clusters.k)},
                         "tsne_perplexity": perplexity},
            "levels": [{"level": lvl, "user_id": uid, "n_banned": len(banned[uid]), "banned": banned[uid],
                        "cluster_id": int(cluster_of[uid])}
                       for uid, lvl in sorted(levels.items(), key=lambda kv: kv[1])],
            "published_level_bans": clustering.PUBLISHED_LEVEL_BANS,
            "splits": sizes,
            "seconds": {k: round(v, 2) for k, v in timings.items()},
        }
        atomic_write_text(ctx.stage_dir.file("report.json"), json.dumps(report, indent=2, ensure_ascii=False))
        ctx.add_output("report.json")
        bans = report["bans"]
        ctx.stats.update({
            "users": len(ids), "embedding_dim": dim, "embedding_pooling": embedding.POOLING,
            "labeller": pc.labeller, "rejected": len(rejected), "excluded_users": rejected,
            "mean_banned": bans["mean_banned"], "ban_nothing": bans["ban_nothing"], "ban_rate": bans["ban_rate"],
            "rule_agreement": {r["rule"].split(" ->")[0]: f"{r['satisfied']}/{r['applicable']}"
                               for r in report["rule_agreement"]["rules"]},
            "levels": {str(r["level"]): r["n_banned"] for r in report["levels"]},
            "llm_usage": (llm_info or {}).get("usage"),
            "splits": sizes,
        })
        log.info("profiles: %d users, mean %.2f banned, embedding dim %d", len(ids), bans["mean_banned"] or 0, dim)

    def _label_with_llm(self, ctx: StageContext, spec: DemographicsSpec, sampled: dict[str, Demographics]
                        ) -> tuple[dict[str, list[str]], list[dict[str, Any]], dict[str, Any]]:
        config = ctx.config
        template = load_template(config.profiles.ban_template)
        cache = ctx.stage_dir.items("bans")
        settings = reply_settings(config.llm)
        factory = labelling.BanLabelRequestFactory(template, list(config.categories), settings)
        keys = {uid: factory.key(uid, u) for uid, u in sampled.items()}
        done = cache.read(keys=set(keys.values()))
        banned_by_key = {} if done is None else dict(zip(done.column("item_key").to_pylist(),
                                                         done.column("banned").to_pylist()))
        todo = {uid: u for uid, u in sampled.items() if keys[uid] not in banned_by_key}
        rejects: list[dict[str, Any]] = []
        info = {"backend": config.llm.backend, **settings, "max_attempts": config.llm.max_attempts,
                "from_cache": len(sampled) - len(todo)}
        if todo:
            log.info("labelling %d users with %s (%d already done)", len(todo), config.llm.model,
                     len(sampled) - len(todo))
            backend = make_stage_backend(config)
            with backend, cache.writer(flush_rows=16) as writer, \
                    progress(total=len(todo), desc="banned categories", unit="user") as bar:
                for uid, result in labelling.label_with_llm(backend, factory, todo, lambda _r: bar.update()):
                    if result.ok:
                        ban = labelling.banned_from_reply(result.value, config.categories)
                        banned_by_key[result.key] = ban
                        writer.add({"item_key": result.key, "user_id": uid, "banned": ban, "raw": result.raw,
                                    "attempts": result.attempts, "seed": result.seed})
                    else:
                        rejects.append(_reject_row(uid, result))
                        if result.reason == "no_reply":
                            bar.update()
            info["usage"] = backend.usage()
        rejects.sort(key=lambda r: r["user_id"])
        banned = {uid: list(banned_by_key[keys[uid]]) for uid in sampled if keys[uid] in banned_by_key}
        return banned, rejects, info

    def _embed(self, ctx: StageContext, users: dict[str, Demographics], banned: dict[str, list[str]]
               ) -> tuple[dict[str, np.ndarray], int]:
        config = ctx.config
        template = load_template(config.profiles.statement_template)
        model = _embedding_model(config)
        same = _same_model(config)
        device = embedding.resolve_device(config.llm.device)
        dtype = embedding.resolve_dtype(config.llm.dtype, device)
        messages = {uid: statement_messages(template, u, banned[uid],
                                            labelling.allowed_of(banned[uid], config.categories))
                    for uid, u in users.items()}
        identity = {"model": model_identity(model), "revision": config.llm.revision if same else None,
                    "gguf_file": config.llm.gguf_file if same else None, "dtype": dtype,
                    "pooling": embedding.POOLING, "layer": embedding.LAYER}
        keys = {uid: stable_hash("embedding", m, identity) for uid, m in messages.items()}
        cache = ctx.stage_dir.items("embeddings")
        done = cache.read(keys=set(keys.values()))
        vec_by_key: dict[str, np.ndarray] = {}
        if done is not None:
            for key, vec in zip(done.column("item_key").to_pylist(), done.column("embedding").to_pylist()):
                vec_by_key[key] = np.asarray(vec, dtype=np.float32)
        todo_keys = list(dict.fromkeys(keys[uid] for uid in users if keys[uid] not in vec_by_key))
        if todo_keys:
            first_uid = {}
            for uid, key in keys.items():
                first_uid.setdefault(key, uid)
            embedder = embedding.StatementEmbedder(model, identity["revision"], identity["gguf_file"], device, dtype)
            convs = [messages[first_uid[k]] for k in todo_keys]
            batch = config.profiles.embedding_batch_size
            with cache.writer(flush_rows=batch) as writer, \
                    progress(total=len(convs), desc="user embeddings", unit="user") as bar:
                for start, vecs in embedder.embed_batches(convs, batch):
                    for key, vec in zip(todo_keys[start:start + batch], vecs):
                        vec_by_key[key] = vec
                        writer.add({"item_key": key, "embedding": vec.tolist()})
                    bar.update(len(vecs))
            embedder.close()
        dims = {v.shape[0] for v in vec_by_key.values()}
        if len(dims) != 1:
            raise SageError(f"embeddings of different sizes {sorted(dims)} in {cache.directory}; rerun with --force")
        return {uid: vec_by_key[keys[uid]] for uid in users}, dims.pop()


def _reject_row(uid: str, result: LLMResult) -> dict[str, Any]:
    return {"user_id": uid, "item_key": result.key, "reason": result.reason, "errors": list(result.errors),
            "raw": result.raw, "attempts": result.attempts}


def _age_group_shares(users: list[Demographics], spec: DemographicsSpec, permissive: Demographics | None
                      ) -> dict[str, Any]:
    """Shares over the sampled users plus the permissive one (as the published figures count them)."""
    counted = users + ([permissive] if permissive else [])
    n = len(counted)
    return {g.name: {"n": sum(u.age_group == g.name for u in counted),
                     "share": round(sum(u.age_group == g.name for u in counted) / n, 4)}
            for g in spec.age_groups}


STAGE = ProfilesStage()
