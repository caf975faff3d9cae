"""Assembling the published shards and index from the item cache, in plan order.

The item cache holds one part per rendered batch, in whatever order workers finished. The output
is rebuilt from it deterministically: images in the order of ``pairs.parquet`` (unsafe, then
safe), cut into shards by a byte budget, so the same plan gives byte-identical shards however it
was rendered (1 or N workers, interrupted or not). Parts are read lazily and dropped after their
last use, so memory stays near one part per worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sage_builder.store import ITEM_KEY, ItemCache, atomic_path

SHARD_DIR = "shards"
# Row groups of ~100 images: what the Hub's dataset viewer and random access like for image data.
ROW_GROUP_ROWS = 100
SHARD_COLUMNS = ["image_key", "pair_id", "variant", "prompt", "seed", "model", "revision", "scheduler", "steps",
                 "guidance", "height", "width", "dtype", "encoding", "quality", "image", "sha256"]


@dataclass(frozen=True)
class PlannedImage:
    """One (pair, variant) of the plan and the key of the image it needs."""

    pair_id: str
    variant: str
    key: str


def _locate(cache: ItemCache, keys: set[str]) -> tuple[list[Path], dict[str, tuple[int, int, int]]]:
    """key -> (part number, row, nbytes); the first part (by name) that holds a key wins."""
    parts = cache.parts()
    where: dict[str, tuple[int, int, int]] = {}
    for p, part in enumerate(parts):
        table = pq.read_table(part, columns=[ITEM_KEY, "nbytes"])
        for row, (key, nbytes) in enumerate(zip(table.column(ITEM_KEY).to_pylist(),
                                                table.column("nbytes").to_pylist())):
            if key in keys and key not in where:
                where[key] = (p, row, nbytes)
    return parts, where


def assemble_shards(stage_path: Path, cache: ItemCache, plan: Sequence[PlannedImage],
                    shard_bytes: int) -> tuple[list[str], pa.Table]:
    """Write ``shards/*.parquet`` (one row per distinct key) and return (shard relpaths, index table)."""
    first_of: dict[str, PlannedImage] = {}
    for item in plan:
        first_of.setdefault(item.key, item)
    unique = list(first_of.values())
    parts, where = _locate(cache, {item.key for item in unique})
    missing = [item for item in unique if item.key not in where]
    if missing:
        raise RuntimeError(f"image {missing[0].key} (pair {missing[0].pair_id}/{missing[0].variant}) "
                           f"was not rendered; {len(missing)} missing in all")
    shards = cut_shards(unique, {key: nbytes for key, (_, _, nbytes) in where.items()}, shard_bytes)
    names = [f"{SHARD_DIR}/images-{i:05d}-of-{len(shards):05d}.parquet" for i in range(len(shards))]
    position = _write_shards(stage_path, parts, where, names, shards)
    # Shards of an earlier assembly with another layout would be picked up by a glob: remove them.
    for stale in (stage_path / SHARD_DIR).glob("*.parquet"):
        if f"{SHARD_DIR}/{stale.name}" not in names:
            stale.unlink()
    return names, _index(stage_path, names, plan, position)


def cut_shards(unique: Sequence[PlannedImage], nbytes: dict[str, int], shard_bytes: int) -> list[list[PlannedImage]]:
    """Consecutive images, a new shard whenever the next image would pass the byte budget."""
    shards: list[list[PlannedImage]] = [[]]
    size = 0
    for item in unique:
        if shards[-1] and size + nbytes[item.key] > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes[item.key]
    return shards


def _write_shards(stage_path: Path, parts: list[Path], where: dict[str, tuple[int, int, int]], names: list[str],
                  shards: list[list[PlannedImage]]) -> dict[str, tuple[str, int]]:
    """Write each shard from the parts that hold its rows; key -> (shard, row). A part is dropped after
    the last shard that needs it."""
    last_use: dict[int, int] = {}
    for s, items in enumerate(shards):
        for item in items:
            last_use[where[item.key][0]] = s
    loaded: dict[int, pa.Table] = {}
    position: dict[str, tuple[str, int]] = {}
    (stage_path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    for s, (name, items) in enumerate(zip(names, shards)):
        pieces = []
        for item in items:
            p, row, _ = where[item.key]
            if p not in loaded:
                loaded[p] = pq.read_table(parts[p])
            pieces.append(loaded[p].slice(row, 1))
        table = pa.concat_tables(pieces).rename_columns(
            ["image_key" if c == ITEM_KEY else c for c in pieces[0].column_names])
        table = table.append_column("pair_id", pa.array([i.pair_id for i in items], pa.string())) \
            .append_column("variant", pa.array([i.variant for i in items], pa.string())) \
            .select(SHARD_COLUMNS)
        with atomic_path(stage_path / name) as tmp:
            # Encoded images do not compress further: spend no CPU trying.
            pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS,
                           compression={c: "none" if c == "image" else "snappy" for c in SHARD_COLUMNS})
        for row, item in enumerate(items):
            position[item.key] = (name, row)
        for p in [p for p in loaded if last_use[p] <= s]:
            del loaded[p]
    return position


def _index(stage_path: Path, names: list[str], plan: Sequence[PlannedImage],
           position: dict[str, tuple[str, int]]) -> pa.Table:
    """(pair, variant) -> image key, shard, row and the sha256 the shard holds."""
    sha_of = {}
    for name in names:
        t = pq.read_table(stage_path / name, columns=["image_key", "sha256"])
        sha_of.update(zip(t.column("image_key").to_pylist(), t.column("sha256").to_pylist()))
    return pa.table({
        "pair_id": pa.array([i.pair_id for i in plan], pa.string()),
        "variant": pa.array([i.variant for i in plan], pa.string()),
        "image_key": pa.array([i.key for i in plan], pa.string()),
        "shard": pa.array([position[i.key][0] for i in plan], pa.string()),
        "row": pa.array([position[i.key][1] for i in plan], pa.int64()),
        "sha256": pa.array([sha_of[i.key] for i in plan], pa.string()),
    })
