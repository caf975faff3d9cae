"""Progress bars for long work (tqdm on stderr; quieter when stderr is not a terminal)."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", unit: str = "it", **kwargs: Any) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True,
                mininterval=0.5 if interactive else 10.0,
                disable=os.environ.get("SAGE_NO_PROGRESS") == "1", **kwargs)
