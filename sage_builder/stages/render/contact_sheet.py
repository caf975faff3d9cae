"""A PNG grid for looking at rendered pairs: unsafe | safe side by side, prompts underneath.

Off by default (``sage stage render --contact-sheet N``); the images may be disturbing, so the
file name says so. It is a viewing aid, not a stage output (not in the manifest).
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pyarrow.parquet as pq

CONTACT_SHEET_NAME = "CONTENT-WARNING-contact-sheet.png"


def write_contact_sheet(stage_path: Path, n_pairs: int, tile: int = 256) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    index = pq.read_table(stage_path / "index.parquet").to_pylist()
    pair_ids: list[str] = []
    for row in index:
        if row["pair_id"] not in pair_ids:
            pair_ids.append(row["pair_id"])
    pair_ids = pair_ids[:n_pairs]
    wanted = {(r["pair_id"], r["variant"]): r for r in index if r["pair_id"] in set(pair_ids)}
    tables: dict[str, list[dict]] = {}
    for shard in sorted({r["shard"] for r in wanted.values()}):
        tables[shard] = pq.read_table(stage_path / shard, columns=["prompt", "image"]).to_pylist()

    font = ImageFont.load_default()
    chars = max(16, tile // 6)
    text_h = 12 * 6
    sheet = Image.new("RGB", (2 * tile + 3 * 8, len(pair_ids) * (tile + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, pair_id in enumerate(pair_ids):
        top = 8 + i * (tile + text_h + 8)
        for j, variant in enumerate(("u", "s")):
            entry = wanted.get((pair_id, variant))
            if entry is None:
                continue
            row = tables[entry["shard"]][entry["row"]]
            image = Image.open(io.BytesIO(row["image"])).convert("RGB").resize((tile, tile), Image.NEAREST)
            left = 8 + j * (tile + 8)
            sheet.paste(image, (left, top))
            label = ("UNSAFE: " if variant == "u" else "SAFE: ") + row["prompt"]
            lines = textwrap.wrap(label, chars)[:6]
            draw.multiline_text((left, top + tile + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    out = stage_path / CONTACT_SHEET_NAME
    sheet.save(out, format="PNG")
    return out
