"""Eval rendering vs a plain diffusers loop on CPU, tiny random SDXL, as ratios measured in one run.

Both paths render the same prompts with the same per-image seeds and batch size, for two methods:

  base: plain ``pipe(prompt=[...], generator=[...]).images`` vs eval's ``render_eval_batches`` (render
        engine pieces: batch-invariant CPU setup, per-image text encoding and VAE decode, uint8,
        background JPEG encoding, sha256, item-cache parts, final drain);
  psa:  the same with a user adapter (4 tokens) installed and ``cross_attention_kwargs`` carrying the
        users' tokens; eval also loads the adapter from its folder on each call.

Rounds alternate which path goes first; the reported ratio is the median of per-round ratios (eval
images/s / plain images/s). Usage: ``python benchmarks/bench_eval_render.py [--images 16 --steps 8]``.
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
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from sage_builder.stages.eval.methods import EvalImage, prompt_seed
    from sage_builder.stages.eval.rendering import AdapterSwitch, cut_batches, render_eval_batches
    from sage_builder.stages.render.config import RenderConfig
    from sage_builder.diffusion import RenderSettings, load_pipeline, make_batch_invariant
    from sage_builder.adapter import UserAdapter
    from sage_builder.store import ItemCache

    torch.set_num_threads(args.threads)
    config = RenderConfig(model=args.model, steps=args.steps, guidance=7.5, height=args.size, width=args.size,
                          device="cpu", batch_size=args.batch)
    settings = RenderSettings.from_config(config, "cpu")
    eval_pipe = load_pipeline(config, "cpu")
    make_batch_invariant(eval_pipe)
    plain_pipe = StableDiffusionXLPipeline.from_pretrained(args.model, local_files_only=True)
    plain_pipe.set_progress_bar_config(disable=True)

    workdir = Path(tempfile.mkdtemp(prefix="bench-eval-render-"))
    dim = 8
    torch.manual_seed(0)
    adapter = UserAdapter.for_unet(plain_pipe.unet, dim, n_tokens=4)
    for parameter in adapter.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    adapter.save(workdir / "adapter")
    adapter.eval()
    rng = np.random.default_rng(0)
    embeddings = {f"u{i}": rng.standard_normal(dim).astype(np.float32) for i in range(args.images)}
    prompts = [f"scene {i}: a street market with lanterns and rain, photo" for i in range(args.images)]

    def jobs(method: str, salt: int) -> list[EvalImage]:
        # A fresh key per round so that nothing comes from the cache.
        return [EvalImage(f"{method}-{salt}-{i}", prompt, prompt_seed(2025, prompt), "", None if method == "base"
                          else "psa", f"u{i}") for i, prompt in enumerate(prompts)]

    def plain(method: str) -> None:
        if method == "psa":
            adapter.install(plain_pipe.unet)
        try:
            for i in range(0, args.images, args.batch):
                chunk = list(range(i, min(i + args.batch, args.images)))
                generators = [torch.Generator("cpu").manual_seed(prompt_seed(2025, prompts[j])) for j in chunk]
                extra = {}
                if method == "psa":
                    with torch.no_grad():
                        tokens = adapter(torch.from_numpy(np.stack([embeddings[f"u{j}"] for j in chunk])))
                    extra["cross_attention_kwargs"] = adapter.attention_kwargs(tokens)
                plain_pipe(prompt=[prompts[j] for j in chunk], num_inference_steps=args.steps, guidance_scale=7.5,
                           height=args.size, width=args.size, generator=generators, **extra).images
        finally:
            adapter.remove()

    counter = [0]

    def staged(method: str) -> None:
        counter[0] += 1
        cache = ItemCache(workdir / f"cache-{counter[0]}")
        switch = AdapterSwitch(eval_pipe, {"psa": workdir / "adapter"}, "cpu", 1.0, dim)  # loads as eval's workers do
        try:
            render_eval_batches(eval_pipe, cut_batches(jobs(method, counter[0]), args.batch, set()), settings, None,
                                "cpu", cache, switch, embeddings)
        finally:
            switch.remove()

    results = {}
    for method in ("base", "psa"):
        plain(method)  # warm-up both
        staged(method)
        times: dict[str, list[float]] = {"plain": [], "eval": []}
        for r in range(args.rounds):
            order = (("plain", plain), ("eval", staged)) if r % 2 == 0 else (("eval", staged), ("plain", plain))
            for name, fn in order:
                t = time.perf_counter()
                fn(method)
                times[name].append(time.perf_counter() - t)
            print(f"{method} round {r + 1}: plain {times['plain'][-1]:.2f} s, eval {times['eval'][-1]:.2f} s",
                  flush=True)
        paired = [pl / ev for pl, ev in zip(times["plain"], times["eval"])]
        results[method] = {"ratio_median_of_rounds": round(statistics.median(paired), 3),
                           "plain_img_s": round(args.images / statistics.median(times["plain"]), 3),
                           "eval_img_s": round(args.images / statistics.median(times["eval"]), 3),
                           "plain_s": [round(t, 2) for t in times["plain"]],
                           "eval_s": [round(t, 2) for t in times["eval"]]}
    result = {"methods": results, "images": args.images, "batch": args.batch, "steps": args.steps, "size": args.size,
              "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "cpus": os.cpu_count(),
              "loadavg_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(result))
    for method, r in results.items():
        print(f"{method}: eval / plain images/s {r['ratio_median_of_rounds']:.3f} (median of per-round ratios; plain "
              f"{r['plain_img_s']:.2f} img/s, eval {r['eval_img_s']:.2f} img/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
