"""Batched, schema-constrained decoding that prefills a shared prompt prefix once.

The transformers backend's default engine (``llm.decoder: cached``). Requests built from one
template share most of their chat-templated tokens (the system message, the worked example); only
the last lines differ. ``generate`` prefills every row's whole prompt and grows its KV cache with a
``torch.cat`` per layer and step; here:

- **Shared prefix.** P = the chunk's longest common token prefix, cut down to whole blocks of
  ``PREFIX_BLOCK`` tokens (so that the chunks of one template agree on it) and leaving every row at
  least one token of its own. Its K/V come from :class:`PrefixStore` (per model, least recently used
  prefixes dropped): a template's prefix is computed once, for one row, and copied into every row of
  every later chunk.
- **Pre-allocated cache.** :class:`SlotCache` holds [rows, heads, slots, dim] tensors sized for the
  prompt and the longest reply; a step writes one slot, nothing is concatenated.
- **Layout.** Slots ``[0, P)`` hold the prefix; the S = max L_r slots after it hold each row's own
  L_r suffix tokens right-aligned (so every row's last prompt token is at slot P+S-1); generated
  tokens follow. The masked gap before a short suffix is never attended by real tokens (a gap
  slot's query sees only itself, so it stays finite and is ignored).
- **Positions.** ``position_ids`` are explicit: row r's suffix token j is at position P+j and its
  t-th new token at P+L_r+t, the positions it has alone and unpadded; the 4-D mask is causal in slot
  order, which is token order within a row. So each row attends exactly the keys it has alone at
  the positions it has alone; only float reduction order can differ (longer, zero-weighted key axes,
  other matrix shapes), as it already did with left padding.
- **Forced tokens.** The first tokens that the grammar alone decides (the only one a row's mask
  allows, such as ``{"`` and the first key) are appended to the row's prompt and prefilled with it
  instead of costing a decoding step each; the choice is the same as decoding would make.
- **Continuous batching** (:class:`DecodeStream`). A finished row leaves the batch at once (the last
  batch row takes its place); queued requests join the running batch, their suffixes prefilled to
  end just before the shared write slot, once a quarter of the rows are free. The backend appends a
  failed attempt's retry to the queue while the stream runs. When the write slot would pass the
  cache's capacity, the slots after the prefix are moved down over the gap no row attends any more.
- **Reproducible.** A row's tokens depend on its prompt and seed, not on which rows share its batch,
  up to float reduction order (the masked key axis and the matrix shapes vary with the batch): the
  demo's stage-2 replies were byte-identical at batch 8, 16, 32 and 64 and with or without
  continuous batching. A prefix's K/V are always computed the same way (one forward of exactly its
  tokens), whether the store held it already or not, so a resumed run gets the same bytes as an
  uninterrupted one.

:class:`GuidedSampler` chooses each row's next token: llguidance's mask for rows still running
(finished rows are skipped), then argmax (temperature 0) or top-p sampling done for all rows at
once: the kept set comes from a top-k of the probabilities (64, else 1024, a full sort only when
even that mass is below ``top_p``) and the draw is an inverse-CDF lookup of the row's own uniform,
drawn in advance from the row's ``torch.Generator``: a row's draws depend on its seed only.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

PREFIX_BLOCK = 16
PREFIX_STORE_TOKENS = 4096
TOP_K_TRIES = (64, 1024, 1 << 62)


def _cache_classes() -> tuple[type, type]:
    from transformers.cache_utils import Cache, CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        """One layer's [rows, heads, capacity, dim] K/V; a forward writes rows [lo, lo+batch) at the cursor."""

        is_sliding = False

        def __init__(self, owner: Any):
            super().__init__()
            self.owner = owner

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            self.allocate(key_states.shape[1], key_states.shape[-1], value_states.shape[-1], key_states)

        def allocate(self, heads: int, k_dim: int, v_dim: int, like: Any) -> None:
            rows = self.owner.rows or like.shape[0]
            self.keys = like.new_zeros((rows, heads, self.owner.capacity, k_dim))
            self.values = like.new_zeros((rows, heads, self.owner.capacity, v_dim))
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            lo = self.owner.lo
            hi = lo + key_states.shape[0]
            start = self.owner.start
            end = start + key_states.shape[-2]
            self.keys[lo:hi, :, start:end] = key_states
            self.values[lo:hi, :, start:end] = value_states
            return self.keys[lo:hi, :, :end], self.values[lo:hi, :, :end]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.owner.start + query_length, 0

        def get_seq_length(self) -> int:
            return self.owner.start

        def get_max_length(self) -> int:
            return self.owner.capacity

    class SlotCache(Cache):
        """A pre-allocated KV cache; the decoding loop sets the write slot (``start``) and first row (``lo``)."""

        def __init__(self, n_layers: int, capacity: int, rows: int | None = None):
            self.capacity = capacity
            self.rows = rows  # None: as many as the first forward has
            self.start = 0
            self.lo = 0
            super().__init__(layers=[SlotLayer(self) for _ in range(n_layers)])

        def keep_rows(self, index: Any) -> None:
            for layer in self.layers:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)

        def fill_prefix(self, prefix: Sequence[tuple[Any, Any]], rows: int) -> None:
            """Copy a [1, heads, P, dim] K/V per layer into slots [0, P) of every row."""
            self.rows = rows
            self.put_prefix(prefix, 0, rows)

        def put_prefix(self, prefix: Sequence[tuple[Any, Any]], lo: int, hi: int) -> None:
            """Copy a [1, heads, P, dim] K/V per layer into slots [0, P) of rows [lo, hi)."""
            for layer, (keys, values) in zip(self.layers, prefix):
                if not layer.is_initialized:
                    layer.allocate(keys.shape[1], keys.shape[3], values.shape[3], keys)
                layer.keys[lo:hi, :, :keys.shape[2]] = keys
                layer.values[lo:hi, :, :values.shape[2]] = values

        def move_row(self, src: int, dst: int, end: int) -> None:
            """Row ``src``'s slots [0, end) into row ``dst`` (a finished row's place)."""
            for layer in self.layers:
                layer.keys[dst, :, :end] = layer.keys[src, :, :end]
                layer.values[dst, :, :end] = layer.values[src, :, :end]

        def shift_slots(self, src: int, dst: int, length: int) -> None:
            """Slots [src, src+length) of every row to [dst, dst+length), dst < src."""
            for layer in self.layers:
                layer.keys[:, :, dst:dst + length] = layer.keys[:, :, src:src + length].clone()
                layer.values[:, :, dst:dst + length] = layer.values[:, :, src:src + length].clone()

    return SlotLayer, SlotCache


