"""The transformers backend's cached engine (prefix_decoding.py) against the generate() path and a
plain single-row forward: same tokens, logits within float tolerance, replies independent of what the
prefix store held before and of the process they ran in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_llm_transformers import Ban, backend

from sage_builder.llm.base import LLMRequest
from sage_builder.llm.prefix_decoding import (
    GuidedSampler,
    PrefixStore,
    common_prefix_length,
    make_forward,
    prefill,
)
from sage_builder.testing.tiny_llm import save_tiny_llama

# A long shared system message: the chunk's common prefix spans several PREFIX_BLOCK blocks.
SYSTEM = ("You are a careful assistant for a safety dataset. Answer with one JSON object that follows the schema. "
          "Write an unsafe prompt and its safe counterpart when asked; keep every answer short.")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-prefix"))


def shared_requests(n: int, start: int = 0) -> list[LLMRequest]:
    return [LLMRequest(key=f"user{i}", schema=Ban, messages=[
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"User {i} is {14 + i} years old{' and anxious' * (i % 3)}. Which are unsafe?"}])
        for i in range(start, start + n)]


def replies(model: Path, requests: list[LLMRequest], **overrides) -> tuple[dict[str, str | None], dict]:
    with backend(model, **overrides) as llm:
        out = {r.key: r.raw for r in llm.run(requests)}
        return out, llm.usage()


def test_greedy_replies_equal_the_generate_path(tiny_llama):
    cached, usage = replies(tiny_llama, shared_requests(10), temperature=0.0, decoder="cached")
    generated, old_usage = replies(tiny_llama, shared_requests(10), temperature=0.0, decoder="generate")
    assert usage["decoder"] == "cached" and old_usage["decoder"] == "generate"
    assert usage["prefix_tokens_computed"] >= 32 and usage["prefix_tokens_reused"] > 0  # later chunks reuse it
    assert all(cached.values()) and cached == generated


def test_first_token_logits_equal_each_prompt_alone(tiny_llama):
    """Shared prefix once + right-aligned suffixes with explicit positions = every prompt run alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = [tok(tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"] for r in shared_requests(5)]
    assert len({len(p) for p in prompts}) > 1  # suffixes of different lengths: the gap is exercised
    store = PrefixStore()
    assert common_prefix_length(prompts, store.block) >= 2 * store.block
    state = prefill(make_forward(model), store, prompts, new_tokens=4, device="cpu")
    with torch.inference_mode():
        alone = torch.cat([model(input_ids=torch.tensor([p])).logits[:, -1] for p in prompts])
    # Same keys at the same positions; only float summation order differs (longer, zero-weighted key axis).
    assert torch.allclose(state.logits, alone, atol=1e-5, rtol=1e-5), (state.logits - alone).abs().max()
    assert torch.equal(state.logits.argmax(-1), alone.argmax(-1))


def test_replies_do_not_depend_on_what_the_prefix_store_held(tiny_llama):
    cold, _ = replies(tiny_llama, shared_requests(4, start=20))
    with backend(tiny_llama) as llm:
        list(llm.run(shared_requests(8)))  # warms the store with the same prefix blocks
        before = llm.usage()["prefix_tokens_reused"]
        warm = {r.key: r.raw for r in llm.run(shared_requests(4, start=20))}
        assert llm.usage()["prefix_tokens_reused"] > before  # the blocks were really reused
    assert warm == cold


def test_replies_are_byte_identical_in_a_new_process(tiny_llama):
    here, _ = replies(tiny_llama, shared_requests(6))
    script = (
        "import json, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_llm_prefix_decoding import replies, shared_requests\n"
        f"print(json.dumps(replies({str(tiny_llama)!r}, shared_requests(6))[0]))\n")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300,
                         check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_a_row_at_its_token_limit_leaves_the_others_untouched(tiny_llama):
    requests = shared_requests(4)
    short = LLMRequest(key="short", schema=Ban, messages=requests[0].messages, max_new_tokens=3)
    with backend(tiny_llama, temperature=0.0) as llm:
        results = {r.key: r for r in llm.run(requests + [short])}
    assert results["short"].reason == "truncated" and results["short"].value is None
    assert all(results[r.key].ok for r in requests)


def test_top_p_draw_matches_a_sorted_reference():
    """The top-k shortcut keeps the same tokens as a full sort, and the draw is the inverse CDF."""
    import torch

    def reference(probs, u, top_p):
        values, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(values, 0) - values < top_p
        values = values * keep
        cdf = torch.cumsum(values, 0)
        return int(order[int((cdf > u * cdf[-1]).nonzero()[0])])

    vocab = 5000
    sampler = GuidedSampler([None] * 6, seeds=list(range(6)), limits=[4] * 6, temperature=1.0, top_p=0.9,
                            eos_token_id=0, vocab=vocab, device="cpu")
    generator = torch.Generator().manual_seed(0)
    for scale in (8.0, 0.05):  # peaked (top-64 holds 90%) and flat (needs the wider top-k or the sort)
        scores = torch.randn(6, vocab, generator=generator) * scale
        scores[:, 7] = float("-inf")  # a masked token is never drawn
        uniforms = torch.rand(6, generator=generator)
        picked = sampler._sample(scores, uniforms)
        probs = torch.softmax(scores, -1)
        assert [int(t) for t in picked] == [reference(probs[r], uniforms[r], 0.9) for r in range(6)]


def test_threads_setting_is_applied_and_recorded(tiny_llama):
    import torch

    before = torch.get_num_threads()
    try:
        _, usage = replies(tiny_llama, shared_requests(2), threads=1)
        assert usage["threads"] == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_smollm2_demo_template_greedy_equals_generate(smollm2_dir):
    """The real model on the demo's p_h template: the cached engine gives generate()'s replies."""
    from sage_builder.config import load_config
    from sage_builder.stages.prompts.schemas import ImagePrompt
    from sage_builder.templates import load_template

    root = Path(__file__).resolve().parent.parent
    template = load_template(load_config(root / "pipelines" / "demo.yaml").prompts.templates.pair_unsafe)
    concepts = [("Violence", "street fight"), ("Hate", "hate symbol"), ("Shocking", "gore"),
                ("Propaganda", "war poster"), ("Harassment", "cyberbullying"), ("Self-Harm", "cutting")]
    requests = [LLMRequest(f"p{i}", template.render(category=c, concept=k, description="no description", idx=1, n=2),
                           ImagePrompt) for i, (c, k) in enumerate(concepts)]
    settings = {"temperature": 0.0, "max_new_tokens": 96, "batch_size": 6, "threads": 1}
    cached, usage = replies(smollm2_dir, requests, decoder="cached", **settings)
    generated, _ = replies(smollm2_dir, requests, decoder="generate", **settings)
    assert usage["prefix_tokens_computed"] >= 160  # the template's system message and worked example
    # Float summation order differs between the engines, so a near-tie could flip one token of one reply;
    # in the runs so far all were equal.
    assert sum(cached[k] == generated[k] for k in cached) >= len(cached) - 1, (cached, generated)


def _reject_first_reply():
    calls = []

    def check(value):
        calls.append(value)
        return "first_reply_rejected" if len(calls) == 1 else None
    return check


def test_a_failed_reply_is_retried_inside_the_running_stream(tiny_llama, monkeypatch):
    """Retries join the stream (one engine run for both attempts) with the attempt loop's seeds and replies."""
    from sage_builder.llm.base import derive_seed
    from sage_builder.llm.transformers_backend import TransformersBackend

    def with_retries() -> list[LLMRequest]:
        return [LLMRequest(r.key, r.messages, r.schema, check=_reject_first_reply() if i % 2 == 0 else None)
                for i, r in enumerate(shared_requests(8))]

    streams = []
    real_stream = TransformersBackend._stream
    monkeypatch.setattr(TransformersBackend, "_stream", lambda self, queue: (streams.append(1),
                                                                              real_stream(self, queue))[1])
    with backend(tiny_llama, max_attempts=2, batch_size=3) as llm:
        streamed = {r.key: r for r in llm.run(with_retries())}
        sent = llm.usage()["requests"]
    assert len(streams) == 1 and sent == 8 + 4  # attempt 2 of the four rejected ran in the same stream
    for i in range(8):
        result = streamed[f"user{i}"]
        assert result.ok and result.attempts == (2 if i % 2 == 0 else 1)
        assert result.seed == derive_seed(5, f"user{i}", result.attempts)
        assert result.errors == (["attempt 1: first_reply_rejected"] if i % 2 == 0 else [])

    monkeypatch.setattr(TransformersBackend, "streams_retries", lambda self: False)
    with backend(tiny_llama, max_attempts=2, batch_size=3) as llm:
        looped = {r.key: r for r in llm.run(with_retries())}
    assert {k: (r.attempts, r.seed) for k, r in looped.items()} == {k: (r.attempts, r.seed) for k, r in streamed.items()}
    # Same seeds and prompts, other batch layouts: equal up to float near-ties of the random tiny model.
    assert sum(looped[k].raw == streamed[k].raw for k in streamed) >= 7


def test_rows_joining_a_small_stream_move_the_slots_down_and_keep_their_replies(tiny_llama, monkeypatch):
    """Two rows at a time for ten sampled requests: rows join as others finish, the slots are shifted down when
    the write slot nears the capacity, and the replies equal those of one batch of ten."""
    from sage_builder.llm import prefix_decoding

    shifts = []
    real = prefix_decoding.DecodeStream._make_room

    def spy(self, queue, n):
        before, present = self.s, len(self.present)
        room = real(self, queue, n)
        if present and self.s < before:
            shifts.append((before, self.s))
        return room
    monkeypatch.setattr(prefix_decoding.DecodeStream, "_make_room", spy)
    small, _ = replies(tiny_llama, shared_requests(10), batch_size=2, max_new_tokens=32)
    assert shifts, "the write slot never neared the capacity"
    whole, _ = replies(tiny_llama, shared_requests(10), batch_size=10, max_new_tokens=32)
    assert sum(v is not None for v in small.values()) >= 5
    # Same seeds, other batch layouts: equal up to float near-ties of the random tiny model.
    assert sum(small[k] == whole[k] for k in small) >= 9, (small, whole)
