"""Screening's GPU cost at full size: Q16's CLIP ViT-L/14 vision tower (random weights, the real
architecture) on 1024 px images, and NudeNet through onnxruntime when it is installed.

Prints seconds per image for each case and the screening seconds per pair (2 images) as a share of
rendering a pair, against SDXL's render time per image: ``--render-s-per-image`` (default 2.5 s,
the published A100 figure; pass the one bench_render_gpu.py measured on the same machine).
Target (issue 13): screening adds <= 5% to the GPU time of rendering a pair.
Writes $OUT/bench_scorers_gpu.json when OUT is set.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batches", default="1,16,32")
    p.add_argument("--render-s-per-image", type=float, default=2.5)
    args = p.parse_args()

    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.RandomState(0)
    images = []
    for _ in range(args.images):
        buffer = io.BytesIO()
        Image.fromarray((rng.rand(1024, 1024, 3) * 255).astype("uint8")).save(buffer, format="JPEG", quality=95)
        images.append(buffer.getvalue())
    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                              image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(config).to(device).eval()
    try:
        from sage_builder.safety.q16 import image_processor_class, q16_probabilities

        processor = image_processor_class()(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    except Exception:  # noqa: BLE001 - the GPU machine may lack the project's pure-Python deps
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        q16_probabilities = None
    prompts = np.load(ROOT / "sage_builder" / "safety" / "data" / "q16_prompts_vit_l14.npy")
    out: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "images": args.images,
                 "render_s_per_image": args.render_s_per_image, "cases": []}
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        for batch in [int(b) for b in args.batches.split(",")]:
            def run():
                for start in range(0, len(images), batch):
                    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[start:start + batch]]
                    pixels = processor(images=pil, return_tensors="pt")["pixel_values"].to(device, dtype)
                    with torch.inference_mode():
                        embeds = model(pixel_values=pixels).image_embeds.float().cpu().numpy()
                    if q16_probabilities is not None:
                        q16_probabilities(embeds, prompts)
            run()
            sync()
            start = time.perf_counter()
            run()
            sync()
            seconds = (time.perf_counter() - start) / len(images)
            case = {"case": f"q16 ViT-L/14 {str(dtype).split('.')[-1]} batch {batch} (decode + preprocess + model)",
                    "s_per_image": round(seconds, 5),
                    "share_of_pair_render": round(2 * seconds / (2 * args.render_s_per_image), 4)}
            out["cases"].append(case)
            print(json.dumps(case), flush=True)
    try:
        from sage_builder.safety import make_scorer
        from sage_builder.safety.config import ScreenConfig

        nudenet = make_scorer("nudenet", ScreenConfig(), [], device=device)
        nudenet.score(images[:8])
        start = time.perf_counter()
        nudenet.score(images)
        seconds = (time.perf_counter() - start) / len(images)
        case = {"case": f"nudenet batch 16 providers {nudenet.providers}", "s_per_image": round(seconds, 5),
                "share_of_pair_render": round(seconds / args.render_s_per_image, 4)}
    except Exception as exc:  # noqa: BLE001 - onnxruntime/nudenet are not on the GPU machine by default
        case = {"case": "nudenet", "s_per_image": None, "note": f"not measured: {exc.__class__.__name__}: {exc}"[:200]}
    out["cases"].append(case)
    print(json.dumps(case), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_scorers_gpu.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
