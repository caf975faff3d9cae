"""Tables that more than one stage writes: one schema each, so the writers cannot drift apart."""

from __future__ import annotations

import pyarrow as pa


def profiles_schema(dim: int) -> pa.Schema:
    """Stage 1's ``profiles.parquet``; ``sage import`` writes the same columns into the ``users`` config."""
    return pa.schema([
        ("user_id", pa.string()), ("age", pa.int64()), ("age_group", pa.string()), ("gender", pa.string()),
        ("religion", pa.string()), ("physical_condition", pa.string()), ("mental_condition", pa.string()),
        ("banned", pa.list_(pa.string())), ("allowed", pa.list_(pa.string())), ("labeller", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)), ("cluster_id", pa.int64()), ("level", pa.int64()),
        ("split", pa.string()), ("test_seen", pa.bool_()),
    ])
