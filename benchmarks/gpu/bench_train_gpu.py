"""Stage 6 training speed and memory on one GPU: the user adapter's Diffusion-DPO step on full-size SDXL.

No hub access is needed: the SDXL base 1.0 architecture (UNet 2.6 B, CLIP-L + OpenCLIP-bigG text
encoders, VAE; sizes from ENV-NOTES.md) is built with random weights directly on the GPU, which
does not change speed. The step is the stage's own code (``AdapterTrainer``): 4 user tokens from a
3,584-dim embedding, bf16 autocast with float32 adapter weights, Adafactor, pairs at 1024 px
(policy UNet over chosen + rejected with gradients, reference UNet without), cached latents and
text embeddings unless a row says otherwise.

Rows, most telling first, each printed as it finishes (``ROW {...}``), then one table:
  1. batch 2 pairs, ``train.gradient_checkpointing`` on   (the published per-GPU batch; target <= 24 GiB)
  2. batch 2 pairs, checkpointing off                     (step-time cost of checkpointing = row 1 / row 2)
  3. the largest batch that fits, checkpointing on: batches 4, 8, 16, ... until one runs out of GPU
     memory or would pass the time budget; its images/s
  4. batch 2 pairs, checkpointing off, uncached (VAE + text encoders every step), if time is left
Each row: s/step, steps/s, images/s, peak GPU memory of the training steps after the first
(allocated and reserved; optimizer state included), and the peak of set-up + first step. The run is
time-boxed (``--budget-s``, default 240 s from start-up); a row that would pass it is skipped and
says so.

    python benchmarks/gpu/bench_train_gpu.py                       # one H100/H200, ~4 min
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


class OutOfMemory(Exception):
    """A row ran out of GPU memory (the message is torch's first line)."""


def run_mode(name: str, args, pipeline, data, model_id: str, work: Path, batch: int, checkpointing: bool,
             cached: bool = True, steps: int | None = None, warmup: int | None = None) -> dict:
    import torch

    import sage_builder.config  # noqa: F401
    from sage_builder.stages.train.config import TrainConfig
    from sage_builder.stages.train.trainer import AdapterTrainer

    steps = steps or args.steps
    warmup = max(1, warmup or args.warmup)
    config = TrainConfig(resolution=args.size, max_steps=warmup + steps, batch_size=batch,
                         gradient_accumulation=1, optimizer="adafactor", learning_rate=5e-6, warmup_steps=0,
                         lr_scheduler="constant", mixed_precision=args.precision, device=args.device,
                         cache_latents=cached, cache_text=cached, checkpoint_every=1_000_000, resume=False,
                         eval_split=None, n_user_tokens=4, caption_dropout=0.2,
                         gradient_checkpointing=checkpointing)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stamps: list[float] = []
    setup_peak: list[float] = []

    def on_step(row: dict) -> None:
        if cuda:
            torch.cuda.synchronize()
            if not stamps:  # from here on the peak is the training steps' (optimizer state included)
                setup_peak.append(torch.cuda.max_memory_allocated() / 2**30)
                torch.cuda.reset_peak_memory_stats()
        stamps.append(time.perf_counter())
        log(f"  {name}: step {row['step']} loss {row['loss']:.4f}")

    t0 = time.perf_counter()
    oom = None
    # One work dir for every cached row: the latent and text caches are content-keyed, built once.
    trainer = AdapterTrainer(config, data, work / ("cached" if cached else name), "bench", lambda dtype: pipeline,
                             model_id)
    try:
        result = trainer.train(data.splits["train"], on_step=on_step)
        adapter_params = sum(p.numel() for p in trainer.adapter.parameters())
    except torch.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0][:120]
    finally:
        trainer.close()
        del trainer
        if cuda:
            import gc

            gc.collect()
    if oom is not None:
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
        torch.cuda.empty_cache() if cuda else None
        raise OutOfMemory(f"{name}: out of GPU memory at batch {batch} pairs (peak before it {peak} GiB; {oom})")
    n = len(stamps) - warmup
    step_s = (stamps[-1] - stamps[warmup - 1]) / n
    row = {"mode": name, "batch_pairs": batch, "gradient_checkpointing": checkpointing, "cached": cached,
           "steps_timed": n, "s_per_step": round(step_s, 4), "steps_per_s": round(1 / step_s, 3),
           "images_per_s": round(2 * batch / step_s, 2), "resolution": args.size, "adapter_params": adapter_params,
           "setup_and_cache_s": round(stamps[0] - t0, 1), "cache": result.cache}
    if cuda:
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        row["peak_setup_and_first_step_gib"] = round(setup_peak[0], 2)  # cache building (VAE at 1024 px) included
    log(f"ROW {json.dumps(row)}")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random SDXL at 64 px (CPU plumbing check)")
    p.add_argument("--size", type=int, default=None, help="default 1024 (64 with --tiny)")
    p.add_argument("--steps", type=int, default=5, help="timed steps of the batch-2 rows")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    p.add_argument("--search-steps", type=int, default=2, help="timed steps per batch of the largest-batch search")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch (pairs) the search tries")
    p.add_argument("--embedding-dim", type=int, default=3584, help="user embedding size (Qwen2.5-7B: 3584)")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip rows that would not finish by then")
    p.add_argument("--target-gib", type=float, default=24.0, help="memory target of the batch-2 checkpointed row")
    p.add_argument("--json", default=None, help="default $OUT/train_gpu.json if OUT is set")
    args = p.parse_args()
    args.size = args.size or (64 if args.tiny else 1024)
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
    rows: list[dict] = []
    notes: list[str] = []

    def left() -> float:
        return args.budget_s - (time.monotonic() - START)

    def attempt(name: str, batch: int, checkpointing: bool, estimate_s: float | None, **kw) -> dict | None:
        if estimate_s is not None and estimate_s > left():
            notes.append(f"{name} skipped: about {estimate_s:.0f} s, {max(left(), 0):.0f} s of the "
                         f"{args.budget_s:.0f} s budget left")
            log(notes[-1])
            return None
        try:
            row = run_mode(name, args, pipeline, data, model_id, work, batch, checkpointing, **kw)
        except OutOfMemory as exc:
            notes.append(str(exc))
            log(notes[-1])
            return None
        rows.append(row)
        return row

    def estimate(row: dict | None, batch: int, steps: int, warmup: int, cached: bool = True) -> float | None:
        """Seconds for a row, scaled from a measured one (time per pair), plus set-up."""
        if row is None:
            return None
        per_pair = row["s_per_step"] / row["batch_pairs"] * (2.0 if not cached else 1.0)
        return per_pair * batch * (steps + warmup) * 1.2 + 10

    try:
        on = attempt("batch 2, checkpointing on", 2, True, None)
        off = attempt("batch 2, checkpointing off", 2, False, estimate(on, 2, args.steps, args.warmup))
        largest = None
        batch = 4
        while batch <= args.max_batch:
            row = attempt(f"batch {batch}, checkpointing on", batch, True,
                          estimate(largest or on, batch, args.search_steps, 1), steps=args.search_steps, warmup=1)
            if row is None:
                break
            largest = row
            batch *= 2
        attempt("batch 2, checkpointing off, uncached", 2, False,
                estimate(off or on, 2, args.steps, args.warmup, cached=False), cached=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary: dict = {}
    if on and off:
        summary["checkpointing_step_time_ratio"] = round(on["s_per_step"] / off["s_per_step"], 3)
        if "peak_memory_gib" in on:
            summary["checkpointing_memory_ratio"] = round(on["peak_memory_gib"] / off["peak_memory_gib"], 3)
    if on and "peak_memory_gib" in on:
        summary["batch2_checkpointed_peak_gib"] = on["peak_memory_gib"]
        summary[f"fits_{args.target_gib:g}_gib"] = on["peak_memory_gib"] <= args.target_gib
    if largest:
        summary["largest_batch_tried_that_fits"] = largest["batch_pairs"]
        summary["largest_batch_images_per_s"] = largest["images_per_s"]
    uncached = next((r for r in rows if not r["cached"]), None)
    if off and uncached:
        summary["uncached_over_cached"] = round(uncached["s_per_step"] / off["s_per_step"], 3)
    print("\n| row | s/step | steps/s | images/s | peak GiB (allocated / reserved) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['s_per_step']:.3f} | {r['steps_per_s']:.3f} | {r['images_per_s']:.2f} | "
              f"{r.get('peak_memory_gib', '-')} / {r.get('peak_reserved_gib', '-')} |")
    print(f"\n{model_id}, {args.size} px, {args.precision}: {json.dumps(summary)}")
    for note in notes:
        print(f"note: {note}")
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        Path(out_path).write_text(json.dumps({"device": device, "torch": torch.__version__, "model": model_id,
                                              "rows": rows, "summary": summary, "notes": notes,
                                              "wall_s": round(time.monotonic() - START, 1)}, indent=2))
        log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
