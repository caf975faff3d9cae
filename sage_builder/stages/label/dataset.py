"""The dataset directory in the Hub's layout: ``data/<config>/<split>-NNNNN-of-MMMMM.parquet``.

Each split is streamed through :class:`SplitWriter`, which knows the split's row count in advance
(so shard names can say ``-of-MMMMM``) and rolls over to the next shard every ``shard_rows``
rows. Every shard carries the ``datasets`` features in its schema metadata, so ``Image()`` columns
decode and fixed-length embeddings keep their length when the directory is loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

CONFIGS = ("preferences", "pairs", "users")
# `all` is reserved by `datasets` (the union of splits), so single-split configs use `train`.
SINGLE_SPLIT = "train"

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

PREFERENCE_SCHEMA = pa.schema([
    ("record_id", pa.string()), ("user_id", pa.string()), ("pair_id", pa.string()),
    ("concept_id", pa.string()), ("category", pa.string()), ("concept", pa.string()), ("idx", pa.int64()),
    ("caption", pa.string()), ("caption_variant", pa.string()), ("chosen_variant", pa.string()),
    ("rejected_variant", pa.string()), ("reason", pa.string()),
    ("age", pa.int64()), ("age_group", pa.string()), ("gender", pa.string()), ("religion", pa.string()),
    ("physical_condition", pa.string()), ("mental_condition", pa.string()),
    ("banned", pa.list_(pa.string())), ("cluster_id", pa.int64()),
])
USER_COLUMNS = ["age", "age_group", "gender", "religion", "physical_condition", "mental_condition", "banned",
                "cluster_id"]

PAIR_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("concept_id", pa.string()), ("category", pa.string()), ("concept", pa.string()),
    ("idx", pa.int64()), ("prompt_unsafe", pa.string()), ("prompt_safe", pa.string()), ("seed", pa.int64()),
    ("image_unsafe", IMAGE_TYPE), ("image_safe", IMAGE_TYPE),
    ("sha256_unsafe", pa.string()), ("sha256_safe", pa.string()),
    # render.screen: the pair's outcome, renders it took, and every scorer's verdicts (JSON); null unscreened.
    ("screen_outcome", pa.string()), ("screen_attempts", pa.int64()), ("screen_scores", pa.string()),
])
IMAGE_COLUMNS = ("image_unsafe", "image_safe")


def features_for(schema: pa.Schema) -> Any:
    """``datasets.Features`` of a schema; image structs become ``Image()``."""
    import datasets

    features = datasets.Features.from_arrow_schema(pa.schema([f.remove_metadata() for f in schema]))
    for name in IMAGE_COLUMNS:
        if name in features:
            features[name] = datasets.Image()
    return features


def with_features(schema: pa.Schema) -> pa.Schema:
    """The schema with the ``huggingface`` metadata `datasets` reads its features from."""
    features = features_for(schema)
    meta = {b"huggingface": json.dumps({"info": {"features": features.to_dict()}}).encode()}
    return pa.schema(list(schema), metadata=meta)


# Split names on disk and on the Hub: the held-out split is `validation` there (the HF convention,
# which diffusers' DPO example defaults to); inside the pipeline, and in the psalign export, it is `val`.
HUB_SPLIT_NAMES = {"val": "validation"}


def hub_split(split: str) -> str:
    return HUB_SPLIT_NAMES.get(split, split)


def shard_files(root: Path, config: str, split: str) -> list[Path]:
    """The shards of one split of one config in a dataset directory, in order."""
    return sorted((root / "data" / config).glob(f"{hub_split(split)}-*.parquet"))


def shard_name(config: str, split: str, index: int, count: int) -> str:
    return f"data/{config}/{hub_split(split)}-{index:05d}-of-{count:05d}.parquet"


class SplitWriter:
    """Streams one split of one config into ``ceil(total / shard_rows)`` shards under ``root``."""

    def __init__(self, root: Path, config: str, split: str, schema: pa.Schema, total_rows: int, shard_rows: int):
        self.root = Path(root)
        self.config = config
        self.split = split
        self.schema = with_features(schema)
        self.total_rows = total_rows
        self.shard_rows = shard_rows
        self.count = max(1, math.ceil(total_rows / shard_rows))
        self.shards: list[str] = []
        self.rows = 0
        self.nbytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0

    def _open(self) -> None:
        rel = shard_name(self.config, self.split, len(self.shards), self.count)
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.shards.append(rel)
        self._in_shard = 0

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        offset = 0
        while offset < table.num_rows:
            if self._writer is None or (self._in_shard >= self.shard_rows and len(self.shards) < self.count):
                self.close_shard()
                self._open()
            room = self.shard_rows - self._in_shard if len(self.shards) < self.count else table.num_rows
            piece = table.slice(offset, min(room, table.num_rows - offset))
            self._writer.write_table(piece)  # type: ignore[union-attr]
            self._in_shard += piece.num_rows
            self.rows += piece.num_rows
            self.nbytes += piece.nbytes
            offset += piece.num_rows

    def close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[str]:
        if not self.shards:
            self._open()  # an empty split still gets one (empty) shard, so its data_files resolve
        self.close_shard()
        if self.rows != self.total_rows:
            raise RuntimeError(f"{self.config}/{self.split}: wrote {self.rows} rows, expected {self.total_rows}")
        return self.shards
