"""Stage 2 (prompts) requests/s against the local OpenAI-compatible test server, by concurrency.

The server (sage_builder.testing.ChatServer) answers every request after a fixed latency with a
plausible reply, so the figure measures how well the stage and the openai backend keep the
concurrency window full: the stage asks in phases (seed descriptions, expansion rounds, p_h, p_s),
and a phase with fewer requests than the window cannot fill it.

    python benchmarks/bench_llm_openai.py [--latency 0.05] [--concurrency 1 8 64] [--concepts 4] [--pairs 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("SAGE_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sage_builder.config import config_from_dict  # noqa: E402
from sage_builder.stages.base import run_stage  # noqa: E402
from sage_builder.stages.prompts.fixtures import chat_script, save_word_clip_tokenizer  # noqa: E402
from sage_builder.stages.prompts.stage import STAGE  # noqa: E402
from sage_builder.store import RunDir  # noqa: E402
from sage_builder.testing.chat_server import ChatServer  # noqa: E402


def run_once(root: Path, tokenizer: Path, concurrency: int, latency: float, concepts: int, pairs: int
             ) -> tuple[int, float, int]:
    with ChatServer(script=chat_script(latency_s=latency)) as server:
        config = config_from_dict({
            "name": "bench", "llm": {"backend": "openai", "model": "bench", "base_url": server.base_url,
                                     "concurrency": concurrency, "max_attempts": 2, "request_timeout_s": 60},
            "render": {"model": str(tokenizer)},
            "prompts": {"seeds_per_category": max(1, concepts - 1), "concepts_per_category": concepts,
                        "pairs_per_concept": pairs, "max_pair_attempts": 2}})
        started = time.perf_counter()
        manifest = run_stage(STAGE, config, RunDir(root / f"c{concurrency}"))
        seconds = time.perf_counter() - started
        return server.calls, seconds, manifest.stats["pairs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server waits per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--concepts", type=int, default=4, help="concepts per category (7 categories)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per concept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = save_word_clip_tokenizer(Path(tmp) / "clip")
        rows = [(c, *run_once(Path(tmp), tokenizer, c, args.latency, args.concepts, args.pairs))
                for c in args.concurrency]
    print(f"stage 2 (prompts) via the openai backend against the local test server; latency {args.latency * 1000:.0f} ms"
          f"/request; {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'concurrency':>11} {'requests':>8} {'pairs':>5} {'seconds':>8} {'req/s':>7} {'vs c=1':>7}")
    base = rows[0][1] / rows[0][2]
    for concurrency, calls, seconds, pairs in rows:
        rate = calls / seconds
        print(f"{concurrency:>11} {calls:>8} {pairs:>5} {seconds:>8.2f} {rate:>7.1f} {rate / base:>6.2f}x")


if __name__ == "__main__":
    main()
