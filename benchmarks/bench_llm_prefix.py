"""The transformers backend's CPU levers on the demo's own stage-2 requests, old path vs new, one run.

Requests are built as the prompts stage builds them, from ``pipelines/demo.yaml`` (its model,
sampling settings and batch size) and its templates: for the first ``--concepts`` seed concepts (in
category order) a description request, then a p_h request (pair_unsafe, idx 1 of
``pairs_per_concept``) with that description, then a p_s request (pair_safe) rewriting that p_h.
The descriptions and p_h texts come from an untimed setup pass with the new engine, and every row
then answers the same three request lists, so rows differ only in the engine. Rows share one loaded
model; each row's prefix store starts empty, so computing each template's prefix once is timed.
Rows take turns within each phase (the order rotates), so that a load swing on a shared machine
hits every row alike; the speed-up column is the median of the per-phase ratios to ``generate``.

Rows add one lever each:

- ``generate``: transformers' generate() + the old logits processor (``llm.decoder: generate``);
- ``+sampler``: generate() with the new sampler (masks for running rows only, top-p for all rows
  at once, no per-row ``torch.multinomial``);
- ``+cache``: the own decoding loop (pre-allocated KV cache, forced first tokens prefilled,
  finished rows dropped), no prefix reuse;
- ``+prefix``: shared-prefix KV reuse on top (``llm.decoder: cached``, the default);
- ``+threads``: the new path with the thread count the backend picks from idle cores;
- ``+batchN`` (e.g. ``+batch16``, ``+batch32``): the new path with N prompts per engine call instead
  of the demo's batch size (execution-only, like the engine: more rows share each pass over the weights).
  Every row but ``+streamN`` runs its engine calls chunk after chunk (``streams_retries`` off);
- ``+streamN``: continuous batching, N rows at most (what the backend does now): a finished row
  leaves at once and the next request joins the running batch. Here each request is asked once
  (``max_attempts: 1``), so the retries that join the stream in a stage run are not part of it.

A row named ``ROW@old`` runs ROW on the templates of ``--old-templates`` (a git revision; default
the commit before the templates put their per-request fields last) at the old demo's batch size (8)
with p_s at ``llm.temperature``;
plain rows use the working tree's templates and ``prompts.safe_temperature``. Both sets answer the
same concepts, descriptions and p_h texts, so ``generate@old`` against ``+prefix`` is the old stage
2 against the new one. The shared prefix of each phase's prompts is printed per template set.

Stage-2-equivalent seconds scale a row's seconds per request to the 282 engine requests of the
idle-machine demo run in BENCHMARKS.md (500.7 s for stage 2 on the old path).

    python benchmarks/bench_llm_prefix.py [--concepts 8] [--threads 1] [--rows generate +sampler +cache +prefix]
    python benchmarks/bench_llm_prefix.py --rows generate@old +prefix@old generate +prefix
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sage_builder.config import config_from_dict
from sage_builder.llm.base import LLMRequest
from sage_builder.llm.prefix_decoding import (
    PREFIX_BLOCK,
    GuidedSampler,
    common_prefix_length,
    make_forward,
)
from sage_builder.llm.transformers_backend import (
    TransformersBackend,
    TransportFailure,
    _reply,
    _set_cpu_threads,
)
from sage_builder.stages.prompts.concepts import load_seeds
from sage_builder.stages.prompts.schemas import ConceptDescription, ImagePrompt
from sage_builder.templates import load_template

ROOT = Path(__file__).resolve().parent.parent
DEMO_STAGE2_REQUESTS = 282
DEMO_STAGE2_SECONDS = 500.7
# The last commit whose templates had the per-request fields first (the ``@old`` rows).
OLD_TEMPLATES = "fdfd633^"
OLD_BATCH_SIZE = 8  # the demo's llm.batch_size before issue 18 (the ``@old`` rows)
TEMPLATE_NAMES = ("concept_describe", "pair_unsafe", "pair_safe")


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


def row_backend(base: TransformersBackend, row: str) -> TransformersBackend:
    """A backend for one row sharing ``base``'s loaded model (one copy of the weights for all rows)."""
    old = row.endswith("@old")
    row = row.split("@")[0]
    decoder = "generate" if row in ("generate", "+sampler") else "cached"
    update: dict[str, Any] = {"decoder": decoder, "max_attempts": 1}
    if old:
        update["batch_size"] = OLD_BATCH_SIZE
    if row.startswith("+batch"):
        update["batch_size"] = int(row.removeprefix("+batch"))
    if row.startswith("+stream"):
        update["batch_size"] = int(row.removeprefix("+stream"))
    backend = (SamplerInGenerate if row == "+sampler" else TransformersBackend)(base.config.model_copy(update=update))
    backend.model, backend.tokenizer, backend.device = base.model, base.tokenizer, base.device
    backend._ll_tokenizer = base._ll_tokenizer
    backend._forward = make_forward(base.model) if decoder == "cached" else None
    if row == "+cache":
        backend.prefix_store = None
    if not row.startswith("+stream"):
        backend.streams_retries = lambda: False  # type: ignore[method-assign]  # chunk after chunk, as before
    return backend


