"""What stage 1 says about its users: ``report.json`` (beside the published figures) and the
manifest's stats, which ``sage status`` shows."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_builder.runtime import is_local_path
from sage_builder.stages.profiles import clustering, labelling
from sage_builder.stages.profiles.clustering import Placement
from sage_builder.stages.profiles.demographics import Demographics, DemographicsSpec
from sage_builder.user_embedding import LAYER, POOLING

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig

# Labels count as degenerate beyond these (SPEC 1.2: mean 3.54 banned, 40 of 1,000 ban nothing).
MAX_BAN_NOTHING_SHARE = 0.5
MEAN_BANNED_TOLERANCE = 1.5


def build_report(config: PipelineConfig, spec: DemographicsSpec, sampled: dict[str, Demographics],
                 kept: dict[str, Demographics], permissive: Demographics | None, labels: labelling.Labels,
                 placement: Placement, dim: int, timings: dict[str, float]) -> dict[str, Any]:
    pc = config.profiles
    banned = labels.banned
    sampled_kept = list(kept.values())
    bans_kept = [banned[uid] for uid in kept]
    clusters = placement.clusters
    report = {
        "users": len(placement.ids),
        "sampled_users": len(sampled),
        "sampler": pc.sampler,
        "seed": config.seed,
        "labeller": pc.labeller,
        "rules": pc.rules if pc.labeller == "llm" else None,
        "labels_file": Path(pc.labels_file).name if pc.labeller == "file" and pc.labels_file else None,
        "llm": labels.llm_info,
        "rejected_users": [r["user_id"] for r in labels.rejects],
        "on_rejected": pc.on_rejected,
        "age_groups": age_group_shares(sampled_kept, spec, permissive),
        "bans": labelling.ban_statistics(bans_kept, config.categories),
        "rule_agreement": labelling.rule_agreement(spec, sampled_kept, bans_kept),
        "embedding": {"model": _model_name(pc.embedding_model or config.llm.model), "dim": dim,
                      "pooling": POOLING, "layer": LAYER},
        "clusters": {"k": clusters.k, "sizes": {str(c): int((clusters.labels == c).sum())
                                                for c in range(clusters.k)},
                     "tsne_perplexity": placement.perplexity},
        "levels": [{"level": lvl, "user_id": uid, "n_banned": len(banned[uid]), "banned": banned[uid],
                    "cluster_id": int(placement.cluster_of[uid])}
                   for uid, lvl in sorted(placement.levels.items(), key=lambda kv: kv[1])],
        "published_level_bans": clustering.PUBLISHED_LEVEL_BANS,
        "splits_method": pc.splits.method,
        "splits": placement.sizes,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    return with_warnings(report)


def with_warnings(report: dict[str, Any]) -> dict[str, Any]:
    """The report with ``warnings`` first: one line per sign that the labels carry no personalization."""
    return {"warnings": label_warnings(report["bans"], [r["n_banned"] for r in report["levels"]]), **report}


def label_warnings(bans: dict[str, Any], level_bans: list[int]) -> list[str]:
    n, nothing, mean = bans["users"], bans["ban_nothing"], bans["mean_banned"] or 0.0
    published = f"published: mean {bans['published_mean_banned']}, {bans['published_ban_nothing']} of 1,000 ban nothing"
    out = []
    if n and nothing > MAX_BAN_NOTHING_SHARE * n:
        out.append(f"labels look degenerate: {nothing} of {n} users ban nothing, mean {mean:.2f} banned ({published})")
    elif abs(mean - bans["published_mean_banned"]) > MEAN_BANNED_TOLERANCE:
        out.append(f"labels look degenerate: mean {mean:.2f} banned categories per user, "
                   f"{nothing} of {n} ban nothing ({published})")
    if len(level_bans) > 1 and len(set(level_bans)) == 1:
        out.append(f"the {len(level_bans)} reference levels all ban {level_bans[0]} categories: the level grid "
                   f"shows no difference between levels")
    return out


def levels_line(report: dict[str, Any]) -> str:
    counts = ", ".join(str(r["n_banned"]) for r in report["levels"])
    published = ", ".join(str(n) for n in report["published_level_bans"])
    return f"levels 0-{len(report['levels']) - 1} ban {counts} categories (published {published})"


def _model_name(model: str) -> str:
    """A local folder by its name only: no machine's absolute path in the report."""
    return Path(model).name if is_local_path(model) else model


def stage_stats(report: dict[str, Any]) -> dict[str, Any]:
    """The manifest's stats: the report's headline figures."""
    bans = report["bans"]
    rejected = report["rejected_users"]
    return {
        "warnings": report["warnings"],
        "users": report["users"], "embedding_dim": report["embedding"]["dim"], "embedding_pooling": POOLING,
        "labeller": report["labeller"], "rejected": len(rejected), "excluded_users": rejected,
        "mean_banned": bans["mean_banned"], "ban_nothing": bans["ban_nothing"], "ban_rate": bans["ban_rate"],
        "rules": report["rules"],
        "rule_agreement": {r["rule"].split(" ->")[0]: f"{r['satisfied']}/{r['applicable']}"
                           for r in report["rule_agreement"]["rules"]},
        "hard_rules": "{satisfied}/{applicable}".format(**report["rule_agreement"]["hard_rules"]),
        "levels": {str(r["level"]): r["n_banned"] for r in report["levels"]},
        "llm_usage": (report["llm"] or {}).get("usage"),
        "splits_method": report["splits_method"], "splits": report["splits"],
    }


def age_group_shares(users: list[Demographics], spec: DemographicsSpec, permissive: Demographics | None
                     ) -> dict[str, Any]:
    """Shares over the sampled users plus the permissive one (as the published figures count them)."""
    counted = users + ([permissive] if permissive else [])
    n = len(counted)
    return {g.name: {"n": sum(u.age_group == g.name for u in counted),
                     "share": round(sum(u.age_group == g.name for u in counted) / n, 4)}
            for g in spec.age_groups}
