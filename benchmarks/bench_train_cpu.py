"""Stage 6 step time on CPU: cached latents + text embeddings vs encoding every step (tiny SDXL).

Same process, same synthetic data, same steps; only `train.cache_latents` / `train.cache_text`
change. Run: `make bench-train` (or `python benchmarks/bench_train_cpu.py --steps 12`).
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
        for label, cached in (("cached latents + text", True), ("encode every step", False)):
            config = TrainConfig(resolution=args.resolution, max_steps=args.warmup + args.steps,
                                 batch_size=args.batch_size, gradient_accumulation=1, optimizer="adamw",
                                 learning_rate=1e-4, warmup_steps=0, mixed_precision="no", device="cpu",
                                 cache_latents=cached, cache_text=cached, checkpoint_every=10_000, resume=False,
                                 eval_split=None)
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
        print("\n| mode | ms/step (wall) | ms/step (process CPU) | images/s (CPU) |\n|---|---|---|---|")
        for label, wall_s, cpu_s in rows:
            print(f"| {label} | {wall_s * 1000:.1f} | {cpu_s * 1000:.1f} | {2 * args.batch_size / cpu_s:.1f} |")
        print(f"\nuncached / cached step time: {rows[1][1] / rows[0][1]:.2f}x wall, {rows[1][2] / rows[0][2]:.2f}x CPU "
              f"(tiny SDXL, {args.resolution} px, batch {args.batch_size} pairs, {args.threads} thread(s), "
              f"{n} timed steps)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
