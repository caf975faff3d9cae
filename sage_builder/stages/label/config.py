"""Stage 4 (label) configuration."""

from __future__ import annotations

from pydantic import Field

from sage_builder.config_base import StrictModel, execution


class ShardRows(StrictModel):
    """Rows per Parquet shard of each dataset config (the Hub prefers shards of a few hundred MB)."""

    preferences: int = Field(250_000, ge=1, description="rows hold ids and labels only (no images)")
    pairs: int = Field(1_000, ge=1, description="rows hold two images each")
    users: int = Field(20_000, ge=1, description="rows hold the user embedding")


class LabelConfig(StrictModel):
    pairs_per_category: int = Field(3, ge=1, description="K pairs per category per user")
    include_pairs: bool = Field(True, description="write the `pairs` config (image bytes); false for "
                                                  "size or memory benchmarks without images")
    pretty_name: str = Field("Sage (regenerated)", description="dataset card title")
    shard_rows: ShardRows = Field(default_factory=ShardRows, description="rows per Parquet shard, per "
                                  "dataset config")
    batch_rows: int = execution(8192, ge=1, description="records held in memory before a write")
