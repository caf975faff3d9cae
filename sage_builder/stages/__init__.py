"""The seven stages, in order. Each lives in its own package with ``config.py`` and ``stage.py``.

Stage modules are imported on first use so that ``sage status`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from sage_builder.errors import SageError

if TYPE_CHECKING:
    from sage_builder.stages.base import Stage

STAGE_ORDER = ["profiles", "prompts", "render", "label", "publish", "train", "eval"]


def get_stage(name_or_number: str | int) -> Stage:
    key = str(name_or_number).strip().lower()
    if key.isdigit() and 1 <= int(key) <= len(STAGE_ORDER):
        key = STAGE_ORDER[int(key) - 1]
    if key not in STAGE_ORDER:
        raise SageError(f"unknown stage '{name_or_number}'; choose one of "
                        + ", ".join(f"{i + 1}={n}" for i, n in enumerate(STAGE_ORDER)))
    module = importlib.import_module(f"sage_builder.stages.{key}.stage")
    return module.STAGE


def all_stages() -> list[Stage]:
    return [get_stage(name) for name in STAGE_ORDER]