def stage2_config(path: Path) -> Any:
    """The pipeline file's name, seed, categories, llm and prompts sections (the others play no part here)."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    keep = {key: data[key] for key in ("name", "seed", "categories", "llm", "prompts") if key in data}
    return config_from_dict(keep, base_dir=path.resolve().parent, source=str(path))


def old_templates(revision: str, folder: Path) -> dict[str, Any]:
    """The stage-2 templates as committed at ``revision`` (git show), loaded from ``folder``."""
    loaded = {}
    for name in TEMPLATE_NAMES:
        text = subprocess.run(["git", "show", f"{revision}:prompts/{name}.txt"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
        loaded[name] = load_template(folder / f"{name}.txt")
    return loaded


def seed_concepts(config: Any, n: int) -> list[tuple[str, str]]:
    seeds = load_seeds(config.prompts.seed_concepts, config.categories)
    per_category = [seeds[c][:config.prompts.seeds_per_category] for c in config.categories]
    chosen = [s for round_ in zip(*per_category) for s in round_][:n]  # one per category, then the next
    return [(s.category, s.concept) for s in chosen]


def phase_requests(templates: dict[str, Any], concepts: list[tuple[str, str]], descriptions: list[str],
                   p_hs: list[str], n: int, safe_temperature: float | None) -> list[list[LLMRequest]]:
    """The three phases' requests of one template set: descriptions, p_h, p_s (as the stage builds them)."""
    describe = [LLMRequest(f"describe{i:02d}", templates["concept_describe"].render(category=c, concept=k),
                           ConceptDescription) for i, (c, k) in enumerate(concepts)]
    unsafe = [LLMRequest(f"unsafe{i:02d}", templates["pair_unsafe"].render(
        category=c, concept=k, description=d, idx=1, n=n), ImagePrompt)
        for i, ((c, k), d) in enumerate(zip(concepts, descriptions))]
    safe = [LLMRequest(f"safe{i:02d}", templates["pair_safe"].render(
        category=c, concept=k, prompt=p_h, avoid=", ".join(dict.fromkeys([k, c.lower()]))), ImagePrompt,
        temperature=safe_temperature) for i, ((c, k), p_h) in enumerate(zip(concepts, p_hs))]
    return [describe, unsafe, safe]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "pipelines" / "demo.yaml"))
    parser.add_argument("--concepts", type=int, default=8, help="seed concepts (requests per phase)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every row but +threads")
    parser.add_argument("--old-templates", default=OLD_TEMPLATES, help="git revision of the @old rows' templates")
    parser.add_argument("--rows", nargs="+", default=["generate", "+sampler", "+cache", "+prefix", "+threads",
                                                      "+batch16"])
    args = parser.parse_args()
    import torch

    config = stage2_config(Path(args.config))
    llm = config.llm
    n = config.prompts.pairs_per_concept
    new_t = {name: load_template(getattr(config.prompts.templates, name)) for name in TEMPLATE_NAMES}
    concepts = seed_concepts(config, args.concepts)
    print(f"# {llm.model} ({llm.dtype}), temperature {llm.temperature}, p_s temperature "
          f"{config.prompts.safe_temperature} (@old rows: {llm.temperature}), top_p {llm.top_p}, batch "
          f"{llm.batch_size}, {args.concepts} concepts x 3 phases; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start; python {platform.python_version()}")
    base = TransformersBackend(llm.model_copy(update={"threads": args.threads, "max_attempts": 1}))
    base.check_ready()
    torch.set_num_threads(os.cpu_count() or 1)  # the auto choice is capped by the current setting
    auto_threads = _set_cpu_threads(None)
    print(f"# threads: {args.threads} for every row, +threads: {auto_threads} (picked from idle cores now)")

    # Setup, untimed: descriptions and p_h texts from the new engine on the current templates, as the
    # stage would; every template set then renders its requests from these same texts.
    setup = row_backend(base, "+prefix")
    first = phase_requests(new_t, concepts, ["-"] * len(concepts), ["-"] * len(concepts), n, None)[0]
    base._matcher(first[0])
    replies = {r.key: r for r in setup.run(first)}
    descriptions = [r.value.description if r.ok else "no description" for r in (replies[q.key] for q in first)]
    unsafe = phase_requests(new_t, concepts, descriptions, ["-"] * len(concepts), n, None)[1]
    replies = {r.key: r for r in setup.run(unsafe)}
    p_hs = [r.value.prompt if r.ok else (r.raw or "a street at night") for r in (replies[q.key] for q in unsafe)]
    sets = {"new": phase_requests(new_t, concepts, descriptions, p_hs, n, config.prompts.safe_temperature)}
    if any(row.endswith("@old") for row in args.rows):
        folder = Path(tempfile.mkdtemp(prefix="bench-templates-"))
        sets["old"] = phase_requests(old_templates(args.old_templates, folder), concepts, descriptions, p_hs, n,
                                     None)
    tok = base.tokenizer
    for name, phases in sets.items():
        shares = []
        for label, requests in zip(("describe", "p_h", "p_s"), phases):
            ids = [tok(tok.apply_chat_template(q.messages, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"] for q in requests]
            shared = common_prefix_length(ids, 1)
            shares.append(f"{label} {shared} of {sum(map(len, ids)) / len(ids):.0f} "
                          f"({common_prefix_length(ids, PREFIX_BLOCK)} in {PREFIX_BLOCK}-token blocks)")
        print(f"# {name} templates, shared prompt prefix tokens of mean prompt tokens: " + "; ".join(shares))

    # Rows take turns within each phase (the order rotates), so a load swing on this shared machine
    # hits every row alike; a row's ratio is its median per-phase ratio to generate.
    backends = {row: row_backend(base, row) for row in args.rows}
    seconds: dict[str, list[float]] = {row: [] for row in args.rows}
    outcomes: dict[str, list[Any]] = {row: [] for row in args.rows}
    for p in range(3):
        order = args.rows[p % len(args.rows):] + args.rows[:p % len(args.rows)]
        for row in order:
            torch.set_num_threads(auto_threads if row == "+threads" else args.threads)
            start = time.perf_counter()
            outcomes[row] += list(backends[row].run(sets["old" if row.endswith("@old") else "new"][p]))
            seconds[row].append(time.perf_counter() - start)
            print(f"  phase {p + 1} {row}: {seconds[row][-1]:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for row in args.rows:
        flat = outcomes[row]
        generated = sum(len(tok(r.raw, add_special_tokens=False)["input_ids"]) + 1 for r in flat if r.raw)
        ratios = sorted(g / t for g, t in zip(seconds[args.rows[0]], seconds[row]))
        results.append((row, sum(seconds[row]), len(flat), generated, sum(r.ok for r in flat),
                        backends[row].usage(), ratios[len(ratios) // 2],
                        auto_threads if row == "+threads" else args.threads))
    for name, phases in sets.items():
        prompt_tokens = sum(len(tok(tok.apply_chat_template(q.messages, add_generation_prompt=True,
                                                            tokenize=False), add_special_tokens=False)["input_ids"])
                            for phase in phases for q in phase)
        print(f"\n{name} templates: prompt tokens per pass: {prompt_tokens} over {sum(map(len, phases))} requests")
    print("| row | seconds | requests/s | generated tokens/s | speed-up vs generate (median of phases) "
          "| stage-2-equivalent s | valid | threads | prefix tokens computed / reused |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, total, requests, generated, valid, usage, ratio, threads in results:
        per_request = total / requests
        print(f"| {row} | {total:.1f} | {requests / total:.2f} | {generated / total:.1f} | {ratio:.2f}x | "
              f"{per_request * DEMO_STAGE2_REQUESTS:.0f} | {valid}/{requests} | {threads} | "
              f"{usage['prefix_tokens_computed']} / {usage['prefix_tokens_reused']} |")
    print(f"\nstage-2-equivalent s = seconds per request x {DEMO_STAGE2_REQUESTS} (the demo's engine requests; "
          f"its stage 2 took {DEMO_STAGE2_SECONDS} s on the old path, idle machine)")


if __name__ == "__main__":
    main()
