"""In-process generation with transformers, constrained to the reply's JSON schema by llguidance.

Requests are batched (``llm.batch_size`` prompts per engine call, sorted by the length of their
messages to waste little padding; see ``plan_chunks``) and each prompt goes through the model's
chat template. Per row and step the next token is one the row's llguidance matcher (compiled from
the request's JSON schema, no free whitespace) accepts, chosen greedily when the temperature (the
request's own, else ``llm.temperature``) is 0, else by temperature/top-p sampling from draws of the
row's own ``torch.Generator`` seeded with the request's seed.

Two engines, chosen by ``llm.decoder`` (execution-only: it never enters item keys):

- ``cached`` (default, ``prefix_decoding.py``): the requests' shared prompt prefix is prefilled once
  per model and reused, each row prefills only its own suffix into a pre-allocated cache, and the
  batch is continuous: ``llm.batch_size`` rows at most, a finished row leaves at once, waiting
  requests and retries of failed replies join the running batch (``_stream``); top-p runs for all
  rows at once. The Ray executor's engine calls still go through ``_complete`` (chunks).
- ``generate``: transformers' ``generate`` over left-padded whole prompts with
  :class:`ConstrainedSampler` as logits processor (the earlier path, kept for comparison).

Seeds: a row's random draws depend only on its seed, never on the other rows. The logits
themselves can still differ in the last bits between batch compositions (padding changes the
matrix shapes), so identical output is guaranteed for the same seed *and* the same batch
composition; across compositions it is identical up to such float ties. The two engines differ in
the same way, and sample differently (inverse CDF vs ``torch.multinomial``): greedy replies agree
up to float ties, sampled ones do not.

Threads on CPU: ``llm.threads``, else the cores idle while the model loads (``/proc/stat``), at
most torch's current setting; the choice is logged and recorded in the stage manifest's
``llm_usage``. On this project's CPUs the thread count did not change a logit bit (1 vs 2 threads).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sage_builder.errors import SageError
from sage_builder.llm.base import (
    LLMBackend,
    LLMRequest,
    TransportFailure,
    request_temperature,
)
from sage_builder.llm.prefix_decoding import (
    DecodeStream,
    GuidedSampler,
    PrefixStore,
    RowOutcome,
    StreamQueue,
    StreamRow,
    decode_batch,
    make_forward,
    supports_cached_decoding,
    unpack_bitmask,
)
from sage_builder.runtime import hub_offline, is_local_path, resolve_device, torch_dtype

log = logging.getLogger("sage.llm.transformers")

class TransformersBackend(LLMBackend):
    name = "transformers"

    def __init__(self, config):  # type: ignore[no-untyped-def]
        super().__init__(config)
        self.model: Any = None
        self.tokenizer: Any = None
        self._ll_tokenizer: Any = None
        self._grammars: dict[str, str] = {}
        self.threads: int | None = None
        # The cached engine's state: one prefix store per loaded model (None: no prefix reuse).
        self.prefix_store: PrefixStore | None = PrefixStore()
        self._forward: Any = None
        # What served the requests (usage() is read after close(), which drops the engine).
        self.decoder_used: str = config.decoder

    def check_ready(self) -> None:
        self._load()

    def _load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        c = self.config
        if is_local_path(c.model) and not Path(c.model).exists():
            raise SageError(f"llm.model: the model folder {c.model} does not exist (run `make models` to prepare "
                            "the small local models, or name a hub id)")
        offline = hub_offline()
        kwargs: dict[str, Any] = {"revision": c.revision, "local_files_only": offline}
        if c.gguf_file:
            kwargs["gguf_file"] = c.gguf_file
        device = resolve_device(c.device, "llm.device")
        dtype = torch_dtype(c.dtype, device)
        if device == "cpu":
            self.threads = _set_cpu_threads(c.threads)
        try:
            tokenizer = AutoTokenizer.from_pretrained(c.model, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(c.model, dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:
            hint = " (offline: run `make models`, or unset HF_HUB_OFFLINE to download)" if offline else ""
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SageError(f"llm.model: cannot load '{c.model}'{hint}: {first[:200]}") from None
        if not getattr(tokenizer, "chat_template", None):
            raise SageError(f"llm.model: '{c.model}' has no chat template; use an instruct/chat model")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        if c.decoder == "cached":
            if supports_cached_decoding(self.model):
                self._forward = make_forward(self.model)
            else:
                self.decoder_used = "generate"
                log.warning("llm.decoder: cached needs full-attention layers and sdpa or eager attention; "
                            "'%s' is served by generate()", c.model)

    def usage(self) -> dict[str, Any]:
        store = self.prefix_store
        return {**super().usage(), "decoder": self.decoder_used,
                "threads": self.threads,
                "prefix_tokens_computed": store.computed_tokens if store else 0,
                "prefix_tokens_reused": store.reused_tokens if store else 0}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "constrained_decoding": "llguidance"}

    def engines(self) -> tuple[int, float]:
        device = getattr(self, "device", self.config.device)
        return 1, 1.0 if str(device).startswith("cuda") else 0.0

    def _matcher(self, request: LLMRequest) -> Any:
        import llguidance
        import llguidance.hf

        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self._vocab_size())
        schema = request.json_schema()
        # Keyed by content: stages build reply models on the fly (same name, other enums).
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            self._grammars[key] = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False})
        matcher = llguidance.LLMatcher(self._ll_tokenizer, self._grammars[key], log_level=0)
        if matcher.is_error():
            raise SageError(f"reply schema {request.schema_name}: llguidance cannot compile it "
                            f"({matcher.get_error()})")
        return matcher

    def _vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @staticmethod
    def _by_temperature(config, batch):  # type: ignore[no-untyped-def]
        """Per temperature (first seen first), the items sorted by the length of their messages (stable)."""
        groups: dict[float, list[tuple[Any, int]]] = {}
        for item in batch:
            groups.setdefault(request_temperature(config, item[0]), []).append(item)
        return [sorted(items, key=lambda item: sum(len(m.get("content") or "") for m in item[0].messages))
                for items in groups.values()]

    @classmethod
    def plan_streams(cls, config, batch):  # type: ignore[no-untyped-def]
        """One stream per temperature, similar lengths together (a stream samples at one temperature)."""
        return cls._by_temperature(config, batch)

    def streams_retries(self) -> bool:
        self._load()
        return self._forward is not None

    def _stream(self, queue):  # type: ignore[no-untyped-def]
        """The cached engine as a continuous batch of ``llm.batch_size`` rows (``DecodeStream``)."""
        tok = self.tokenizer
        first = queue[0][0]
        sampler = GuidedSampler([], [], [], request_temperature(self.config, first), self.config.top_p,
                                tok.eos_token_id, self._vocab_size(), self.device)
        rows = StreamQueue(queue, lambda request, seed: self._stream_row(sampler, request, seed))
        stream = DecodeStream(self._forward, self.prefix_store, sampler, self.config.batch_size, self.device)
        for row, outcome in stream.run(rows):
            request = rows.requests.pop(row)
            yield request.key, _reply(tok.decode(outcome.tokens, skip_special_tokens=True), outcome,
                                      sampler.limits[row])

    def _stream_row(self, sampler: GuidedSampler, request: LLMRequest, seed: int) -> StreamRow:
        text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        limit = request.max_new_tokens or self.config.max_new_tokens
        row = sampler.add(self._matcher(request), seed, limit)
        tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"] + sampler.forced_start(row)
        return StreamRow(row, tokens)

    @classmethod
    def plan_chunks(cls, config, batch):  # type: ignore[no-untyped-def]
        """``llm.batch_size`` requests per ``generate`` call, similar lengths together (less padding).

        The length is that of the messages' text, so the cut needs no tokenizer and the Ray executor
        cuts exactly as this process would (the sort is stable: ties keep the request order). A call
        samples at one temperature: requests with their own are cut apart, first seen first.
        """
        size = config.batch_size
        return [ordered[start:start + size] for ordered in cls._by_temperature(config, batch)
                for start in range(0, len(ordered), size)]

    def _complete(self, batch: Sequence[tuple[LLMRequest, int]]) -> Iterator[tuple[str, str | TransportFailure]]:
        self._load()
        for chunk in self.plan_chunks(self.config, batch):
            yield from self._generate([(request, seed, self.tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True, tokenize=False)) for request, seed in chunk])

    def _generate(self, rows: list[tuple[LLMRequest, int, str]]) -> Iterator[tuple[str, str | TransportFailure]]:
        if self._forward is None:
            yield from self._generate_hf(rows)
            return
        tok = self.tokenizer
        limits = [request.max_new_tokens or self.config.max_new_tokens for request, _, _ in rows]
        sampler = GuidedSampler([self._matcher(request) for request, _, _ in rows], [seed for _, seed, _ in rows],
                                limits, request_temperature(self.config, rows[0][0]), self.config.top_p,
                                tok.eos_token_id, self._vocab_size(), self.device)
        prompts = [tok(text, add_special_tokens=False)["input_ids"] for _, _, text in rows]
        outcomes = decode_batch(self._forward, self.prefix_store, prompts, sampler, self.device)
        for (request, _, _), outcome, limit in zip(rows, outcomes, limits):
            yield request.key, _reply(tok.decode(outcome.tokens, skip_special_tokens=True), outcome, limit)

    def _generate_hf(self, rows: list[tuple[LLMRequest, int, str]]) -> Iterator[tuple[str, str | TransportFailure]]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        tok = self.tokenizer
        encoded = tok([text for _, _, text in rows], return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        max_new = max(request.max_new_tokens or self.config.max_new_tokens for request, _, _ in rows)
        processor = ConstrainedSampler(
            matchers=[self._matcher(request) for request, _, _ in rows],
            seeds=[seed for _, seed, _ in rows],
            limits=[request.max_new_tokens or self.config.max_new_tokens for request, _, _ in rows],
            temperature=request_temperature(self.config, rows[0][0]), top_p=self.config.top_p,
            eos_token_id=tok.eos_token_id, prompt_length=encoded["input_ids"].shape[1])
        generation = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
        with torch.inference_mode():
            output = self.model.generate(**encoded, generation_config=generation,
                                         logits_processor=LogitsProcessorList([processor]))
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        for row, (request, _, _) in enumerate(rows):
            matcher = processor.matchers[row]
            outcome = RowOutcome([], processor.finished(row), matcher.get_error()[:200] if matcher.is_error() else None)
            yield request.key, _reply(tok.decode(new_tokens[row], skip_special_tokens=True), outcome,
                                      processor.limits[row])

    def close(self) -> None:
        self.model = self.tokenizer = self._ll_tokenizer = self._forward = None
        if self.prefix_store is not None:
            self.prefix_store.clear()  # frees the K/V; the counts stay for usage()


def _reply(text: str, outcome: RowOutcome, limit: int) -> str | TransportFailure:
    """A row's text, or why it has none: a grammar error, or its token limit reached mid-object."""
    if outcome.error is not None:
        return TransportFailure("constraint_error", outcome.error)
    if not outcome.finished:
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return TransportFailure("truncated", f"max_new_tokens={limit} reached")
    return text


