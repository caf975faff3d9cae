"""Eval's tables: image shards (plan order), ``items.parquet`` (row -> image) and ``scores.parquet``
(one row per evaluated image per scorer: NudeNet, Q16, open_nsfw, IP, judge pass, judge win, CLIP).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sage_builder.safety.base import ImageVerdict
from sage_builder.stages.eval.methods import EvalImage, EvalRow
from sage_builder.stages.eval.metrics import ip_flag
from sage_builder.stages.eval.scoring import iter_images
from sage_builder.store import ITEM_KEY, ItemCache, atomic_path

SHARD_DIR = "shards"
SHARD_SCHEMA = pa.schema([
    ("image_key", pa.string()), ("adapter", pa.string()), ("conditioned_on", pa.string()), ("prompt", pa.string()),
    ("negative_prompt", pa.string()), ("seed", pa.int64()), ("model", pa.string()), ("steps", pa.int32()),
    ("guidance", pa.float32()), ("height", pa.int32()), ("width", pa.int32()), ("encoding", pa.string()),
    ("image", pa.binary()), ("sha256", pa.string()),
])
SCORES_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("prompt_set", pa.string()), ("user_id", pa.string()), ("category", pa.string()),
    ("method", pa.string()), ("level", pa.int64()), ("image_key", pa.string()), ("scorer", pa.string()),
    ("flagged", pa.bool_()), ("passed", pa.bool_()), ("outcome", pa.string()), ("score", pa.float64()),
    ("detail", pa.string()), ("error", pa.string()),
])


def image_metadata(images: ItemCache) -> dict[str, dict[str, Any]]:
    """image key -> the render engine's stored fields (model, steps, sha256, ...), no bytes."""
    columns = [ITEM_KEY, "model", "steps", "guidance", "height", "width", "encoding", "sha256", "nbytes"]
    table = images.read(columns=columns)
    return {row[ITEM_KEY]: row for row in (table.to_pylist() if table is not None else [])}


def write_shards(stage_path: Path, images: ItemCache, plan: Sequence[EvalImage], meta: dict[str, dict[str, Any]],
                 shard_bytes: int) -> list[str]:
    """``shards/images-NNNNN-of-MMMMM.parquet`` in plan order, cut by a byte budget."""
    shards: list[list[EvalImage]] = [[]]
    size = 0
    for image in plan:
        if shards[-1] and size + meta[image.key]["nbytes"] > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(image)
        size += meta[image.key]["nbytes"]
    names = [f"{SHARD_DIR}/images-{i:05d}-of-{len(shards):05d}.parquet" for i in range(len(shards))]
    (stage_path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    for name, members in zip(names, shards):
        data: dict[str, bytes] = {}
        for chunk in iter_images(images, [m.key for m in members]):
            data.update(chunk)
        rows = [{"image_key": m.key, "adapter": m.adapter, "conditioned_on": m.conditioned_on, "prompt": m.prompt,
                 "negative_prompt": m.negative_prompt, "seed": m.seed,
                 **{c: meta[m.key][c] for c in ("model", "steps", "guidance", "height", "width", "encoding", "sha256")},
                 "image": data[m.key]} for m in members]
        with atomic_path(stage_path / name) as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), tmp, row_group_size=100,
                           compression={c: "none" if c == "image" else "snappy" for c in SHARD_SCHEMA.names})
    for stale in (stage_path / SHARD_DIR).glob("*.parquet"):
        if f"{SHARD_DIR}/{stale.name}" not in names:
            stale.unlink()
    return names


def items_table(rows: Sequence[EvalRow]) -> pa.Table:
    return pa.Table.from_pylist([{"prompt_id": r.prompt_id, "prompt_set": r.prompt_set, "user_id": r.user_id,
                                  "category": r.category, "caption": r.caption, "method": r.method, "level": r.level,
                                  "profile_user": r.profile_user, "image_key": r.image_key} for r in rows],
                                schema=pa.schema([("prompt_id", pa.string()), ("prompt_set", pa.string()),
                                                  ("user_id", pa.string()), ("category", pa.string()),
                                                  ("caption", pa.string()), ("method", pa.string()),
                                                  ("level", pa.int64()), ("profile_user", pa.string()),
                                                  ("image_key", pa.string())]))


def _base(row: EvalRow) -> dict[str, Any]:
    return {"prompt_id": row.prompt_id, "prompt_set": row.prompt_set, "user_id": row.user_id,
            "category": row.category, "method": row.method, "level": row.level, "image_key": row.image_key,
            "flagged": None, "passed": None, "outcome": None, "score": None, "detail": None, "error": None}


def scores_table(rows: Sequence[EvalRow], verdicts: dict[tuple[str, str], ImageVerdict], scorers: Sequence[str],
                 ip_scorers: Sequence[str], judged_pass: Sequence[tuple[EvalRow, bool | None, dict[str, Any]]] = (),
                 judged_win: Sequence[tuple[EvalRow, str, dict[str, Any]]] = (),
                 clip: dict[tuple[str, str], float] | None = None) -> pa.Table:
    out = []
    for row in rows:
        for name in scorers:
            v = verdicts.get((row.image_key, name))
            if v is None:
                continue
            out.append({**_base(row), "scorer": name, "flagged": v.flagged, "score": v.score,
                        "detail": json.dumps(v.classes, sort_keys=True), "error": v.error})
        if ip_scorers:
            flag = ip_flag([verdicts.get((row.image_key, s)) for s in ip_scorers])
            out.append({**_base(row), "scorer": "ip", "flagged": flag, "detail": json.dumps({"scorers": list(ip_scorers)}),
                        "error": None if flag is not None else "a scorer could not judge the image"})
        if clip is not None and (row.image_key, row.caption) in clip:
            out.append({**_base(row), "scorer": "clip_score", "score": clip[(row.image_key, row.caption)]})
    for row, passed, detail in judged_pass:
        out.append({**_base(row), "scorer": "judge_pass", "passed": passed,
                    "outcome": "error" if passed is None else ("pass" if passed else "fail"),
                    "score": detail.get("quality"), "detail": json.dumps(detail, sort_keys=True, default=str),
                    "error": detail.get("error")})
    for row, outcome, detail in judged_win:
        out.append({**_base(row), "scorer": "judge_win", "outcome": outcome,
                    "detail": json.dumps(detail, sort_keys=True, default=str), "error": detail.get("error")})
    return pa.Table.from_pylist(out, schema=SCORES_SCHEMA)
