"""Text on pictures (the train grid, the render contact sheet): a readable font, lines wrapped to a
pixel width, and an ellipsis where text is cut, so no label is silently truncated."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=8)
def font(size: int = 14) -> Any:
    """Pillow's bundled scalable font (no system fonts needed) at ``size`` px."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def text_width(text: str, size: int) -> float:
    return font(size).getlength(text)


def wrap(text: str, width_px: int, size: int = 14, max_lines: int | None = None) -> list[str]:
    """Words wrapped to ``width_px``; a word longer than a line is split; when more lines than
    ``max_lines`` would be needed, the last kept line ends with an ellipsis."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if text_width(candidate, size) <= width_px:
            line = candidate
            continue
        if line:
            lines.append(line)
        while text_width(word, size) > width_px and len(word) > 1:
            cut = len(word)
            while cut > 1 and text_width(word[:cut], size) > width_px:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and text_width(last + " …", size) > width_px:
            last = last[:-1]
        lines[-1] = last.rstrip() + " …"
    return lines


def line_height(size: int) -> int:
    return int(size * 1.3)


def draw_lines(draw: Any, xy: tuple[int, int], lines: list[str], size: int = 14, fill: str = "black") -> int:
    """Draw ``lines`` from ``xy`` down; returns the y below the last line."""
    x, y = xy
    for text in lines:
        draw.text((x, y), text, fill=fill, font=font(size))
        y += line_height(size)
    return y
