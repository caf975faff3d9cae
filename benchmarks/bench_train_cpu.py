"""Stage 6 on CPU (tiny SDXL): step time with cached latents + text embeddings, with gradient
checkpointing, and encoding every step; and the cost of verifying the dataset against its manifest.

Same process, same synthetic data, same steps; only `train.cache_latents` / `train.cache_text` /
`train.gradient_checkpointing` change, and every ratio is against the first row of the same run.
The verify row times what checking the dataset costs, on a synthetic label stage of `--verify-pairs`
pairs of 512 px PNGs: the run store's full hash of label's outputs (the worst case) and reading every
image with train's sha256 check.
Run: `make bench-train` (or `python benchmarks/bench_train_cpu.py --steps 12`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SAGE_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=str(REPO / ".cache" / "models" / "tiny-sdxl"))
    parser.add_argument("--verify-pairs", type=int, default=64, help="pairs of 512 px images for the verify row")
    args = parser.parse_args()

    import torch

    import sage_builder.config  # noqa: F401
    from sage_builder.stages.train.config import TrainConfig
    from sage_builder.stages.train.data import load_preference_data
    from sage_builder.stages.train.synthetic import write_synthetic_dataset
    from sage_builder.stages.train.trainer import AdapterTrainer, load_base_pipeline

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        data = load_preference_data(write_synthetic_dataset(tmp / "ds", n_train_pairs=16, n_val_pairs=0,
                                                            size=args.resolution), ["train"])
        rows = []
        for label, cached, checkpointing in (("cached latents + text", True, False),
                                             ("cached + gradient checkpointing", True, True),
                                             ("encode every step", False, False)):
            config = TrainConfig(resolution=args.resolution, max_steps=args.warmup + args.steps,
                                 batch_size=args.batch_size, gradient_accumulation=1, optimizer="adamw",
                                 learning_rate=1e-4, warmup_steps=0, mixed_precision="no", device="cpu",
                                 cache_latents=cached, cache_text=cached, checkpoint_every=10_000, resume=False,
                                 eval_split=None, gradient_checkpointing=checkpointing)
            trainer = AdapterTrainer(config, data, tmp / label.replace(" ", "-"), "bench",
                                     lambda dtype: load_base_pipeline("sdxl", args.model, dtype=dtype), "tiny-sdxl")
            stamps: list[tuple[float, float]] = []  # (wall, this process's CPU time)
            try:
                result = trainer.train(data.splits["train"],
                                       on_step=lambda _: stamps.append((time.perf_counter(), time.process_time())))
            finally:
                trainer.close()
            first, last = stamps[max(args.warmup, 1) - 1], stamps[-1]
            n = len(stamps) - max(args.warmup, 1)
            wall_s, cpu_s = (last[0] - first[0]) / n, (last[1] - first[1]) / n
            rows.append((label, wall_s, cpu_s))
            print(f"{label:>24}: {wall_s * 1000:8.1f} ms/step wall, {cpu_s * 1000:8.1f} ms/step CPU "
                  f"(run incl. cache build {result.seconds:.1f} s)", flush=True)
        print("\n| mode | ms/step (wall) | ms/step (process CPU) | images/s (CPU) | CPU time vs cached |"
              "\n|---|---|---|---|---|")
        for label, wall_s, cpu_s in rows:
            print(f"| {label} | {wall_s * 1000:.1f} | {cpu_s * 1000:.1f} | {2 * args.batch_size / cpu_s:.1f} | "
                  f"{cpu_s / rows[0][2]:.2f}x |")
        print(f"\ncheckpointing / cached step time: {rows[1][1] / rows[0][1]:.2f}x wall, "
              f"{rows[1][2] / rows[0][2]:.2f}x CPU; uncached / cached: {rows[2][1] / rows[0][1]:.2f}x wall, "
              f"{rows[2][2] / rows[0][2]:.2f}x CPU (tiny SDXL, {args.resolution} px, batch {args.batch_size} pairs, "
              f"{args.threads} thread(s), {n} timed steps)")
        verify(tmp, args.verify_pairs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify(tmp: Path, n_pairs: int) -> None:
    """Time what checking the dataset costs a train run: the run store's full hash of label's outputs
    (the worst case: every mtime moved) and train's own sha256 check of each image as it is read."""
    from sage_builder.stages import get_stage
    from sage_builder.stages.base import verify_inputs
    from sage_builder.stages.train.data import load_preference_data
    from sage_builder.stages.train.synthetic import write_synthetic_label_stage
    from sage_builder.store import RunDir

    run = RunDir(tmp / "verify-run")
    root = write_synthetic_label_stage(run, n_train_pairs=n_pairs, n_val_pairs=0, size=512)
    files = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6
    verify_inputs(get_stage("train"), run, full=True)  # warm the page cache, as for a dataset just read
    start = time.perf_counter()
    verify_inputs(get_stage("train"), run, full=True)
    store_s = time.perf_counter() - start
    data = load_preference_data(root, ["train"])
    start = time.perf_counter()
    images = sum(len(data.image_bytes(pair, v)) for pair in data.pair_rows for v in ("u", "s")) / 1e6
    read_s = time.perf_counter() - start
    print(f"\nverify ({n_pairs} pairs of 512 px PNGs): run store, full hash of {files:.1f} MB of dataset files: "
          f"{store_s:.3f} s ({files / store_s:.0f} MB/s); train reading {2 * n_pairs} images ({images:.1f} MB) "
          f"with their sha256 checks: {read_s:.3f} s ({images / read_s:.0f} MB/s)")


if __name__ == "__main__":
    main()
