"""A PNG grid for looking at rendered pairs: unsafe | safe side by side, one pair per row.

Each row is headed by the pair's category, concept and pair id (from ``prompts/pairs.parquet``,
this stage's input) and each image is captioned with its prompt, wrapped, an ellipsis where it had
to be cut. Off by default (``sage stage render --contact-sheet N``); the images may be disturbing,
so the file name says so. It is a viewing aid, not a stage output (not in the manifest).
``contact_sheet(..., blur=R)`` blurs the images themselves (the run report's default).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

CONTACT_SHEET_NAME = "CONTENT-WARNING-contact-sheet.png"
FONT = 13
CAPTION_LINES = 4


def _pair_labels(stage_path: Path, pair_ids: list[str]) -> dict[str, dict[str, Any]]:
    pairs = stage_path.parent / "prompts" / "pairs.parquet"
    if not pairs.exists():
        return {}
    wanted = set(pair_ids)
    table = pq.read_table(pairs, columns=["pair_id", "category", "concept", "idx"]).to_pylist()
    return {row["pair_id"]: row for row in table if row["pair_id"] in wanted}


def contact_sheet(stage_path: Path, n_pairs: int, tile: int = 256, blur: float = 0.0) -> Any:
    """The sheet of the first ``n_pairs`` pairs of the render index, as a PIL image."""
    from PIL import Image, ImageDraw, ImageFilter

    from sage_builder.report.drawing import draw_lines, line_height, wrap

    index = pq.read_table(stage_path / "index.parquet").to_pylist()
    pair_ids = list(dict.fromkeys(row["pair_id"] for row in index))[:n_pairs]
    wanted = {(r["pair_id"], r["variant"]): r for r in index if r["pair_id"] in set(pair_ids)}
    tables: dict[str, list[dict]] = {}
    for shard in sorted({r["shard"] for r in wanted.values()}):
        tables[shard] = pq.read_table(stage_path / shard, columns=["prompt", "image"]).to_pylist()
    labels = _pair_labels(stage_path, pair_ids)

    pad = 10
    head_h = line_height(FONT + 1) + 4
    text_h = CAPTION_LINES * line_height(FONT) + 4
    row_h = head_h + tile + text_h + pad
    sheet = Image.new("RGB", (2 * tile + 3 * pad, len(pair_ids) * row_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, pair_id in enumerate(pair_ids):
        top = pad + i * row_h
        meta = labels.get(pair_id, {})
        head = " · ".join(x for x in (meta.get("category"), meta.get("concept"),
                                       f"#{meta['idx']}" if meta.get("idx") else None, f"pair {pair_id}") if x)
        draw_lines(draw, (pad, top), wrap(head, 2 * tile + pad, FONT + 1, max_lines=1), FONT + 1, fill="#1a365d")
        for j, variant in enumerate(("u", "s")):
            entry = wanted.get((pair_id, variant))
            left = pad + j * (tile + pad)
            if entry is None:
                draw_lines(draw, (left, top + head_h), ["(not rendered)"], FONT, fill="#888888")
                continue
            row = tables[entry["shard"]][entry["row"]]
            image = Image.open(io.BytesIO(row["image"])).convert("RGB").resize((tile, tile), Image.NEAREST)
            if blur:
                image = image.filter(ImageFilter.GaussianBlur(blur))
            sheet.paste(image, (left, top + head_h))
            label = ("UNSAFE: " if variant == "u" else "SAFE: ") + row["prompt"]
            draw_lines(draw, (left, top + head_h + tile + 2), wrap(label, tile, FONT, max_lines=CAPTION_LINES), FONT)
    return sheet


def write_contact_sheet(stage_path: Path, n_pairs: int, tile: int = 256) -> Path:
    out = stage_path / CONTACT_SHEET_NAME
    contact_sheet(stage_path, n_pairs, tile).save(out, format="PNG")
    return out
