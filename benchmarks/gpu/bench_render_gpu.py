"""Render throughput on one GPU: the stage's engine vs a plain diffusers loop, SDXL at full size.

No hub access is needed: the full SDXL base architecture (UNet 2.6 B, CLIP-L + OpenCLIP-bigG text
encoders, VAE; sizes from the published configs, see ENV-NOTES.md) is built with random weights
directly on the GPU, which does not change speed. Tokenizers are character-level stand-ins with
the real 49,408-entry embedding tables.

Per batch size (default 1, 4, 8) and mode (eager; torch.compile of the UNet at batch 8 only) it
times the same prompts and per-image seeds through
  plain: ``pipe(prompt=[...], generator=[...]).images`` (PIL images, nothing stored), and
  stage: the render engine (``render_jobs``: batched denoising, uint8 on the GPU, background
         JPEG q95 encoding + sha256 + Parquet parts on a writer thread, final drain included),
and prints a row as each finishes, then one table. Cases run most telling first (eager batch 8,
compiled batch 8, eager 4, eager 1) and are time-boxed by ``--budget-s`` (seconds since start;
the default keeps the whole script under 5 minutes on an H100); a skipped case is listed.

    python benchmarks/gpu/bench_render_gpu.py                     # H100/H200, ~4-5 min
    python benchmarks/gpu/bench_render_gpu.py --tiny --device cpu # plumbing check on a laptop

Writes ``$OUT/render_gpu.json`` when ``OUT`` is set (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

START = time.monotonic()
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random SDXL at 64 px (CPU plumbing check)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--size", type=int, default=None, help="default 1024 (64 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="default 30 (2 with --tiny)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes, eager")
    p.add_argument("--compile-batches", default=None, help="batch sizes also run with torch.compile "
                   "(default 8 on CUDA, none on CPU; empty string: none)")
    p.add_argument("--batches-per-case", type=int, default=2, help="measured batches per path (batch 1: x2)")
    p.add_argument("--budget-s", type=float, default=275.0, help="skip cases that would not finish by then")
    p.add_argument("--compile-estimate-s", type=float, default=140.0,
                   help="assumed compile + compiled-case time, for the time box")
    p.add_argument("--json", default=None, help="default $OUT/render_gpu.json if OUT is set")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 30)
    if args.compile_batches is None:
        args.compile_batches = "8" if cuda else ""
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    args.compile_list = [int(b) for b in args.compile_batches.split(",") if b.strip()]
    if args.json is None and os.environ.get("OUT"):
        args.json = str(Path(os.environ["OUT"]) / "render_gpu.json")
    return args


def main() -> int:
    args = parse_args()
    import torch

    from sage_builder.stages.render.config import RenderConfig
    from sage_builder.stages.render.engine import (ImageJob, RenderSettings, image_key, pair_seed, prepare_pipeline,
                                                   render_jobs)
    from sage_builder.store import ItemCache

    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype)
    log(f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name(0)})" if cuda else "") + f", {args.dtype}, {args.size} px, "
        f"{args.steps} steps, guidance {args.guidance}")
    if not cuda:
        torch.set_num_threads(1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from sage_builder.models.tiny_diffusion import build_random_sdxl_base, build_tiny_sdxl_pipeline

    if args.tiny:
        pipe = build_tiny_sdxl_pipeline().to(dtype)
    else:
        pipe = build_random_sdxl_base(args.device, dtype)
    pipe = prepare_pipeline(pipe, "default", args.device)
    n_params = sum(p.numel() for p in pipe.unet.parameters()) / 1e9
    log(f"pipeline built: UNet {n_params:.2f} B params, attention {type(next(iter(pipe.unet.attn_processors.values()))).__name__}")

    config = RenderConfig(model="bench/random-sdxl", steps=args.steps, guidance=args.guidance, height=args.size,
                          width=args.size, dtype=args.dtype, encoding="jpeg", quality=95)
    settings = RenderSettings.from_config(config, args.device)
    subjects = ["a crowded market at dawn", "a storm over a harbour", "an old library with tall shelves",
                "a fox in fresh snow", "neon signs in the rain", "a quiet mountain lake", "a busy train station",
                "a desert road at noon"]

    def jobs_for(n: int, offset: int) -> list:
        out = []
        for i in range(n):
            prompt = f"{subjects[(i + offset) % len(subjects)]}, photo {i + offset}"
            seed = pair_seed(2025, f"bench-{(i + offset) // 2}")
            out.append(ImageJob(image_key(prompt, seed, settings), prompt, seed))
        return out

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def peak_reset() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib() -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None

    def plain(jobs: list, batch: int, steps: int) -> None:
        for i in range(0, len(jobs), batch):
            chunk = jobs[i:i + batch]
            generators = [torch.Generator("cpu").manual_seed(j.seed) for j in chunk]
            images = pipe(prompt=[j.prompt for j in chunk], num_inference_steps=steps,
                          guidance_scale=args.guidance, height=args.size, width=args.size,
                          generator=generators).images
            assert len(images) == len(chunk)
        sync()

    workdir = Path(tempfile.mkdtemp(prefix="bench-render-"))

    def stage(jobs: list, batch: int, steps: int, compiled: bool) -> int:
        run_settings = dataclasses.replace(settings, steps=steps)
        cache = ItemCache(workdir / f"cache-{time.monotonic_ns()}")
        writer = render_jobs(pipe, jobs, run_settings, cache, batch_size=batch, revision=None,
                             pad_batches=compiled, invariant=not cuda)
        sync()
        return writer.bytes

    rows: list[dict] = []
    skipped: list[str] = []

    def measure(mode: str, batch: int, compiled: bool) -> None:
        n = batch * args.batches_per_case * (2 if batch == 1 else 1)
        jobs = jobs_for(n, offset=batch * 100)
        # Warm-up with 2 steps on both paths (kernels, allocator, compile; the graph does not depend on steps).
        t = time.monotonic()
        plain(jobs[:batch], batch, 2)
        stage(jobs[:batch], batch, 2, compiled)
        log(f"{mode} batch {batch}: warm-up {time.monotonic() - t:.1f} s")
        result = {"mode": mode, "batch": batch, "images": n}
        for path in ("plain", "stage"):
            peak_reset()
            sync()
            t = time.monotonic()
            nbytes = plain(jobs, batch, args.steps) if path == "plain" else stage(jobs, batch, args.steps, compiled)
            seconds = time.monotonic() - t
            result[f"{path}_img_s"] = round(n / seconds, 4)
            result[f"{path}_s_per_img"] = round(seconds / n, 4)
            result[f"{path}_peak_gib"] = peak_gib()
            if path == "stage":
                result["jpeg_kib_per_img"] = round(nbytes / n / 1024, 1)
        result["ratio"] = round(result["stage_img_s"] / result["plain_img_s"], 4)
        rows.append(result)
        log("row " + json.dumps(result))

    def remaining() -> float:
        return args.budget_s - (time.monotonic() - START)

    def write_json(final: bool) -> None:
        if not args.json:
            return
        summary = {
            "device": torch.cuda.get_device_name(0) if cuda else args.device, "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__, "tiny": args.tiny, "size": args.size,
            "steps": args.steps, "dtype": args.dtype, "guidance": args.guidance, "rows": rows,
            "skipped": skipped, "complete": final, "wall_s": round(time.monotonic() - START, 1),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))

    # Most telling cases first, so that the time box drops the least important ones:
    # eager at the largest batch, then compiled, then the smaller eager batches.
    eager_batches = sorted(args.batch_list, reverse=True)
    cases = [("eager", eager_batches[0])] if eager_batches else []
    cases += [("compile", b) for b in args.compile_list] + [("eager", b) for b in eager_batches[1:]]
    eager_unet, compiled_unet = pipe.unet, None
    per_image_guess = None
    for mode, batch in cases:
        left = remaining()
        if mode == "compile":
            if compiled_unet is None and left < args.compile_estimate_s:
                skipped.append(f"compile batch {batch} (time box: {left:.0f} s left, needs ~{args.compile_estimate_s:.0f})")
                log("skip " + skipped[-1])
                continue
            if compiled_unet is None:
                if cuda:
                    eager_unet.to(memory_format=torch.channels_last)
                compiled_unet = torch.compile(eager_unet)
            pipe.unet = compiled_unet
        else:
            need = (per_image_guess or 0) * batch * args.batches_per_case * (2 if batch == 1 else 1) * 2.3 + 5
            if per_image_guess is not None and left < need:
                skipped.append(f"eager batch {batch} (time box: {left:.0f} s left, needs ~{need:.0f})")
                log("skip " + skipped[-1])
                continue
            if cuda and compiled_unet is not None:
                eager_unet.to(memory_format=torch.contiguous_format)  # eager rows alike: NCHW
            pipe.unet = eager_unet
        measure(mode, batch, mode == "compile")
        if mode == "eager" and per_image_guess is None:
            per_image_guess = rows[-1]["plain_s_per_img"]
        write_json(False)
    rows.sort(key=lambda r: (r["mode"] != "eager", r["batch"]))

    header = ["mode", "batch", "images", "plain_img_s", "stage_img_s", "ratio", "plain_s_per_img",
              "stage_s_per_img", "plain_peak_gib", "stage_peak_gib", "jpeg_kib_per_img"]
    print("\n" + "render throughput, " + (torch.cuda.get_device_name(0) if cuda else args.device)
          + f", SDXL-{'tiny' if args.tiny else 'full'} {args.size} px, {args.steps} steps, {args.dtype}, SDPA")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r.get(h, "")) for h in header) + " |")
    for s in skipped:
        print(f"skipped: {s}")
    write_json(True)
    if args.json:
        log(f"wrote {args.json}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
