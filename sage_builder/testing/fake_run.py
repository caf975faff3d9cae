"""A small, synthetic run directory with stages 1-3 marked done, for tests and benchmarks.

``make_fake_run(root)`` writes ``profiles/profiles.parquet``, ``prompts/concepts.parquet``,
``prompts/pairs.parquet``, ``render/index.parquet`` and ``render/shards/*.parquet`` in the data
contracts of the team brief, plus a manifest per stage (render records the prompts manifest hash as
its input), so that ``run_stage`` of stage 4 and later accepts them as done. Images are tiny solid
JPEGs; ``image_bytes=False`` writes the render index only (labelling benchmarks without bytes).

Usage from another test::

    from sage_builder.testing.fake_run import make_fake_run
    run, config = make_fake_run(tmp_path / "run", n_users=20)
    run_stage(get_stage("label"), config, run)      # -> run/label/dataset/
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sage_builder.config import DEFAULT_CATEGORIES, PipelineConfig, config_from_dict
from sage_builder.store import Manifest, RunDir, stable_hash, write_parquet

AGE_GROUPS = [("infants & toddlers", 0, 3), ("children", 4, 12), ("adolescents", 13, 19),
              ("young adults", 20, 34), ("middle-aged", 35, 59), ("young elderly", 60, 74),
              ("elderly", 75, 89), ("long-lived elderly", 90, 100)]


def fake_config(n_users: int, pairs_per_concept: int = 4, pairs_per_category: int = 2,
                categories: list[str] | None = None, **label: Any) -> PipelineConfig:
    data: dict[str, Any] = {
        "name": "fake",
        "seed": 7,
        "llm": {"backend": "transformers", "model": "fake/llm"},
        "profiles": {"n_users": n_users},
        "prompts": {"pairs_per_concept": pairs_per_concept},
        "render": {"model": "fake/tiny-sdxl", "steps": 2, "guidance": 5.0, "height": 16, "width": 16},
        "label": {"pairs_per_category": pairs_per_category, **label},
    }
    if categories is not None:
        data["categories"] = categories
    return config_from_dict(data)


def split_roles(n_users: int) -> tuple[list[str], np.ndarray]:
    """Split role per user (ids 1..n) and the test_seen mask, scaled from 900/50/50 (+50 seen)."""
    n_val = max(1, round(n_users * 50 / 1000))
    n_unseen = max(1, round(n_users * 50 / 1000))
    n_train = n_users - n_val - n_unseen
    n_seen = min(n_train, max(1, round(n_users * 50 / 1000)))
    roles = ["train"] * n_train + ["val"] * n_val + ["test_unseen"] * n_unseen
    test_seen = np.zeros(n_users, dtype=bool)
    # Every (n_train // n_seen)-th train user is a test_seen user.
    step = max(1, n_train // n_seen)
    test_seen[np.arange(0, n_train, step)[:n_seen]] = True
    return roles, test_seen


def fake_profiles(n_users: int, categories: list[str], embedding_dim: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    total = n_users + 1
    groups = rng.integers(0, len(AGE_GROUPS), total)
    ages = np.array([rng.integers(AGE_GROUPS[g][1], AGE_GROUPS[g][2] + 1) for g in groups], dtype=np.int64)
    banned_mask = rng.random((total, len(categories))) < 0.5
    banned_mask[-1] = False  # the permissive reference user bans nothing
    banned = [[c for c, b in zip(categories, row) if b] for row in banned_mask]
    allowed = [[c for c, b in zip(categories, row) if not b] for row in banned_mask]
    roles, test_seen = split_roles(n_users)
    roles = roles + ["reference"]
    test_seen = np.append(test_seen, False)
    levels: list[int | None] = [None] * total
    for level, uid in enumerate(range(0, min(5, n_users))):
        levels[uid] = level + 1
    levels[-1] = 0
    embedding = rng.standard_normal((total, embedding_dim)).astype(np.float32)
    return pa.table({
        "user_id": pa.array([f"{i:07d}" for i in range(1, total + 1)]),
        "age": pa.array(ages, pa.int64()),
        "age_group": pa.array([AGE_GROUPS[g][0] for g in groups]),
        "gender": pa.array(rng.choice(["male", "female"], total).tolist()),
        "religion": pa.array(rng.choice(["Christianity", "Islam", "Buddhism", "None"], total).tolist()),
        "physical_condition": pa.array(rng.choice(["healthy", "visual impairment"], total).tolist()),
        "mental_condition": pa.array(rng.choice(["healthy", "anxiety", "war"], total).tolist()),
        "banned": pa.array(banned, pa.list_(pa.string())),
        "allowed": pa.array(allowed, pa.list_(pa.string())),
        "labeller": pa.array(["rules"] * total),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embedding.reshape(-1)), embedding_dim),
        "cluster_id": pa.array(rng.integers(0, 5, total), pa.int64()),
        "level": pa.array(levels, pa.int64()),
        "split": pa.array(roles),
        "test_seen": pa.array(test_seen),
    })


def fake_pairs(categories: list[str], concepts_per_category: int, pairs_per_concept: int,
               names: dict[str, list[str]] | None = None) -> tuple[pa.Table, pa.Table]:
    """Concepts and pairs; ``names`` (category -> concept names) replaces the made-up concepts."""
    concepts, pairs = [], []
    for category in categories:
        chosen = names[category] if names is not None else [f"{category.lower()} concept {c}"
                                                            for c in range(concepts_per_category)]
        for concept in chosen:
            concept_id = stable_hash(category, concept, length=12)
            concepts.append({"concept_id": concept_id, "category": category, "concept": concept,
                             "description": f"a made-up {category} concept", "source": "fake"})
            for idx in range(1, pairs_per_concept + 1):
                pairs.append({
                    "pair_id": stable_hash(category, concept, idx, length=16), "concept_id": concept_id,
                    "category": category, "concept": concept, "idx": idx,
                    "prompt_unsafe": f"an unsafe scene {idx} evoking {concept}",
                    "prompt_safe": f"a safe scene {idx} near {concept}",
                    "tokens_unsafe": 9, "tokens_safe": 8, "llm_model": "fake/llm", "llm_temperature": 0.0,
                })
    return pa.Table.from_pylist(concepts), pa.Table.from_pylist(pairs)


def _jpeg(colour: tuple[int, int, int], size: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def fake_render(pairs: pa.Table, image_bytes: bool, image_size: int = 16, shard_rows: int = 64,
                seed: int = 7) -> tuple[pa.Table, list[pa.Table]]:
    import hashlib

    rows = []
    for pair in pairs.select(["pair_id", "prompt_unsafe", "prompt_safe"]).to_pylist():
        pair_seed = int(stable_hash(seed, pair["pair_id"], length=8), 16)
        for variant, prompt in (("u", pair["prompt_unsafe"]), ("s", pair["prompt_safe"])):
            data = b""
            if image_bytes:
                h = hashlib.sha256(f"{pair['pair_id']}{variant}".encode()).digest()
                data = _jpeg((h[0], h[1], h[2]), image_size)
            rows.append({
                "image_key": stable_hash(prompt, pair_seed, "fake-render", length=32), "pair_id": pair["pair_id"],
                "variant": variant, "prompt": prompt, "seed": pair_seed, "model": "fake/tiny-sdxl",
                "revision": None, "scheduler": "EulerDiscreteScheduler", "steps": 2, "guidance": 5.0,
                "height": image_size, "width": image_size, "encoding": "jpeg", "quality": 90,
                "image": data, "sha256": hashlib.sha256(data).hexdigest(),
            })
    shards, index = [], []
    for start in range(0, len(rows), shard_rows):
        chunk = rows[start:start + shard_rows]
        name = f"shards/shard-{start // shard_rows:05d}.parquet"
        shards.append(pa.Table.from_pylist(chunk))
        for r, row in enumerate(chunk):
            index.append({"pair_id": row["pair_id"], "variant": row["variant"], "image_key": row["image_key"],
                          "shard": name, "row": r, "sha256": row["sha256"]})
    return pa.Table.from_pylist(index), shards


def _finish(run: RunDir, stage: str, outputs: list[str], inputs: dict[str, str], stats: dict[str, Any]) -> Manifest:
    stage_dir = run.stage(stage)
    described = stage_dir.describe_outputs(outputs)
    manifest = Manifest(stage=stage, fingerprint=stable_hash("fake", stage, inputs), config_hash="fake",
                        templates={f"{stage}.txt": stable_hash(stage)}, models={"fake": {"model": f"fake/{stage}"}},
                        inputs=inputs, outputs=described,
                        rows={k: v.rows for k, v in described.items() if v.rows is not None}, stats=stats)
    stage_dir.write_manifest(manifest)
    return manifest


def make_fake_run(root: Path, n_users: int = 20, concepts_per_category: int = 3, pairs_per_concept: int = 4,
                  pairs_per_category: int = 2, embedding_dim: int = 8, image_bytes: bool = True,
                  categories: list[str] | None = None, seed: int = 0,
                  concepts: dict[str, list[str]] | None = None, **label: Any) -> tuple[RunDir, PipelineConfig]:
    """Write stages 1-3 of a synthetic run under ``root``; returns (run, matching config).

    ``concepts`` (category -> concept names, e.g. the published pool) replaces
    ``concepts_per_category`` made-up concepts per category."""
    categories = list(categories or DEFAULT_CATEGORIES)
    config = fake_config(n_users, pairs_per_concept, pairs_per_category, categories, **label)
    run = RunDir(root)
    run.root.mkdir(parents=True, exist_ok=True)

    write_parquet(fake_profiles(n_users, categories, embedding_dim, seed), run.stage("profiles").file("profiles.parquet"))
    _finish(run, "profiles", ["profiles.parquet"], {}, {"embedding_dim": embedding_dim})

    concept_table, pairs = fake_pairs(categories, concepts_per_category, pairs_per_concept, concepts)
    write_parquet(concept_table, run.stage("prompts").file("concepts.parquet"))
    write_parquet(pairs, run.stage("prompts").file("pairs.parquet"))
    prompts = _finish(run, "prompts", ["concepts.parquet", "pairs.parquet"], {}, {"pairs": pairs.num_rows})

    index, shards = fake_render(pairs, image_bytes)
    outputs = ["index.parquet"]
    if image_bytes:
        for i, shard in enumerate(shards):
            rel = f"shards/shard-{i:05d}.parquet"
            write_parquet(shard, run.stage("render").file(rel))
            outputs.append(rel)
    write_parquet(index, run.stage("render").file("index.parquet"))
    _finish(run, "render", outputs, {"prompts": prompts.content_hash()}, {"images": index.num_rows})
    return run, config

