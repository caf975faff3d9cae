"""What stage 1 says about its users: ``report.json`` (beside the published figures) and the
manifest's stats, which ``sage status`` shows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sage_builder.stages.profiles import clustering, labelling
from sage_builder.stages.profiles.clustering import Placement
from sage_builder.stages.profiles.demographics import Demographics, DemographicsSpec
from sage_builder.user_embedding import LAYER, POOLING

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig


def build_report(config: PipelineConfig, spec: DemographicsSpec, sampled: dict[str, Demographics],
                 kept: dict[str, Demographics], permissive: Demographics | None, labels: labelling.Labels,
                 placement: Placement, dim: int, timings: dict[str, float]) -> dict[str, Any]:
    pc = config.profiles
    banned = labels.banned
    sampled_kept = list(kept.values())
    bans_kept = [banned[uid] for uid in kept]
    clusters = placement.clusters
    return {
        "users": len(placement.ids),
        "sampled_users": len(sampled),
        "sampler": pc.sampler,
        "seed": config.seed,
        "labeller": pc.labeller,
        "llm": labels.llm_info,
        "rejected_users": [r["user_id"] for r in labels.rejects],
        "on_rejected": pc.on_rejected,
        "age_groups": age_group_shares(sampled_kept, spec, permissive),
        "bans": labelling.ban_statistics(bans_kept, config.categories),
        "rule_agreement": labelling.rule_agreement(spec, sampled_kept, bans_kept),
        "embedding": {"model": pc.embedding_model or config.llm.model, "dim": dim, "pooling": POOLING,
                      "layer": LAYER},
        "clusters": {"k": clusters.k, "sizes": {str(c): int((clusters.labels == c).sum())
                                                for c in range(clusters.k)},
                     "tsne_perplexity": placement.perplexity},
        "levels": [{"level": lvl, "user_id": uid, "n_banned": len(banned[uid]), "banned": banned[uid],
                    "cluster_id": int(placement.cluster_of[uid])}
                   for uid, lvl in sorted(placement.levels.items(), key=lambda kv: kv[1])],
        "published_level_bans": clustering.PUBLISHED_LEVEL_BANS,
        "splits": placement.sizes,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }


def stage_stats(report: dict[str, Any]) -> dict[str, Any]:
    """The manifest's stats: the report's headline figures."""
    bans = report["bans"]
    rejected = report["rejected_users"]
    return {
        "users": report["users"], "embedding_dim": report["embedding"]["dim"], "embedding_pooling": POOLING,
        "labeller": report["labeller"], "rejected": len(rejected), "excluded_users": rejected,
        "mean_banned": bans["mean_banned"], "ban_nothing": bans["ban_nothing"], "ban_rate": bans["ban_rate"],
        "rule_agreement": {r["rule"].split(" ->")[0]: f"{r['satisfied']}/{r['applicable']}"
                           for r in report["rule_agreement"]["rules"]},
        "levels": {str(r["level"]): r["n_banned"] for r in report["levels"]},
        "llm_usage": (report["llm"] or {}).get("usage"),
        "splits": report["splits"],
    }


def age_group_shares(users: list[Demographics], spec: DemographicsSpec, permissive: Demographics | None
                     ) -> dict[str, Any]:
    """Shares over the sampled users plus the permissive one (as the published figures count them)."""
    counted = users + ([permissive] if permissive else [])
    n = len(counted)
    return {g.name: {"n": sum(u.age_group == g.name for u in counted),
                     "share": round(sum(u.age_group == g.name for u in counted) / n, 4)}
            for g in spec.age_groups}
