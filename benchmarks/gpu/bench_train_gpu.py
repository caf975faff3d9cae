"""Stage 6 training speed on one GPU: the user adapter's Diffusion-DPO step on full-size SDXL.

No hub access is needed: the SDXL base 1.0 architecture (UNet 2.6 B, CLIP-L + OpenCLIP-bigG text
encoders, VAE; sizes from ENV-NOTES.md) is built with random weights directly on the GPU, which
does not change speed. The step is the stage's own code (``AdapterTrainer``): 4 user tokens from a
3,584-dim embedding, bf16 autocast with float32 adapter weights, Adafactor, batch 2 pairs at
1024 px (policy UNet over 4 latents with gradients, reference UNet over 4 without).

Two modes, same data, same process:
  cached:   latents and text embeddings precomputed once (the stage's default);
  uncached: every step decodes both images, VAE-encodes them at 1024 px and encodes the captions.
Prints a row as each mode finishes, then one table; reports steps/s, images/s, peak GPU memory
and the uncached/cached step-time ratio. The run is time-boxed (``--budget-s``, default 150 s).

    python benchmarks/gpu/bench_train_gpu.py                       # one H100/H200, < 3 min
    python benchmarks/gpu/bench_train_gpu.py --tiny --device cpu   # plumbing check (tiny SDXL, 64 px)

Writes ``$OUT/train_gpu.json`` when ``OUT`` is set (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

START = time.monotonic()
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("SAGE_NO_PROGRESS", "1")


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def synthetic_data(n_pairs: int, size: int, embedding_dim: int):
    """PreferenceData in memory (no `datasets` needed): random JPEG pairs, two users, one caption each."""
    import numpy as np
    from PIL import Image

    from sage_builder.stages.train.data import PreferenceData, PreferenceRecord

    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()

    pairs, records = [], []
    for i in range(n_pairs):
        pairs.append({"image_unsafe": {"bytes": jpeg(), "path": None}, "image_safe": {"bytes": jpeg(), "path": None}})
        for user, chosen in (("0000001", "s"), ("0000002", "u")):
            records.append(PreferenceRecord(f"{user}-{i}", user, f"pair{i}", f"a scene number {i}, photographic, "
                                            f"detailed, dramatic light", chosen, "u" if chosen == "s" else "s"))
    embeddings = {u: rng.normal(0, 1, embedding_dim).astype(np.float32) for u in ("0000001", "0000002")}
    return PreferenceData({"train": records}, embeddings, {}, pairs, {f"pair{i}": i for i in range(n_pairs)},
                          "synthetic (in memory)")


def run_mode(name: str, cached: bool, args, pipeline, data, model_id: str, work: Path) -> dict:
    import torch

    import sage_builder.config  # noqa: F401
    from sage_builder.stages.train.config import TrainConfig
    from sage_builder.stages.train.trainer import AdapterTrainer

    config = TrainConfig(resolution=args.size, max_steps=args.warmup + args.steps, batch_size=args.batch_size,
                         gradient_accumulation=1, optimizer="adafactor", learning_rate=5e-6, warmup_steps=0,
                         lr_scheduler="constant", mixed_precision=args.precision, device=args.device,
                         cache_latents=cached, cache_text=cached, checkpoint_every=1_000_000, resume=False,
                         eval_split=None, n_user_tokens=4, caption_dropout=0.2)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stamps: list[float] = []

    def on_step(row: dict) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        log(f"  {name}: step {row['step']} loss {row['loss']:.4f}")

    t0 = time.perf_counter()
    trainer = AdapterTrainer(config, data, work / name, "bench", lambda dtype: pipeline, model_id)
    try:
        result = trainer.train(data.splits["train"], on_step=on_step)
        adapter_params = sum(p.numel() for p in trainer.adapter.parameters())
    finally:
        trainer.close()
    n = len(stamps) - args.warmup
    step_s = (stamps[-1] - stamps[args.warmup - 1]) / n
    row = {"mode": name, "steps_timed": n, "s_per_step": round(step_s, 4), "steps_per_s": round(1 / step_s, 3),
           "images_per_s": round(2 * args.batch_size / step_s, 2), "batch_pairs": args.batch_size,
           "resolution": args.size, "adapter_params": adapter_params,
           "setup_and_cache_s": round(stamps[0] - t0, 1), "cache": result.cache}
    if cuda:
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    log(f"ROW {json.dumps(row)}")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random SDXL at 64 px (CPU plumbing check)")
    p.add_argument("--size", type=int, default=None, help="default 1024 (64 with --tiny)")
    p.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode (>= 1)")
    p.add_argument("--embedding-dim", type=int, default=3584, help="user embedding size (Qwen2.5-7B: 3584)")
    p.add_argument("--budget-s", type=float, default=150.0, help="skip the uncached mode if it would not finish")
    p.add_argument("--json", default=None, help="default $OUT/train_gpu.json if OUT is set")
    args = p.parse_args()
    args.size = args.size or (64 if args.tiny else 1024)
    args.warmup = max(1, args.warmup)
    args.precision = "bf16" if args.device.startswith("cuda") else "no"
    out_path = args.json or (str(Path(os.environ["OUT"]) / "train_gpu.json") if os.environ.get("OUT") else None)

    import torch

    if args.device.startswith("cuda"):
        log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    from sage_builder.models.tiny_diffusion import build_random_sdxl_base, build_tiny_sdxl_pipeline

    if args.tiny:
        pipeline, model_id = build_tiny_sdxl_pipeline(), "tiny-sdxl (random)"
    else:
        # The VAE stays float32: the trainer encodes images with it (SDXL's VAE needs force_upcast).
        pipeline = build_random_sdxl_base(args.device, dtype, vae_dtype=torch.float32)
        model_id = "sdxl-base-1.0 architecture (random)"
    pipeline.set_progress_bar_config(disable=True)
    log(f"built {model_id}: UNet {sum(p.numel() for p in pipeline.unet.parameters()) / 1e9:.2f} B params")
    data = synthetic_data(n_pairs=4, size=args.size, embedding_dim=args.embedding_dim)
    work = Path(tempfile.mkdtemp(prefix="bench-train-gpu-"))
    rows, notes = [], []
    try:
        for name, cached in (("cached", True), ("uncached", False)):
            elapsed = time.monotonic() - START
            if rows and elapsed + rows[0]["s_per_step"] * 2.0 * (args.steps + args.warmup) + 15 > args.budget_s:
                notes.append(f"{name} skipped: would pass the {args.budget_s:.0f} s budget")
                log(notes[-1])
                continue
            while True:
                try:
                    rows.append(run_mode(name, cached, args, pipeline, data, model_id, work))
                    break
                except torch.OutOfMemoryError as exc:
                    notes.append(f"{name}: out of GPU memory at batch {args.batch_size} pairs "
                                 f"({str(exc).splitlines()[0][:100]})")
                    log(notes[-1])
                    from sage_builder.stages.train.trainer import reset_accelerate

                    reset_accelerate()
                    if args.batch_size == 1 or rows:
                        break
                    args.batch_size = 1  # both modes then run at batch 1, so the ratio stays like for like
            if len(rows) < (1 if name == "cached" else 2):
                break
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = rows[1]["s_per_step"] / rows[0]["s_per_step"] if len(rows) == 2 else None
    print("\n| mode | s/step | steps/s | images/s | peak GiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['s_per_step']:.3f} | {r['steps_per_s']:.3f} | {r['images_per_s']:.2f} | "
              f"{r.get('peak_memory_gib', '-')} |")
    if ratio:
        print(f"\nuncached / cached step time: {ratio:.2f}x ({model_id}, batch {args.batch_size} pairs at "
              f"{args.size} px, {args.precision})")
    for note in notes:
        print(f"note: {note}")
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        Path(out_path).write_text(json.dumps({"device": device, "torch": torch.__version__, "model": model_id,
                                              "rows": rows, "uncached_over_cached": ratio, "notes": notes,
                                              "wall_s": round(time.monotonic() - START, 1)}, indent=2))
        log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