def _set_cpu_threads(configured: int | None) -> int:
    """``llm.threads``, else the idle cores (never more than torch's current setting); logged."""
    import torch

    if configured:
        threads, why = configured, "llm.threads"
    else:
        idle = _idle_cores()
        current = torch.get_num_threads()
        threads = max(1, min(current, round(idle))) if idle is not None else current
        why = f"{idle:.1f} of {os.cpu_count()} cores idle" if idle is not None else "torch default"
    torch.set_num_threads(threads)
    log.info("transformers backend: %d torch thread(s) (%s)", threads, why)
    return threads


def _idle_cores(window_s: float = 0.5) -> float | None:
    """Idle cores over a short window, from /proc/stat (None where there is none)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, all non-guest time

    try:
        idle0, total0 = sample()
        time.sleep(window_s)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores * (idle1 - idle0) / (total1 - total0)


class ConstrainedSampler:
    """A transformers logits processor: schema mask, then a per-row seeded choice of the next token."""

    def __init__(self, matchers: list[Any], seeds: list[int], limits: list[int], temperature: float,
                 top_p: float, eos_token_id: int, prompt_length: int):
        self.matchers = matchers
        self.seeds = seeds
        self.limits = limits
        self.temperature = temperature
        self.top_p = top_p
        self.eos_token_id = eos_token_id
        self.prompt_length = prompt_length
        self._generators: list[Any] = []
        self._done = [False] * len(matchers)

    def finished(self, row: int) -> bool:
        return self._done[row]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import llguidance.torch as lltorch
        import torch

        batch, vocab = scores.shape
        step = input_ids.shape[1] - self.prompt_length
        if not self._generators:
            self._generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        bitmask = lltorch.allocate_token_bitmask(batch, vocab)
        for row, matcher in enumerate(self.matchers):
            if step > 0 and not self._done[row]:
                last = int(input_ids[row, -1])
                if last == self.eos_token_id or matcher.is_stopped():
                    self._done[row] = True
                else:
                    matcher.consume_token(last)
            if not self._done[row] and step >= self.limits[row]:
                self._done[row] = matcher.is_accepting()
            if not self._done[row] and not matcher.is_error():
                lltorch.fill_next_token_bitmask(matcher, bitmask, row)
        allowed = unpack_bitmask(bitmask, vocab).to(scores.device)
        logits = scores.float().masked_fill(~allowed, float("-inf"))
        stop = [self._done[row] or self.matchers[row].is_error() or step >= self.limits[row] for row in range(batch)]
        if self.temperature == 0.0:
            chosen = torch.argmax(logits, dim=-1)
        else:
            probs = _top_p(torch.softmax(logits / self.temperature, dim=-1), self.top_p)
            chosen = torch.empty(batch, dtype=torch.long, device=scores.device)
            for row in range(batch):
                if not stop[row]:  # each row draws from its own generator: batch-independent
                    chosen[row] = torch.multinomial(probs[row], 1, generator=self._generators[row])[0]
        for row in range(batch):
            if stop[row]:
                chosen[row] = self.eos_token_id
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen.unsqueeze(1), 0.0)
        return out


def _top_p(probs: Any, top_p: float) -> Any:
    """Keep the smallest set of tokens whose mass reaches ``top_p`` (the top token always stays)."""
    import torch

    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)

