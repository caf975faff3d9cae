"""Scoring eval's images, item-cached: each (image, scorer) verdict is computed once.

A score's key is the hash of the image key and the scorer's identity (model, weights sha256,
thresholds), so a rerun scores only what is missing, and new weights or thresholds rescore. Images
are read from the render item cache part by part, never all at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sage_builder.safety.base import ImageScorer, ImageVerdict
from sage_builder.store import ITEM_KEY, ItemCache, stable_hash

SCORE_SCHEMA = pa.schema([(ITEM_KEY, pa.string()), ("image_key", pa.string()), ("scorer", pa.string()),
                          ("flagged", pa.bool_()), ("score", pa.float64()), ("classes", pa.string()),
                          ("error", pa.string())])


def score_key(image_key: str, identity: str) -> str:
    return stable_hash("eval-score", image_key, identity, length=32)


def iter_images(images: ItemCache, keys: Sequence[str], chunk: int = 64) -> Iterator[list[tuple[str, bytes]]]:
    """(key, encoded bytes) of ``keys`` in chunks, read part by part (the first part holding a key wins)."""
    wanted = set(keys)
    seen: set[str] = set()
    buffer: list[tuple[str, bytes]] = []
    for part in images.parts():
        table = pq.read_table(part, columns=[ITEM_KEY, "image"])
        for key, data in zip(table.column(ITEM_KEY).to_pylist(), table.column("image").to_pylist()):
            if key in wanted and key not in seen:
                seen.add(key)
                buffer.append((key, data))
                if len(buffer) >= chunk:
                    yield buffer
                    buffer = []
    if buffer:
        yield buffer


def _row(image_key: str, scorer: ImageScorer, verdict: ImageVerdict) -> dict[str, Any]:
    return {ITEM_KEY: score_key(image_key, scorer.identity), "image_key": image_key, "scorer": scorer.name,
            "flagged": verdict.flagged, "score": verdict.score,
            "classes": json.dumps(verdict.classes, sort_keys=True), "error": verdict.error}


def score_images(scorers: Sequence[ImageScorer], image_keys: Sequence[str], images: ItemCache, cache: ItemCache,
                 on_scored: Callable[[int], None] | None = None) -> dict[tuple[str, str], ImageVerdict]:
    """(image key, scorer name) -> verdict for every scorer and image; what the cache lacks is scored now."""
    done = cache.done_keys()
    for scorer in scorers:
        todo = [k for k in image_keys if score_key(k, scorer.identity) not in done]
        for chunk in iter_images(images, todo, chunk=max(scorer.batch_size, 16)):
            keys = [k for k, _ in chunk]
            try:
                verdicts = scorer.score([data for _, data in chunk])
            except Exception as exc:  # noqa: BLE001 - a scorer failure is an error verdict, never a clean image
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                verdicts = [ImageVerdict(None, None, error=f"{scorer.name}: {first[:200]}") for _ in keys]
            cache.write(pa.Table.from_pylist([_row(k, scorer, v) for k, v in zip(keys, verdicts)], schema=SCORE_SCHEMA))
            if on_scored:
                on_scored(len(keys))
    wanted = {score_key(k, s.identity): (k, s.name) for s in scorers for k in image_keys}
    table = cache.read(keys=list(wanted))
    out: dict[tuple[str, str], ImageVerdict] = {}
    if table is not None:
        for row in table.to_pylist():
            pair = wanted[row[ITEM_KEY]]
            out[pair] = ImageVerdict(row["flagged"], row["score"], json.loads(row["classes"] or "{}"), row["error"])
    for key, name in wanted.values():
        out.setdefault((key, name), ImageVerdict(None, None, error="image missing from the render cache"))
    return out
