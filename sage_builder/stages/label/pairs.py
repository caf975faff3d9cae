"""The ``pairs`` config: one row per rendered pair with both prompts and both images.

Image bytes come from the render shards through ``render/index.parquet``; shards are read in
render order and only one is held in memory at a time. Every image is checked against the index
(ids and sha256) on the way through.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sage_builder.errors import StageInputError
from sage_builder.progress import progress
from sage_builder.stages.label.dataset import PAIR_SCHEMA, SINGLE_SPLIT, SplitWriter
from sage_builder.stages.label.inputs import PAIR_COLUMNS
from sage_builder.store import RunDir

RENDER_SETTINGS = ("model", "revision", "scheduler", "steps", "guidance", "height", "width", "encoding", "quality")
EXTENSIONS = {"jpeg": "jpg"}


class RenderImages:
    """Image bytes by (pair_id, variant), read from the render shards one shard at a time."""

    def __init__(self, run: RunDir):
        self.run = run
        self.render = run.stage("render")
        index = pq.read_table(self.render.file("index.parquet"),
                              columns=["pair_id", "variant", "shard", "row", "sha256"])
        self.where = {(pid, v): (shard, row, sha) for pid, v, shard, row, sha in zip(
            *(index.column(c).to_pylist() for c in ("pair_id", "variant", "shard", "row", "sha256")))}
        self.cache: dict[str, pa.Table] = {}

    def shard(self, shard: str) -> pa.Table:
        if shard not in self.cache:
            path = self.render.file(shard)
            if not path.exists():
                raise StageInputError(f"{path}: missing render shard (named in {self.render.file('index.parquet')}); "
                                      f"rerun `{self.run.stage_command('render')}`")
            self.cache.clear()  # shards are read in render order: keep one in memory
            self.cache[shard] = pq.read_table(path)
        return self.cache[shard]

    def get(self, pid: str, variant: str) -> tuple[bytes, str, int, dict[str, Any]]:
        """(bytes, encoding, seed, the render row) of one image."""
        shard, row, sha = self.where[(pid, variant)]
        table = self.shard(shard)
        if row >= table.num_rows:
            raise StageInputError(f"{self.render.file(shard)} row {row}: no such row (index.parquet is stale); "
                                  f"rerun `{self.run.stage_command('render', '--force')}`")
        rec = table.slice(row, 1).to_pylist()[0]
        data = rec["image"]
        if rec["pair_id"] != pid or rec["variant"] != variant or hashlib.sha256(data).hexdigest() != sha:
            raise StageInputError(f"{self.render.file(shard)} row {row}: image of pair {pid} ({variant}) does not "
                                  f"match render/index.parquet (sha256 or ids differ); rerun stage render")
        return data, rec.get("encoding") or "jpeg", rec["seed"], rec


def pair_row(pair: dict[str, Any], images: RenderImages) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the pairs-config row of one pair, its unsafe image's render row)."""
    pid = pair["pair_id"]
    u_bytes, ext, seed, rec = images.get(pid, "u")
    s_bytes, ext_s, _, _ = images.get(pid, "s")
    ext = EXTENSIONS.get(ext, ext)
    ext_s = EXTENSIONS.get(ext_s, ext_s)
    row = {**pair, "seed": seed,
           "image_unsafe": {"bytes": u_bytes, "path": f"{pid}_u.{ext}"},
           "image_safe": {"bytes": s_bytes, "path": f"{pid}_s.{ext_s}"},
           "sha256_unsafe": hashlib.sha256(u_bytes).hexdigest(),
           "sha256_safe": hashlib.sha256(s_bytes).hexdigest()}
    return row, rec


def screening_of(run: RunDir) -> dict[str, dict[str, Any]]:
    """pair_id -> its settled screening row (render/screening.parquet), empty when render did not screen."""
    render = run.stage("render")
    manifest = render.read_manifest()
    if manifest is None or "screening.parquet" not in manifest.outputs:
        return {}  # a file left by an earlier, screened render is not this render's
    path = render.file("screening.parquet")
    table = pq.read_table(path, columns=["pair_id", "attempt", "outcome", "scores", "final"])
    return {row["pair_id"]: row for row in table.to_pylist() if row["final"]}


def write_pairs(root: Path, run: RunDir, pairs: pa.Table, shard_rows: int) -> tuple[SplitWriter, dict[str, Any]]:
    """Stream the ``pairs`` config; returns the writer and the render settings of the first image."""
    images = RenderImages(run)
    screened = screening_of(run)
    writer = SplitWriter(root, "pairs", SINGLE_SPLIT, PAIR_SCHEMA, pairs.num_rows, shard_rows)
    settings: dict[str, Any] = {}
    bar = progress(total=pairs.num_rows, desc="label pairs", unit="pair")
    rows: list[dict[str, Any]] = []
    for pair in pairs.select(PAIR_COLUMNS).to_pylist():
        row, rec = pair_row(pair, images)
        screen = screened.get(pair["pair_id"])
        if screen is not None:
            row.update(screen_outcome=screen["outcome"], screen_attempts=screen["attempt"],
                       screen_scores=screen["scores"])
        if not settings:
            settings = {k: rec.get(k) for k in RENDER_SETTINGS}
        rows.append(row)
        if len(rows) >= 256:
            writer.write(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA))
            rows = []
        bar.update(1)
    if rows:
        writer.write(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA))
    bar.close()
    return writer, settings
