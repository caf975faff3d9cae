"""What leaves the machine names no local path: cards, published manifests, reports.

A local path would leak a home directory to the Hub and make two clones of the same run publish
different bytes. Absolute paths become: relative to the run directory when they are inside it, a
model folder's name and content identity (``config_base.public_model_ref``) when they name a model,
else the last path component.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sage_builder.config_base import public_model_ref

# An absolute path token: "/" + components, not preceded by a word character ("render/shards", "50/50",
# URLs' "//host" and base64 text stay as they are).
_ABSOLUTE = re.compile(r"(?<![\w.:/+])(/(?:[\w.@+~-]+/)*[\w.@+~-]+/?)")
_MODEL_FILES = ("model_index.json", "config.json", "tokenizer_config.json")


def public_path(value: str, run_root: Path | None = None) -> str:
    """One absolute path, as it may be published."""
    path = Path(value.rstrip("/"))
    if run_root is not None:
        root = Path(run_root).resolve()
        try:
            return path.resolve().relative_to(root).as_posix() or "."
        except ValueError:
            pass
    if path.is_dir() and any((path / name).exists() for name in _MODEL_FILES):
        return public_model_ref(str(path))
    return path.name or value


def _is_local(token: str) -> bool:
    first = token.strip("/").split("/")[0]
    if not first or len(first) > 255:
        return False
    try:
        return Path("/" + first).exists()
    except OSError:
        return False


def public_text(text: str, run_root: Path | None = None) -> str:
    """``text`` with every absolute path of this machine replaced by :func:`public_path`."""
    return _ABSOLUTE.sub(lambda m: public_path(m.group(1), run_root) if _is_local(m.group(1)) else m.group(1), text)


def public_data(value: Any, run_root: Path | None = None) -> Any:
    """JSON-like data with :func:`public_text` applied to every string (keys included)."""
    if isinstance(value, str):
        return public_text(value, run_root)
    if isinstance(value, dict):
        return {public_text(str(k), run_root): public_data(v, run_root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_data(v, run_root) for v in value]
    return value


def local_paths_in(text: str) -> list[str]:
    """The absolute paths of this machine ``text`` names (for checks and tests)."""
    return [m.group(1) for m in _ABSOLUTE.finditer(text) if _is_local(m.group(1))]
