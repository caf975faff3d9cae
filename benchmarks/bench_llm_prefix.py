"""The transformers backend's CPU levers on the demo's own stage-2 requests, old path vs new, one run.

Requests are built as the prompts stage builds them, from ``pipelines/demo.yaml`` (its model,
sampling settings and batch size) and its templates: for the first ``--concepts`` seed concepts (in
category order) a description request, then a p_h request (pair_unsafe, idx 1 of
``pairs_per_concept``) with that description, then a p_s request (pair_safe) rewriting that p_h.
The descriptions and p_h texts come from the first row's replies, and every row then answers the
same three request lists, so rows differ only in the engine. Each row is a fresh backend (model
load not timed; the prefix store starts empty, so computing each template's prefix is timed).

Rows add one lever each:

- ``generate``: transformers' generate() + the old logits processor (``llm.decoder: generate``);
- ``+sampler``: generate() with the new sampler (masks for running rows only, top-p for all rows
  at once, no per-row ``torch.multinomial``);
- ``+cache``: the own decoding loop with the pre-allocated KV cache, no prefix reuse;
- ``+prefix``: shared-prefix KV reuse on top (``llm.decoder: cached``, the default);
- ``+threads``: the new path with the thread count the backend picks from idle cores.

Stage-2-equivalent seconds scale a row's seconds per request to the 282 engine requests of the
idle-machine demo run in BENCHMARKS.md (500.7 s for stage 2 on the old path).

    python benchmarks/bench_llm_prefix.py [--concepts 8] [--threads 1] [--rows generate +sampler +cache +prefix]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sage_builder.config import load_config  # noqa: E402
from sage_builder.llm.base import LLMRequest  # noqa: E402
from sage_builder.llm.prefix_decoding import GuidedSampler  # noqa: E402
from sage_builder.llm.transformers_backend import TransformersBackend, TransportFailure, _reply  # noqa: E402
from sage_builder.stages.prompts.concepts import load_seeds  # noqa: E402
from sage_builder.stages.prompts.schemas import ConceptDescription, ImagePrompt  # noqa: E402
from sage_builder.templates import load_template  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO_STAGE2_REQUESTS = 282
DEMO_STAGE2_SECONDS = 500.7


class SamplerInGenerate(TransformersBackend):
    """The ``+sampler`` row: transformers' generate() with the new sampler as its logits processor."""

    def _generate(self, rows: list[tuple[LLMRequest, int, str]]) -> Iterator[tuple[str, str | TransportFailure]]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        tok = self.tokenizer
        encoded = tok([text for _, _, text in rows], return_tensors="pt", padding=True, add_special_tokens=False)
        limits = [request.max_new_tokens or self.config.max_new_tokens for request, _, _ in rows]
        sampler = GuidedSampler([self._matcher(request) for request, _, _ in rows], [seed for _, seed, _ in rows],
                                limits, self.config.temperature, self.config.top_p, tok.eos_token_id,
                                self._vocab_size(), self.device)

        def processor(input_ids: Any, scores: Any) -> Any:
            chosen = sampler.step(scores, range(len(rows)))
            return torch.full_like(scores, float("-inf")).scatter_(1, chosen.unsqueeze(1), 0.0)

        generation = GenerationConfig(max_new_tokens=max(limits), do_sample=False, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
        with torch.inference_mode():
            self.model.generate(**encoded, generation_config=generation,
                                logits_processor=LogitsProcessorList([processor]))
        for (request, _, _), outcome, limit in zip(rows, sampler.outcomes(), limits):
            yield request.key, _reply(tok.decode(outcome.tokens, skip_special_tokens=True), outcome, limit)


def make_backend(llm: Any, row: str, threads: int | None) -> TransformersBackend:
    decoder = "generate" if row in ("generate", "+sampler") else "cached"
    config = llm.model_copy(update={"decoder": decoder, "threads": threads, "max_attempts": 1})
    backend = (SamplerInGenerate if row == "+sampler" else TransformersBackend)(config)
    backend.check_ready()
    if row == "+cache":
        backend.prefix_store = None
    return backend


def describe_requests(config: Any, n: int) -> list[tuple[str, str, LLMRequest]]:
    templates = config.prompts.templates
    describe = load_template(templates.concept_describe)
    seeds = load_seeds(config.prompts.seed_concepts, config.categories)
    per_category = [seeds[c][:config.prompts.seeds_per_category] for c in config.categories]
    chosen = [s for round_ in zip(*per_category) for s in round_][:n]  # one per category, then the next
    return [(s.category, s.concept, LLMRequest(f"describe{i:02d}", describe.render(category=s.category,
                                                                                   concept=s.concept),
                                               ConceptDescription)) for i, s in enumerate(chosen)]


def run_row(backend: TransformersBackend, phases: list[list[LLMRequest]]) -> tuple[float, list[dict[str, Any]]]:
    replies = []
    start = time.perf_counter()
    for requests in phases:
        replies.append({r.key: r for r in backend.run(requests)})
    return time.perf_counter() - start, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "pipelines" / "demo.yaml"))
    parser.add_argument("--concepts", type=int, default=8, help="seed concepts (requests per phase)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every row but +threads")
    parser.add_argument("--rows", nargs="+", default=["generate", "+sampler", "+cache", "+prefix", "+threads"])
    args = parser.parse_args()
    config = load_config(args.config)
    llm = config.llm
    n = config.prompts.pairs_per_concept
    unsafe_t = load_template(config.prompts.templates.pair_unsafe)
    safe_t = load_template(config.prompts.templates.pair_safe)

    described = describe_requests(config, args.concepts)
    phases: list[list[LLMRequest]] = [[r for _, _, r in described]]
    print(f"# {llm.model} ({llm.dtype}), temperature {llm.temperature}, top_p {llm.top_p}, batch {llm.batch_size}, "
          f"{args.concepts} concepts x 3 phases; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start; python {platform.python_version()}")
    results: list[tuple[str, float, int, int, int, Any]] = []
    for row in args.rows:
        backend = make_backend(llm, row, None if row == "+threads" else args.threads)
        tok = backend.tokenizer
        if len(phases) == 1:  # the first row builds the p_h and p_s requests from its replies
            start = time.perf_counter()
            first = {r.key: r for r in backend.run(phases[0])}
            unsafe = []
            for (category, concept, request) in described:
                reply = first[request.key]
                description = reply.value.description if reply.ok else "no description"
                unsafe.append(LLMRequest(request.key.replace("describe", "unsafe"), unsafe_t.render(
                    category=category, concept=concept, description=description, idx=1, n=n), ImagePrompt))
            second = {r.key: r for r in backend.run(unsafe)}
            safe = []
            for (category, concept, _), request in zip(described, unsafe):
                reply = second[request.key]
                p_h = reply.value.prompt if reply.ok else (reply.raw or "a street at night")
                safe.append(LLMRequest(request.key.replace("unsafe", "safe"), safe_t.render(
                    category=category, concept=concept, prompt=p_h, avoid=concept), ImagePrompt))
            third = {r.key: r for r in backend.run(safe)}
            seconds, replies = time.perf_counter() - start, [first, second, third]
            phases += [unsafe, safe]
        else:
            seconds, replies = run_row(backend, phases)
        flat = [r for phase in replies for r in phase.values()]
        generated = sum(len(tok(r.raw, add_special_tokens=False)["input_ids"]) + 1 for r in flat if r.raw)
        prompt_tokens = sum(len(tok.apply_chat_template(q.messages, add_generation_prompt=True, tokenize=True))
                            for phase in phases for q in phase)
        results.append((row, seconds, len(flat), generated, sum(r.ok for r in flat), backend.usage()))
        backend.close()
        print(f"  {row}: {seconds:.1f} s, threads {results[-1][5]['threads']}, load {os.getloadavg()[0]:.1f}",
              flush=True)

    print(f"\nprompt tokens per pass: {prompt_tokens} over {sum(len(p) for p in phases)} requests")
    print("| row | seconds | requests/s | generated tokens/s | speed-up vs generate | stage-2-equivalent s | valid "
          "| threads | prefix tokens computed / reused |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = results[0][1] / results[0][2]
    for row, seconds, requests, generated, valid, usage in results:
        per_request = seconds / requests
        print(f"| {row} | {seconds:.1f} | {requests / seconds:.2f} | {generated / seconds:.1f} | "
              f"{base / per_request:.2f}x | {per_request * DEMO_STAGE2_REQUESTS:.0f} | {valid}/{requests} | "
              f"{usage['threads']} | {usage['prefix_tokens_computed']} / {usage['prefix_tokens_reused']} |")
    print(f"\nstage-2-equivalent s = seconds per request x {DEMO_STAGE2_REQUESTS} (the demo's engine requests; "
          f"its stage 2 took {DEMO_STAGE2_SECONDS} s on the old path, idle machine)")


if __name__ == "__main__":
    main()
