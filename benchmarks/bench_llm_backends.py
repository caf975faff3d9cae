"""LLM backend throughput: the openai backend's client side by concurrency, and the transformers backend.

openai: a local ChatServer (its own process, so it does not share the backend's GIL) answers every
request with a schema-valid object after ``--latency`` seconds, like an obedient model; the figure
is how well the backend keeps its window of ``llm.concurrency`` requests full, and its per-request
overhead (validation included). Concurrency 1 is the baseline of the same run.

transformers (``--transformers DIR``): 8 llguidance-constrained greedy requests at batch size 1
and 8 on CPU: replies/s and generated tokens/s, with ``--decoder`` (default: cached).

    python benchmarks/bench_llm_backends.py [--requests 400] [--latency 0.05] [--concurrency 1 8 32 64]
        [--transformers .cache/models/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import time
from collections import Counter
from typing import Literal

from pydantic import BaseModel, Field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sage_builder.config import LLMConfig  # noqa: E402
from sage_builder.llm.base import LLMRequest  # noqa: E402
from sage_builder.llm.openai_backend import OpenAIBackend  # noqa: E402
from sage_builder.testing import ChatServer  # noqa: E402

CATEGORIES = Literal["Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking", "Propaganda"]


class Pair(BaseModel):
    prompt_unsafe: str = Field(max_length=300)
    prompt_safe: str = Field(max_length=300)
    category: CATEGORIES


class Bans(BaseModel):
    forbidden: list[CATEGORIES] = Field(max_length=7)


def serve(latency: float, conn) -> None:  # type: ignore[no-untyped-def]
    with ChatServer(latency_s=latency) as server:
        conn.send(server.base_url)
        conn.recv()  # until the benchmark says stop
        conn.send(server.max_in_flight)


def bench_openai(n_requests: int, latency: float, concurrencies: list[int]) -> None:
    requests = [LLMRequest(key=f"pair{i:05d}", schema=Pair, messages=[
        {"role": "system", "content": "Write a prompt pair as JSON."},
        {"role": "user", "content": f"Concept {i}: a street fight."}]) for i in range(n_requests)]
    print(f"# openai backend: {n_requests} requests, server latency {latency * 1000:.0f} ms, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}")
    print("| concurrency | seconds | requests/s | speed-up vs 1 | ideal requests/s | valid |")
    print("|---:|---:|---:|---:|---:|---:|")
    baseline = None
    for concurrency in concurrencies:
        ours, theirs = multiprocessing.Pipe()
        process = multiprocessing.Process(target=serve, args=(latency, theirs), daemon=True)
        process.start()
        config = LLMConfig(backend="openai", model="bench", base_url=ours.recv(), concurrency=concurrency,
                           max_attempts=1, max_retries=0)
        with OpenAIBackend(config) as backend:
            start = time.perf_counter()
            results = list(backend.run(requests))
            seconds = time.perf_counter() - start
        ours.send("stop")
        max_in_flight = ours.recv()
        process.join(timeout=10)
        assert max_in_flight <= concurrency, (max_in_flight, concurrency)
        rate = len(results) / seconds
        baseline = baseline or rate
        print(f"| {concurrency} | {seconds:.2f} | {rate:.1f} | {rate / baseline:.1f}x | {concurrency / latency:.0f} | "
              f"{sum(r.ok for r in results)}/{len(results)} |")
        failures = Counter(r.reason for r in results if not r.ok)
        if failures:
            print(f"  rejects at concurrency {concurrency}: {dict(failures)}")


def bench_transformers(model: str, threads: int, decoder: str) -> None:
    import torch

    torch.set_num_threads(threads)  # more OpenMP threads than free cores makes CPU inference crawl

    from sage_builder.llm.transformers_backend import TransformersBackend

    requests = [LLMRequest(key=f"user{i}", schema=Bans, messages=[
        {"role": "system", "content": "You decide which image categories are unsafe for a user. Answer in JSON."},
        {"role": "user", "content": f"User {i}: age {13 + i}, Christian, anxiety. Which categories are unsafe?"}])
        for i in range(8)]
    print(f"\n# transformers backend: {model}, llm.decoder {decoder}, greedy, 8 requests, "
          f"torch threads {torch.get_num_threads()}")
    print("| batch size | seconds | replies/s | generated tokens/s | valid |")
    print("|---:|---:|---:|---:|---:|")
    for batch_size in (1, 8):
        config = LLMConfig(backend="transformers", model=model, temperature=0.0, max_new_tokens=64,
                           batch_size=batch_size, max_attempts=1, device="cpu", dtype="float32",
                           decoder=decoder, threads=threads)
        with TransformersBackend(config) as backend:
            backend.check_ready()
            start = time.perf_counter()
            results = list(backend.run(requests))
            seconds = time.perf_counter() - start
            tokens = sum(len(backend.tokenizer(r.raw)["input_ids"]) + 1 for r in results if r.raw)
        print(f"| {batch_size} | {seconds:.1f} | {len(results) / seconds:.2f} | {tokens / seconds:.1f} | "
              f"{sum(r.ok for r in results)}/{len(results)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.05, help="server seconds per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--transformers", default=None, help="model folder: also time the transformers backend")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --transformers")
    parser.add_argument("--decoder", choices=["cached", "generate"], default="cached",
                        help="the transformers engine (bench_llm_prefix.py compares the two)")
    parser.add_argument("--skip-openai", action="store_true")
    args = parser.parse_args()
    if not args.skip_openai:
        bench_openai(args.requests, args.latency, args.concurrency)
    if args.transformers:
        bench_transformers(args.transformers, args.threads, args.decoder)


if __name__ == "__main__":
    main()
