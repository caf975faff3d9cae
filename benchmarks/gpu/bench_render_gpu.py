"""Render speed levers on one GPU, one row each: the stage's engine vs a plain diffusers loop, full SDXL.

No hub access is needed: the full SDXL base architecture (UNet 2.6 B, CLIP-L + OpenCLIP-bigG text
encoders, VAE; sizes from the published configs, see ENV-NOTES.md) is built with random weights
directly on the GPU, which does not change speed. Tokenizers are character-level stand-ins with
the real 49,408-entry embedding tables.

Each row applies one set of levers (``sage_builder/stages/render/levers.py``: fused QKV,
torch.compile modes and inductor flags, compiled channels-last VAE decode, SDPA backend; or a
batch size) to the same pipeline and times the same prompts and per-image seeds through
  plain: ``pipe(prompt=[...], generator=[...]).images`` with the same levers (PIL, nothing stored), and
  stage: the render engine (``render_jobs``: batched denoising, per-image VAE decode, uint8 on the
         GPU, background JPEG q95 + sha256 + Parquet parts, final drain included).
Per row: img/s of both and their ratio, peak memory, the warm-up (compile) seconds per path, and
the max / mean absolute pixel difference and PSNR against the first row (plain eager bf16) on
the same seeds (plain path: its uint8 pixels; stage path: its decoded JPEGs against the eager
stage's). The eager row also counts host syncs per denoising step (``torch.cuda.set_sync_debug_mode``).

Rows run most telling first and are time-boxed by ``--budget-s`` (seconds since start; the default
keeps the script within ~8 minutes on an H100/H200); a skipped row is listed with its reason.

    python benchmarks/gpu/bench_render_gpu.py                          # H100/H200, <= ~8 min
    python benchmarks/gpu/bench_render_gpu.py --tiny --device cpu      # plumbing check, CPU-capable rows
    python benchmarks/gpu/bench_render_gpu.py --rows eager,fuse_qkv    # chosen rows only

Writes ``$OUT/render_gpu.json`` when ``OUT`` is set (or ``--json PATH``), after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

START = time.monotonic()
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ALL = {"compile": True, "fuse_qkv": True, "compile_vae": True, "inductor_flags": True}
# (row name, batch, levers, expected warm-up seconds on an H100/H200 for the time box); most telling first.
ROWS = [
    ("eager", 8, {}, 5),
    ("all-levers", 8, ALL, 200),
    ("all-levers-cudagraphs", 8, {**ALL, "compile_mode": "reduce-overhead"}, 200),
    ("fuse_qkv", 8, {"fuse_qkv": True}, 5),
    ("sdpa-flash", 8, {"sdpa_backend": "flash"}, 5),
    ("sdpa-cudnn", 8, {"sdpa_backend": "cudnn"}, 5),
    ("sdpa-efficient", 8, {"sdpa_backend": "efficient"}, 5),
    ("compile-unet", 8, {"compile": True}, 110),
    ("all-levers-b16", 16, ALL, 200),
    ("all-levers-max-autotune", 8, {**ALL, "compile_mode": "max-autotune"}, 420),
]
CPU_ROWS = "eager,fuse_qkv,sdpa-math"
CPU_EXTRA = [("sdpa-math", 8, {"sdpa_backend": "math"}, 5)]


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
    p.add_argument("--rows", default=None, help=f"comma-separated row names (default: all on CUDA, {CPU_ROWS} "
                   "on CPU); rows: " + ", ".join(r[0] for r in ROWS + CPU_EXTRA))
    p.add_argument("--batch", type=int, default=None, help="override every row's batch size (e.g. 2 with --tiny)")
    p.add_argument("--batches-per-case", type=int, default=1, help="measured batches per path and row")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip rows that would not finish by then")
    p.add_argument("--json", default=None, help="default $OUT/render_gpu.json if OUT is set")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 30)
    known = {r[0]: r for r in ROWS + CPU_EXTRA}
    names = [n.strip() for n in (args.rows or (",".join(r[0] for r in ROWS) if cuda else CPU_ROWS)).split(",")
             if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown row '{unknown[0]}'; choose from {', '.join(known)}")
    args.row_list = [known[n] for n in names]
    if args.batch:
        args.row_list = [(n, args.batch, levers, warm) for n, _, levers, warm in args.row_list]
    if args.json is None and os.environ.get("OUT"):
        args.json = str(Path(os.environ["OUT"]) / "render_gpu.json")
    return args


def pixel_diff(a, b) -> dict:
    """max / mean absolute difference of uint8 images and PSNR (dB; inf when equal)."""
    import numpy as np

    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mse = float((d.astype(np.float64) ** 2).mean())
    return {"max_abs": int(d.max()), "mean_abs": round(float(d.mean()), 4),
            "psnr_db": round(10 * math.log10(255 ** 2 / mse), 2) if mse else math.inf}


class Bench:
    def __init__(self, args: argparse.Namespace):
        import torch

        from sage_builder.models.tiny_diffusion import build_random_sdxl_base, build_tiny_sdxl_pipeline
        from sage_builder.stages.render.config import RenderConfig
        from sage_builder.diffusion import RenderSettings, prepare_pipeline

        self.args, self.torch = args, torch
        self.cuda = args.device.startswith("cuda")
        dtype = getattr(torch, args.dtype)
        if not self.cuda:
            torch.set_num_threads(1)
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        pipe = build_tiny_sdxl_pipeline().to(dtype) if args.tiny else build_random_sdxl_base(args.device, dtype)
        self.pipe = prepare_pipeline(pipe, "default", args.device)
        self.eager_unet = self.pipe.unet
        self.inductor_defaults = self._inductor_flags()
        config = RenderConfig(model="bench/random-sdxl", steps=args.steps, guidance=args.guidance, height=args.size,
                              width=args.size, dtype=args.dtype, encoding="jpeg", quality=95)
        self.settings = RenderSettings.from_config(config, args.device)
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-render-"))
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.reference: dict[str, dict] = {}  # path -> image key -> uint8 pixels of the eager row
        n_params = sum(p.numel() for p in self.pipe.unet.parameters()) / 1e9
        log(f"pipeline built: UNet {n_params:.2f} B params")

    def _inductor_flags(self) -> dict:
        from sage_builder.stages.render.levers import INDUCTOR_FLAGS

        config = self.torch._inductor.config
        return {name: getattr(config, name) for name in INDUCTOR_FLAGS}

    def jobs(self, n: int) -> list:
        from sage_builder.diffusion import ImageJob, image_key, pair_seed

        subjects = ["a crowded market at dawn", "a storm over a harbour", "an old library with tall shelves",
                    "a fox in fresh snow", "neon signs in the rain", "a quiet mountain lake", "a busy train station",
                    "a desert road at noon"]
        out = []
        for i in range(n):
            prompt = f"{subjects[i % len(subjects)]}, photo {i}"
            seed = pair_seed(2025, f"bench-{i // 2}")
            out.append(ImageJob(image_key(prompt, seed, self.settings), prompt, seed))
        return out

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset(self) -> None:
        """Back to the eager, unfused, NCHW pipeline with torch's default inductor flags."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        torch, pipe = self.torch, self.pipe
        torch._dynamo.reset()
        pipe.unet = self.eager_unet
        pipe.vae.__dict__.pop("decode", None)  # drop a compiled decode: back to the class's method
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
        pipe.unet.to(memory_format=torch.contiguous_format)
        pipe.vae.to(memory_format=torch.contiguous_format)
        for name, value in self.inductor_defaults.items():
            setattr(torch._inductor.config, name, value)

    def plain(self, jobs: list, batch: int, steps: int, sdpa: str) -> dict:
        import numpy as np

        from sage_builder.diffusion import attention_backend

        pixels = {}
        with attention_backend(sdpa):
            for i in range(0, len(jobs), batch):
                chunk = jobs[i:i + batch]
                generators = [self.torch.Generator("cpu").manual_seed(j.seed) for j in chunk]
                images = self.pipe(prompt=[j.prompt for j in chunk], num_inference_steps=steps,
                                   guidance_scale=self.args.guidance, height=self.args.size, width=self.args.size,
                                   generator=generators).images
                pixels.update({j.key: np.asarray(im) for j, im in zip(chunk, images)})
        self.sync()
        return pixels

    def stage(self, jobs: list, batch: int, steps: int, compiled: bool, sdpa: str) -> tuple[int, Path]:
        from sage_builder.diffusion import render_jobs
        from sage_builder.store import ItemCache

        cache = ItemCache(self.workdir / f"cache-{time.monotonic_ns()}")
        writer = render_jobs(self.pipe, jobs, dataclasses.replace(self.settings, steps=steps), cache,
                             batch_size=batch, revision=None, pad_batches=compiled, invariant=not self.cuda,
                             sdpa_backend=sdpa)
        self.sync()
        return writer.bytes, cache.directory

    def stage_pixels(self, cache_dir: Path) -> dict:
        import numpy as np
        import pyarrow.parquet as pq
        from PIL import Image

        out = {}
        for part in sorted(cache_dir.glob("part-*.parquet")):
            table = pq.read_table(part, columns=["item_key", "image"])
            for key, data in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
                out[key] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        return out

    def host_syncs_per_step(self, batch: int) -> float | None:
        """Host syncs the denoising loop makes per step (from 2- and 4-step latent-only runs)."""
        if not self.cuda:
            return None
        from sage_builder.diffusion import encode_prompts

        jobs = self.jobs(batch)
        counts = []
        for steps in (2, 4):
            with self.torch.inference_mode():
                embeds = encode_prompts(self.pipe, [j.prompt for j in jobs], self.settings, one_by_one=False)
                generators = [self.torch.Generator("cpu").manual_seed(j.seed) for j in jobs]
                self.sync()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    self.torch.cuda.set_sync_debug_mode("warn")
                    try:
                        self.pipe(**embeds, num_inference_steps=steps, guidance_scale=self.args.guidance,
                                  height=self.args.size, width=self.args.size, generator=generators,
                                  output_type="latent")
                    finally:
                        self.torch.cuda.set_sync_debug_mode("default")
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
        return (counts[1] - counts[0]) / 2

    def peak_reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return round(self.torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def measure(self, name: str, batch: int, lever_fields: dict) -> dict:
        from sage_builder.stages.render.levers import RenderLevers, apply_levers

        self.reset()
        levers = RenderLevers(**lever_fields)
        apply_levers(self.pipe, levers, self.args.device)
        n = batch * self.args.batches_per_case
        jobs = self.jobs(n)
        row: dict = {"row": name, "batch": batch, "images": n, "levers": levers.describe()}
        # Warm-up with 2 steps on both paths: kernels, allocator, and compilation of each shape (the
        # graphs do not depend on the step count).
        for path in ("plain", "stage"):
            t = time.monotonic()
            if path == "plain":
                self.plain(jobs[:batch], batch, 2, levers.sdpa_backend)
            else:
                self.stage(jobs[:batch], batch, 2, levers.compiled, levers.sdpa_backend)
            row[f"{path}_warmup_s"] = round(time.monotonic() - t, 1)
        log(f"{name} batch {batch}: warm-up plain {row['plain_warmup_s']} s, stage {row['stage_warmup_s']} s")
        for path in ("plain", "stage"):
            self.peak_reset()
            self.sync()
            t = time.monotonic()
            if path == "plain":
                pixels = self.plain(jobs, batch, self.args.steps, levers.sdpa_backend)
            else:
                nbytes, cache_dir = self.stage(jobs, batch, self.args.steps, levers.compiled, levers.sdpa_backend)
            seconds = time.monotonic() - t
            row[f"{path}_img_s"] = round(n / seconds, 4)
            row[f"{path}_peak_gib"] = self.peak_gib()
            if path == "stage":
                row["jpeg_kib_per_img"] = round(nbytes / n / 1024, 1)
                pixels = self.stage_pixels(cache_dir)
            self.compare(row, path, pixels)
        row["ratio"] = round(row["stage_img_s"] / row["plain_img_s"], 4)
        if name == "eager":
            row["host_syncs_per_step"] = self.host_syncs_per_step(batch)
        return row

    def compare(self, row: dict, path: str, pixels: dict) -> None:
        reference = self.reference.setdefault(path, pixels)
        common = [k for k in pixels if k in reference]
        if not common:
            return
        import numpy as np

        diff = pixel_diff(np.stack([pixels[k] for k in common]), np.stack([reference[k] for k in common]))
        row.update({f"{path}_{k}": v for k, v in diff.items()})

    def run(self) -> None:
        guess = None  # seconds per image of the eager row, for the time box
        for name, batch, lever_fields, warm in self.args.row_list:
            left = self.args.budget_s - (time.monotonic() - START)
            n = batch * self.args.batches_per_case
            need = warm + (guess or 0) * n * 2 * 1.2  # warm-up, then both paths at no better than eager speed
            if guess is not None and left < need:
                self.skipped.append(f"{name} batch {batch} (time box: {left:.0f} s left, needs ~{need:.0f})")
                log("skip " + self.skipped[-1])
                continue
            try:
                row = self.measure(name, batch, lever_fields)
            except Exception as exc:  # noqa: BLE001 - a lever this GPU/torch lacks is a skipped row
                self.skipped.append(f"{name} batch {batch} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
                log("failed " + self.skipped[-1])
                continue
            self.rows.append(row)
            if guess is None:
                guess = 1 / row["plain_img_s"]
            log("row " + json.dumps(row))
            self.write_json(False)

    def write_json(self, final: bool) -> None:
        if not self.args.json:
            return
        torch, args = self.torch, self.args
        summary = {
            "device": torch.cuda.get_device_name(0) if self.cuda else args.device, "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__, "tiny": args.tiny, "size": args.size,
            "steps": args.steps, "dtype": args.dtype, "guidance": args.guidance, "rows": self.rows,
            "skipped": self.skipped, "complete": final, "wall_s": round(time.monotonic() - START, 1),
            "reference": "pixel differences are against the first row (plain eager loop, same seeds)",
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))

    def print_table(self) -> None:
        header = ["row", "batch", "images", "plain_img_s", "stage_img_s", "ratio", "plain_warmup_s",
                  "stage_warmup_s", "plain_max_abs", "plain_mean_abs", "plain_psnr_db", "stage_max_abs",
                  "stage_psnr_db", "plain_peak_gib", "stage_peak_gib"]
        args = self.args
        print("\nrender levers, " + (self.torch.cuda.get_device_name(0) if self.cuda else args.device)
              + f", SDXL-{'tiny' if args.tiny else 'full'} {args.size} px, {args.steps} steps, {args.dtype}")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in self.rows:
            print("| " + " | ".join(str(r.get(h, "")) for h in header) + " |")
        for s in self.skipped:
            print(f"skipped: {s}")


def main() -> int:
    args = parse_args()
    import torch

    log(f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name(0)})" if args.device.startswith("cuda") else "")
        + f", {args.dtype}, {args.size} px, {args.steps} steps, guidance {args.guidance}")
    bench = Bench(args)
    bench.run()
    bench.print_table()
    bench.write_json(True)
    if args.json:
        log(f"wrote {args.json}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