class _Forward:
    """``model(...)`` with our cache, an explicit 4-D mask and positions, logits of the last slot only."""

    def __init__(self, model: Any):
        self.model = model
        _, self.cache_class = _cache_classes()
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        implementation = getattr(model.config, "_attn_implementation", "sdpa")
        self.additive = implementation == "eager"  # eager attention adds the mask; sdpa takes booleans

    def new_cache(self, capacity: int, rows: int | None = None) -> Any:
        return self.cache_class(self.n_layers, capacity, rows)

    def __call__(self, cache: Any, start: int, input_ids: Any, position_ids: Any, mask: Any) -> Any:
        import torch

        cache.start = start
        if self.additive:
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         logits_to_keep=1, **{self.cache_kwarg: cache})
        return out.logits[:, -1, :]


def make_forward(model: Any) -> _Forward:
    return _Forward(model)


def supports_cached_decoding(model: Any) -> bool:
    """Full-attention decoder layers only: sliding-window and hybrid layers need transformers' own caches."""
    config = model.config.get_text_config(decoder=True)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    implementation = getattr(model.config, "_attn_implementation", "sdpa")
    return kinds == {"full_attention"} and implementation in ("sdpa", "eager")


class PrefixStore:
    """K/V of shared prompt prefixes, keyed by their tokens (one store per model, least recently used dropped)."""

    def __init__(self, block: int = PREFIX_BLOCK, max_tokens: int = PREFIX_STORE_TOKENS):
        self.block = block  # prefixes are cut to whole blocks: chunks of one template then share one entry
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], list[tuple[Any, Any]]] = OrderedDict()
        self._held = 0
        self.computed_tokens = 0
        self.reused_tokens = 0

    def clear(self) -> None:
        """Drop every stored prefix (its memory); the computed/reused counts are kept."""
        self._entries.clear()
        self._held = 0

    def kv(self, forward: _Forward, tokens: Sequence[int], device: Any) -> list[tuple[Any, Any]]:
        """Per layer a [1, heads, len(tokens), dim] K/V pair."""
        key = tuple(tokens)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.reused_tokens += len(key)
            return entry
        entry = self._compute(forward, key, device)
        self._entries[key] = entry
        self._held += len(key)
        self.computed_tokens += len(key)
        while self._held > self.max_tokens and len(self._entries) > 1:
            dropped, _ = self._entries.popitem(last=False)
            self._held -= len(dropped)
        return entry

    @staticmethod
    def _compute(forward: _Forward, tokens: tuple[int, ...], device: Any) -> list[tuple[Any, Any]]:
        import torch

        # Always the same computation for the same tokens (one forward, a cache of exactly their
        # length), whatever the store held before: a chunk's replies never depend on earlier chunks.
        length = len(tokens)
        cache = forward.new_cache(length)
        ids = torch.tensor([list(tokens)], device=device)
        positions = torch.arange(length, device=device).unsqueeze(0)
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril().view(1, 1, length, length)
        with torch.inference_mode():
            forward(cache, 0, ids, positions, mask)
        return [(layer.keys, layer.values) for layer in cache.layers]


