"""What the dataset card and the manifest say about a label run: counts, Hub configs, settings, lineage."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sage_builder.stages.label.assign import RECORD_SPLITS, Deck
from sage_builder.stages.label.dataset import SplitWriter, hub_split
from sage_builder.stages.label.records import Tally
from sage_builder.store import RunDir

CONFIG_ORDER = ("preferences", "pairs", "users")


def split_counts(writers: dict[str, SplitWriter], users: Counter[str], tally: Tally,
                 decks: dict[tuple[str, str], Deck], categories: list[str]) -> dict[str, dict[str, Any]]:
    """Records, users, records per category, chosen-safe share and pair use per record split.

    Pair use is users per pair over every pair of the split's pools (min, mean, max); repeated
    concepts counts user-category hands that hold one concept twice (the dealing makes it 0).
    """
    counts = {}
    for s in RECORD_SPLITS:
        uses = [n for c in categories for n in decks[(s, c)].pair_uses()]
        records = writers[s].rows
        counts[s] = {"records": records, "users": users[s],
                     "per_category": dict(tally.per_category[s]),
                     "chosen_safe_share": tally.chosen_safe[s] / records if records else 0.0,
                     "pair_uses_min": min(uses, default=0), "pair_uses_max": max(uses, default=0),
                     "pair_uses_mean": sum(uses) / len(uses) if uses else 0.0,
                     "repeated_concepts": sum(decks[(s, c)].repeats for c in categories)}
    return counts


def split_size(writer: SplitWriter) -> dict[str, int]:
    return {"num_examples": writer.rows, "num_bytes": writer.nbytes}


def hub_configs(split_sizes: dict[str, dict[str, dict[str, int]]],
                features: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The card's ``configs`` and ``dataset_info`` front-matter entries, one per written config."""
    configs_yaml, info_yaml = [], []
    for name in CONFIG_ORDER:
        if name not in split_sizes:
            continue
        entry: dict[str, Any] = {"config_name": name}
        if name == "preferences":
            entry["default"] = True
        entry["data_files"] = [{"split": hub_split(s), "path": f"data/{name}/{hub_split(s)}-*.parquet"}
                               for s in split_sizes[name]]
        configs_yaml.append(entry)
        info_yaml.append({"config_name": name, "features": features[name]._to_yaml_list(),
                          "splits": [{"name": hub_split(s), **v} for s, v in split_sizes[name].items()]})
    return configs_yaml, info_yaml


def lineage(run: RunDir, stages: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Manifest hash and fingerprint of each input stage."""
    out = {}
    for stage in stages:
        m = run.stage(stage).read_manifest()
        assert m is not None
        out[stage] = {"content_hash": m.content_hash(), "fingerprint": m.fingerprint}
    return out


def generation_settings(config: Any, run: RunDir, render_settings: dict[str, Any]) -> dict[str, Any]:
    """The card's "Generation settings" table: LLM, templates, models and the render settings used."""
    llm = config.llm
    settings: dict[str, Any] = {
        "LLM": f"{llm.model} ({llm.backend}" + (f", revision {llm.revision}" if llm.revision else "") + ")",
        "LLM sampling": f"temperature {llm.temperature}, top_p {llm.top_p}, seed {llm.seed}",
        "global seed": config.seed,
    }
    for stage in ("profiles", "prompts", "render"):
        m = run.stage(stage).read_manifest()
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


def ban_rates(profiles_path: Any, categories: list[str], run: RunDir) -> dict[str, Any]:
    """Per-category share of the users with records who ban it; the published rates from stage 1's
    report.json when it has them."""
    import json

    import pyarrow.parquet as pq

    table = pq.read_table(profiles_path, columns=["banned", "split"]).to_pylist()
    banned = [row["banned"] or [] for row in table if row["split"] in ("train", "val", "test_unseen")]
    n = len(banned)
    count = {c: sum(c in b for b in banned) for c in categories}
    report = run.stage("profiles").file("report.json")
    published: dict[str, Any] = {}
    if report.exists():
        try:
            published = json.loads(report.read_text()).get("bans", {}).get("published_ban_rate") or {}
        except ValueError:
            published = {}
    return {"users": n, "count": count, "rate": {c: count[c] / n if n else 0.0 for c in categories},
            "mean": sum(len(b) for b in banned) / n if n else 0.0, "nothing": sum(1 for b in banned if not b),
            "published": published}
