"""A tiny random-weight CLIP and a Q16 prompts array of its size, for Q16 without downloads.

``build_tiny_clip`` makes a ``CLIPModel`` (ViT vision tower + projection, a small text tower) and
its PIL image processor; ``save_tiny_clip`` writes them as an ordinary model folder, which the Q16
scorer loads through ``from_pretrained`` exactly like ``openai/clip-vit-large-patch14``. Its
``q16_prompts.npy`` is a toy stand-in for Q16's learned prompts: with random weights any two rows
label (nearly) every image alike, so the rows are placed, from the embeddings of a few
calibration images, to call about ``flag_share`` of such images "inappropriate". The labels mean
nothing; the demo uses them to exercise every screening outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TINY_CLIP_PROJECTION = 16
PROMPTS_FILE = "q16_prompts.npy"


def build_tiny_clip(seed: int = 0, image_size: int = 32, projection_dim: int = TINY_CLIP_PROJECTION
                    ) -> tuple[Any, Any]:
    """(CLIPModel, CLIPImageProcessorPil) with random weights, deterministic for a seed."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from sage_builder.safety.q16 import image_processor_class

    config = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=image_size, patch_size=8),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = image_processor_class()(size={"shortest_edge": image_size},
                                        crop_size={"height": image_size, "width": image_size})
    return model, processor


def calibrated_prompts(embeds: np.ndarray, flag_share: float = 0.2, seed: int = 0) -> np.ndarray:
    """Two rows of equal norm whose Q16 argmax says "inappropriate" for ~``flag_share`` of ``embeds``.

    With unit rows r0, r1 an image is flagged when f.(r1 - r0) > 0. Take w = d + b m (d: the
    embeddings' main direction of spread, m: their mean direction), b at the share's quantile, and
    r0, r1 = a -/+ w with a orthogonal to w, so that both rows have the same norm.
    """
    feats = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
    mean = feats.mean(axis=0)
    mean /= np.linalg.norm(mean)
    centred = feats - feats.mean(axis=0)
    direction = np.linalg.svd(centred, full_matrices=False)[2][0]
    along, base = feats @ direction, feats @ mean
    offset = -float(np.quantile(along / base, 1.0 - flag_share))
    w = direction + offset * mean
    a = np.random.RandomState(seed).randn(feats.shape[1])
    a -= (a @ w) / (w @ w) * w
    a *= 2 * np.linalg.norm(w) / np.linalg.norm(a)
    return np.stack([a - w, a + w]).astype(np.float16)


def save_tiny_clip(out: Path, calibration_images: Sequence[Any] = (), flag_share: float = 0.2) -> Path:
    """Write the tiny CLIP folder (+ ``q16_prompts.npy``); images (PIL) place the toy prompts."""
    import torch

    out = Path(out)
    if (out / "config.json").exists() and (out / PROMPTS_FILE).exists():
        return out
    model, processor = build_tiny_clip()
    if calibration_images:
        pixels = processor(images=list(calibration_images), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).numpy()
        prompts = calibrated_prompts(embeds.astype(np.float64), flag_share)
    else:
        prompts = np.random.RandomState(0).randn(2, model.config.projection_dim).astype(np.float16)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    np.save(tmp / PROMPTS_FILE, prompts)
    tmp.rename(out)
    return out


def prepare_tiny_clip(out: Path, sdxl_dir: Path, n_calibration: int = 16) -> Path:
    """The demo's tiny CLIP, its toy prompts placed on renders of the tiny SDXL at the demo's settings."""
    out = Path(out)
    if (out / "config.json").exists() and (out / PROMPTS_FILE).exists():
        return out
    import torch
    from diffusers import StableDiffusionXLPipeline

    from sage_builder.logs import quiet_libraries

    quiet_libraries()  # no "Loading pipeline components" bar unless -v
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(n_calibration)]
    images = pipe(prompt=[f"calibration scene number {i}" for i in range(n_calibration)], num_inference_steps=2,
                  guidance_scale=5.0, height=64, width=64, generator=generators).images
    return save_tiny_clip(out, images)