def common_prefix_length(rows: Sequence[Sequence[int]], block: int) -> int:
    """Whole blocks of the longest common prefix, leaving each row at least one token of its own."""
    shortest = min(len(r) for r in rows)
    n = 0
    first = rows[0]
    while n < shortest - 1 and all(r[n] == first[n] for r in rows[1:]):
        n += 1
    return (n // block) * block


@dataclass
class RowOutcome:
    tokens: list[int]
    finished: bool  # ended by EOS, by a complete grammar, or accepting at its token limit
    error: str | None


@dataclass
class Prefill:
    """A chunk after its prompt: the cache, each row's first-token logits and where decoding goes on."""

    cache: Any
    logits: Any
    valid: Any  # [rows, capacity] bool: the slots each row attends
    next_position: Any  # [rows] the position of each row's next token
    slot: int  # the cache slot of the next token (the same for every row)


def prefill(forward: _Forward, store: PrefixStore | None, prompts: Sequence[Sequence[int]], new_tokens: int,
            device: Any) -> Prefill:
    """The shared prefix from the store, then every row's own suffix in one forward (module docstring)."""
    import torch

    rows = len(prompts)
    prefix = common_prefix_length(prompts, store.block) if store is not None else 0
    suffixes = [list(p[prefix:]) for p in prompts]
    width = max(len(s) for s in suffixes)
    capacity = prefix + width + new_tokens
    cache = forward.new_cache(capacity)
    if prefix:
        cache.fill_prefix(store.kv(forward, prompts[0][:prefix], device), rows)

    valid = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
    valid[:, :prefix] = True
    ids = torch.zeros(rows, width, dtype=torch.long, device=device)
    positions = torch.full((rows, width), prefix, dtype=torch.long, device=device)
    for r, suffix in enumerate(suffixes):
        gap = width - len(suffix)
        ids[r, gap:] = torch.tensor(suffix, dtype=torch.long)
        positions[r, gap:] = torch.arange(prefix, prefix + len(suffix))
        valid[r, prefix + gap:prefix + width] = True
    slots = torch.arange(prefix + width, device=device)
    causal = slots.view(1, -1) <= slots[prefix:].view(-1, 1)  # [width, prefix + width]
    mask = valid[:, None, None, :prefix + width] & causal[None, None]
    mask |= (slots.view(1, -1) == slots[prefix:].view(-1, 1))[None, None]  # gap queries see themselves
    with torch.inference_mode():
        logits = forward(cache, prefix, ids, positions, mask)
    return Prefill(cache, logits, valid, positions[:, -1] + 1, prefix + width)


def decode_batch(forward: _Forward, store: PrefixStore | None, prompts: Sequence[Sequence[int]],
                 sampler: GuidedSampler, device: Any) -> list[RowOutcome]:
    """Generate for every row (sampler rows 0..n-1) in one batch; outcomes in row order."""
    # Tokens the grammar alone decides (the only one its mask allows, e.g. '{"' and the first key)
    # need no logits: they join the prompt's prefill instead of costing a decoding step each.
    queue = deque(StreamRow(r, list(p) + sampler.forced_start(r)) for r, p in enumerate(prompts))
    outcomes = dict(DecodeStream(forward, store, sampler, len(prompts), device).run(queue))
    return [outcomes[r] for r in range(len(prompts))]


@dataclass
class StreamRow:
    """A request waiting for a batch row: its sampler row and its prompt's tokens."""

    row: int
    tokens: list[int]


class StreamQueue:
    """A :class:`DecodeStream`'s queue, made on demand from a queue of (request, seed) that may grow
    while the stream runs: ``make`` turns one into a :class:`StreamRow` (tokens, sampler row)."""

    def __init__(self, items: deque[tuple[Any, int]], make: Callable[[Any, int], StreamRow]):
        self.items, self.make = items, make
        self.rows: deque[StreamRow] = deque()
        self.requests: dict[int, Any] = {}  # sampler row -> its request

    def _pull(self) -> deque[StreamRow]:
        while self.items:
            request, seed = self.items.popleft()
            row = self.make(request, seed)
            self.requests[row.row] = request
            self.rows.append(row)
        return self.rows

    def __bool__(self) -> bool:
        return bool(self._pull())

    def __iter__(self) -> Iterator[StreamRow]:
        return iter(list(self._pull()))

    def __getitem__(self, index: int) -> StreamRow:
        return self._pull()[index]

    def remove(self, row: StreamRow) -> None:
        self.rows.remove(row)


class DecodeStream:
    """Continuous batching: up to ``max_rows`` rows decode together; a finished row leaves at once and
    queued rows (a retry appended while the stream runs included) join the running batch.

    A *segment* is one cache layout: the shared prefix P (common to the queue when it starts) in
    slots [0, P), then all rows write slot ``s`` together. A row joins at the current ``s``: its
    suffix is prefilled right-aligned in slots [s - L, s) of its own cache row (the slots between P
    and s - L are masked: it attends exactly its own tokens at their own positions). When ``s``
    would pass the capacity, the slots after P are moved down over the gap no row attends any more
    (the same shift for every row: all rows' own tokens end at ``s - 1``). Rows that do not share P,
    or whose suffix is longer than the room before ``s``, wait; when no row is left, a new segment
    starts with the queue as it is then.
    """

    def __init__(self, forward: _Forward, store: PrefixStore | None, sampler: GuidedSampler, max_rows: int,
                 device: Any):
        self.forward, self.store, self.sampler = forward, store, sampler
        self.max_rows, self.device = max(1, max_rows), device

    def run(self, queue: deque[StreamRow] | StreamQueue) -> Iterator[tuple[int, RowOutcome]]:
        """Yield (sampler row, outcome) as rows finish; rows appended to ``queue`` meanwhile are served too."""
        import torch

        with torch.inference_mode():
            while queue:
                yield from self._segment(queue)

    def _segment(self, queue: Any) -> Iterator[tuple[int, RowOutcome]]:
        import torch

        B, sampler, device = self.max_rows, self.sampler, self.device
        prompts = [r.tokens for r in queue]
        P = common_prefix_length(prompts, self.store.block) if self.store is not None else 0
        self.P, self.prefix = P, tuple(prompts[0][:P])
        limit = max(sampler.limits[r.row] for r in queue)
        self.capacity = max(len(t) for t in prompts) + 2 * limit  # P + the longest suffix + room to shift
        self.cache = self.forward.new_cache(self.capacity, B)
        self.valid = torch.zeros(B, self.capacity, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(B, dtype=torch.long, device=device)
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)
        self.start_slot = [0] * B
        self.present: list[int] = []  # the sampler row held in each batch row
        first = self._take(queue, B, room=None)
        self.s = P + max(len(r.tokens) - P for r in first)
        self._admit(first)
        while True:
            yield from self._drop_finished()
            free = B - len(self.present)
            if queue and (not self.present or free >= max(1, B // 4)):
                joining = self._take(queue, free, room=self._make_room(queue, free))
                if joining:
                    self._admit(joining)
                    continue  # a joining row may already be done (a grammar that forces every token)
            if not self.present:
                return
            self._step()

    def _take(self, queue: Any, n: int, room: int | None) -> list[StreamRow]:
        """Up to n queued rows, in queue order, that share the prefix and fit (suffix <= room, limit fits)."""
        taken: list[StreamRow] = []
        for r in list(queue):
            if len(taken) >= n:
                break
            own = len(r.tokens) - self.P
            fits = room is None or (own <= room and self.s + self.sampler.limits[r.row] <= self.capacity)
            if own >= 1 and tuple(r.tokens[:self.P]) == self.prefix and fits:
                taken.append(r)
                queue.remove(r)
        return taken

    def _make_room(self, queue: Any, n: int) -> int:
        """Move the slots down when a joining row's limit would pass the capacity; the suffix room left."""
        limit = max(self.sampler.limits[r.row] for r in queue)
        want = max(len(r.tokens) - self.P for r in list(queue)[:n])
        if not self.present:  # nothing to keep: the joining rows start right after the prefix
            self.s = self.P + want
            self.valid[:] = False
        elif self.s + limit > self.capacity:
            own = self.s - min(self.start_slot[i] for i in range(len(self.present)))
            target = self.P + max(own, want)
            if target < self.s:
                delta = self.s - target
                self.cache.shift_slots(self.P + delta, self.P, target - self.P)
                n_rows = len(self.present)
                self.valid[:n_rows, self.P:target] = self.valid[:n_rows, self.P + delta:self.s].clone()
                self.valid[:, target:] = False
                self.start_slot = [max(self.P, slot - delta) for slot in self.start_slot]
                self.s = target
        return self.s - self.P

    def _admit(self, rows: list[StreamRow]) -> None:
        """Prefill the rows' suffixes to end at slot s - 1 in batch rows [n, n + k); choose their first tokens."""
        import torch

        P, at, device = self.P, self.s, self.device
        lo, k = len(self.present), len(rows)
        if P:
            self.cache.put_prefix(self.store.kv(self.forward, list(self.prefix), device), lo, lo + k)
        suffixes = [r.tokens[P:] for r in rows]
        width = max(len(x) for x in suffixes)
        ids = torch.zeros(k, width, dtype=torch.long, device=device)
        positions = torch.full((k, width), P, dtype=torch.long, device=device)
        self.valid[lo:lo + k] = False
        self.valid[lo:lo + k, :P] = True
        for i, suffix in enumerate(suffixes):
            gap = width - len(suffix)
            ids[i, gap:] = torch.tensor(suffix, dtype=torch.long)
            positions[i, gap:] = torch.arange(P, P + len(suffix))
            self.valid[lo + i, at - len(suffix):at] = True
            self.start_slot[lo + i] = at - len(suffix)
        slots = torch.arange(at, device=device)
        queries = slots[at - width:]
        causal = slots.view(1, -1) <= queries.view(-1, 1)  # [width, at]
        mask = self.valid[lo:lo + k, None, None, :at] & causal[None, None]
        mask |= (slots.view(1, -1) == queries.view(-1, 1))[None, None]  # gap queries see themselves
        self.cache.lo = lo
        try:
            logits = self.forward(self.cache, at - width, ids, positions, mask)
        finally:
            self.cache.lo = 0
        self.next_position[lo:lo + k] = positions[:, -1] + 1
        joined = [r.row for r in rows]
        self.tokens[lo:lo + k] = self.sampler.step(logits, joined)
        self.present += joined

    def _drop_finished(self) -> Iterator[tuple[int, RowOutcome]]:
        """Yield the finished rows; the last batch row takes each one's place (the batch stays [0, n))."""
        i = 0
        while i < len(self.present):
            row = self.present[i]
            if not self.sampler.done[row]:
                i += 1
                continue
            last = len(self.present) - 1
            if i != last:
                self.cache.move_row(last, i, self.s)
                self.valid[i] = self.valid[last]
                self.next_position[i] = self.next_position[last]
                self.tokens[i] = self.tokens[last]
                self.start_slot[i] = self.start_slot[last]
                self.present[i] = self.present[last]
            self.present.pop()
            yield row, self.sampler.outcome(row)

    def _step(self) -> None:
        """Every row's chosen token into slot s; the next tokens."""
        n, s = len(self.present), self.s
        self.valid[:n, s] = True
        logits = self.forward(self.cache, s, self.tokens[:n].view(-1, 1), self.next_position[:n].view(-1, 1),
                              self.valid[:n, None, None, :s + 1])
        self.next_position[:n] += 1
        self.s = s + 1
        self.tokens[:n] = self.sampler.step(logits, self.present)


class GuidedSampler:
    """Per row: llguidance mask, then argmax or seeded top-p; skips rows that have finished."""

    def __init__(self, matchers: list[Any], seeds: list[int], limits: list[int], temperature: float,
                 top_p: float, eos_token_id: int, vocab: int, device: Any):
        self.temperature = temperature
        self.top_p = top_p
        self.eos_token_id = eos_token_id
        self.vocab = vocab
        self.device = device
        self.matchers: list[Any] = []
        self.limits: list[int] = []
        self.tokens: list[list[int]] = []
        self.done: list[bool] = []
        self.finished: list[bool] = []
        self.errors: list[str | None] = []
        # Row r's t-th draw is uniforms[r][t], from its own generator: independent of the other rows.
        self.uniforms: list[Any] = []
        self._bitmask = None
        for matcher, seed, limit in zip(matchers, seeds, limits):
            self.add(matcher, seed, limit)

    def add(self, matcher: Any, seed: int, limit: int) -> int:
        """A new row (a request joining a running stream); its row number."""
        import torch

        self.matchers.append(matcher)
        self.limits.append(limit)
        self.tokens.append([])
        self.done.append(False)
        self.finished.append(False)
        self.errors.append(None)
        if self.temperature > 0.0:
            self.uniforms.append(torch.rand(limit, generator=torch.Generator().manual_seed(seed)).to(self.device))
        return len(self.matchers) - 1

    def forced_start(self, row: int) -> list[int]:
        """Consume and return the row's first tokens while its mask allows exactly one token."""
        import llguidance.torch as lltorch

        forced: list[int] = []
        mask = lltorch.allocate_token_bitmask(1, self.vocab)
        while not self.done[row] and len(self.tokens[row]) < self.limits[row] - 1:
            lltorch.fill_next_token_bitmask(self.matchers[row], mask, 0)
            allowed = unpack_bitmask(mask, self.vocab)[0].nonzero()
            if allowed.numel() != 1 or int(allowed[0]) == self.eos_token_id:
                break
            token = int(allowed[0])
            forced.append(token)
            self._feed(row, token)
        return forced

    def all_done(self) -> bool:
        return all(self.done)

    def outcomes(self) -> list[RowOutcome]:
        return [self.outcome(r) for r in range(len(self.matchers))]

    def outcome(self, row: int) -> RowOutcome:
        return RowOutcome(self.tokens[row], self.finished[row], self.errors[row])

    def step(self, logits: Any, present: Sequence[int]) -> Any:
        """Tokens for the batch rows (``present[i]`` = request row of batch row i; EOS where finished).

        Masks and sampling only for the rows still running; each chosen token is fed to its matcher.
        """
        import llguidance.torch as lltorch
        import torch

        chosen = torch.full((len(present),), self.eos_token_id, dtype=torch.long, device=logits.device)
        active = [i for i, r in enumerate(present) if not self.done[r]]
        if not active:
            return chosen
        if self._bitmask is None or self._bitmask.shape[0] < len(active):
            self._bitmask = lltorch.allocate_token_bitmask(len(present), self.vocab)
        for n, i in enumerate(active):
            lltorch.fill_next_token_bitmask(self.matchers[present[i]], self._bitmask, n)
        index = torch.tensor(active, device=logits.device)
        allowed = unpack_bitmask(self._bitmask[:len(active)], self.vocab).to(logits.device)
        scores = logits.index_select(0, index).float()[:, :self.vocab].masked_fill(~allowed, float("-inf"))
        if self.temperature <= 0.0:
            picked = torch.argmax(scores, dim=-1)
        else:
            draws = torch.stack([self.uniforms[present[i]][len(self.tokens[present[i]])] for i in active])
            picked = self._sample(scores, draws)
        chosen[index] = picked
        for i, token in zip(active, picked.tolist()):
            self._feed(present[i], token)
        return chosen

    def _sample(self, scores: Any, uniforms: Any) -> Any:
        import torch

        probs = torch.softmax(scores / self.temperature, dim=-1)
        if self.top_p >= 1.0:
            values, order = probs, None
        else:
            for k in TOP_K_TRIES:  # a flat row's kept set may pass the top-k: try a wider one, at worst sort
                values, order = probs.topk(k, dim=-1) if k < self.vocab else torch.sort(probs, dim=-1, descending=True)
                if k >= self.vocab or not bool((values.sum(dim=-1) < self.top_p).any()):
                    break
            drop = torch.cumsum(values, dim=-1) - values >= self.top_p  # the top token always stays
            values = values.masked_fill(drop, 0.0)
        cdf = torch.cumsum(values, dim=-1)
        target = (uniforms * cdf[:, -1]).unsqueeze(1)
        pick = torch.searchsorted(cdf, target, right=True).clamp_(max=values.shape[1] - 1)
        return pick.squeeze(1) if order is None else order.gather(1, pick).squeeze(1)

    def _feed(self, row: int, token: int) -> None:
        matcher = self.matchers[row]
        if token == self.eos_token_id:
            self.done[row] = self.finished[row] = True
            return
        self.tokens[row].append(token)
        if not matcher.consume_token(token) or matcher.is_error():
            self.done[row] = True
            self.errors[row] = (matcher.get_error() or "token rejected")[:200]
        elif matcher.is_stopped():  # the grammar is complete: only EOS could follow
            self.done[row] = self.finished[row] = True
        elif len(self.tokens[row]) >= self.limits[row]:
            self.done[row] = True
            self.finished[row] = matcher.is_accepting()


def unpack_bitmask(bitmask: Any, vocab: int) -> Any:
    """llguidance's int32 bitmask (bit i of word w = token 32*w+i) as a bool tensor [batch, vocab]."""
    import torch

    bits = torch.arange(32, dtype=torch.int32)
    return ((bitmask.unsqueeze(-1) >> bits) & 1).bool().reshape(bitmask.shape[0], -1)[:, :vocab]
