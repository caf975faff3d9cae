"""Render stage vs a plain diffusers loop on CPU, tiny random SDXL, as a ratio measured in one run.

Both paths load the same saved pipeline (``.cache/models/tiny-sdxl``, from ``make models``) and
render the same prompts with the same per-image seeds and batch size:

  plain: an untouched ``StableDiffusionXLPipeline``; ``pipe(prompt=[...], generator=[...]).images``
  stage: the render engine as the stage runs it on CPU (batch-invariant setup, per-image text
         encoding and VAE decode, uint8 conversion, background JPEG encoding, sha256, Parquet
         item-cache parts, final drain included)

Rounds alternate which path goes first so that load from other processes hits both alike; the
reported ratio is the median of the per-round ratios (stage images/s / plain images/s in the same
round), with the ratio of the median times beside it. Usage: ``python benchmarks/bench_render_cpu.py [--images 16 --steps 8]``.
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / ".cache" / "models" / "tiny-sdxl"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch
    from diffusers import StableDiffusionXLPipeline

    from sage_builder.stages.render.config import RenderConfig
    from sage_builder.diffusion import (ImageJob, RenderSettings, image_key, load_pipeline,
                                                   make_batch_invariant, pair_seed, render_jobs)
    from sage_builder.store import ItemCache

    torch.set_num_threads(args.threads)
    config = RenderConfig(model=args.model, steps=args.steps, guidance=7.5, height=args.size, width=args.size,
                          device="cpu", batch_size=args.batch)
    settings = RenderSettings.from_config(config, "cpu")
    stage_pipe = load_pipeline(config, "cpu")
    make_batch_invariant(stage_pipe)
    plain_pipe = StableDiffusionXLPipeline.from_pretrained(args.model, local_files_only=True)
    plain_pipe.set_progress_bar_config(disable=True)

    jobs = []
    for i in range(args.images):
        prompt = f"scene {i}: a street market with lanterns and rain, photo"
        seed = pair_seed(2025, f"bench-{i // 2}")
        jobs.append(ImageJob(image_key(prompt, seed, settings), prompt, seed))

    def plain() -> None:
        for i in range(0, len(jobs), args.batch):
            chunk = jobs[i:i + args.batch]
            generators = [torch.Generator("cpu").manual_seed(j.seed) for j in chunk]
            plain_pipe(prompt=[j.prompt for j in chunk], num_inference_steps=args.steps, guidance_scale=7.5,
                       height=args.size, width=args.size, generator=generators).images

    workdir = Path(tempfile.mkdtemp(prefix="bench-render-cpu-"))

    def stage() -> None:
        cache = ItemCache(workdir / f"cache-{time.monotonic_ns()}")
        render_jobs(stage_pipe, jobs, settings, cache, batch_size=args.batch, revision=None)

    plain()  # warm-up both
    stage()
    times: dict[str, list[float]] = {"plain": [], "stage": []}
    for r in range(args.rounds):
        for name, fn in (("plain", plain), ("stage", stage)) if r % 2 == 0 else (("stage", stage), ("plain", plain)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}: plain {times['plain'][-1]:.2f} s, stage {times['stage'][-1]:.2f} s", flush=True)
    plain_ips = args.images / statistics.median(times["plain"])
    stage_ips = args.images / statistics.median(times["stage"])
    paired = [p / s for p, s in zip(times["plain"], times["stage"])]
    result = {"ratio_median_of_rounds": round(statistics.median(paired), 3),
              "ratio_of_medians": round(stage_ips / plain_ips, 3), "images": args.images, "batch": args.batch, "steps": args.steps, "size": args.size,
              "threads": args.threads, "rounds": args.rounds, "plain_img_s": round(plain_ips, 3),
              "stage_img_s": round(stage_ips, 3),
              "plain_s": [round(t, 2) for t in times["plain"]], "stage_s": [round(t, 2) for t in times["stage"]],
              "torch": torch.__version__, "cpus": os.cpu_count()}
    print(json.dumps(result))
    print(f"stage / plain images/s: {result['ratio_median_of_rounds']:.3f} (median of per-round ratios; "
          f"ratio of medians {result['ratio_of_medians']:.3f}; plain {plain_ips:.2f} img/s, stage {stage_ips:.2f} img/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
