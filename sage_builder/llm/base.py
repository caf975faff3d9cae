"""One interface for every LLM backend, and the validate-retry-reject loop they share.

A stage builds :class:`LLMRequest` objects (an item key, chat messages, a pydantic reply schema)
and iterates ``backend.run(requests)``: it yields one :class:`LLMResult` per request as soon as
that request is settled, either with a validated reply or with the reason it was rejected after
``max_attempts`` tries. Replies are never replaced by defaults: a rejected item stays rejected.

A backend implements only ``_complete``: send a batch of (request, seed) and yield each reply's
raw text, or a :class:`TransportFailure` when the transport gave up. JSON-schema constrained
decoding is the backend's job; parsing, validation and refusal checks happen here, for all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from sage_builder.config_base import model_identity
from sage_builder.errors import SageError
from sage_builder.llm.refusal import looks_like_refusal

if TYPE_CHECKING:
    from sage_builder.config import LLMConfig

log = logging.getLogger("sage.llm")

# A check returns None when the reply is acceptable, else a short reason ("refusal", ...).
ReplyCheck = Callable[[BaseModel], "str | None"]


@dataclass(frozen=True)
class LLMRequest:
    key: str
    messages: list[dict[str, str]]
    schema: type[BaseModel]
    check: ReplyCheck | None = None
    max_new_tokens: int | None = None
    # None: llm.temperature. A stage that sets it puts it in the request's key (it changes the reply).
    temperature: float | None = None

    def json_schema(self) -> dict[str, Any]:
        """The reply schema sent to constrained decoders: objects take no keys beyond their properties."""
        return closed_objects(self.schema.model_json_schema())

    @property
    def schema_name(self) -> str:
        return self.schema.__name__

    def to_wire(self) -> WireRequest:
        """What a remote engine needs (plain data): checks and the pydantic class stay with the caller."""
        return WireRequest(self.key, self.messages, self.json_schema(), self.schema_name, self.max_new_tokens,
                           self.temperature)


@dataclass(frozen=True)
class WireRequest:
    """An :class:`LLMRequest` as sent to an engine in another process (a Ray actor): plain data only.

    Backends' ``_complete`` reads just these fields, so it serves either kind of request; replies are
    judged (parsed, validated, checked) by the caller, which holds the original request.
    """

    key: str
    messages: list[dict[str, str]]
    schema_json: dict[str, Any]
    schema_name: str
    max_new_tokens: int | None = None
    temperature: float | None = None

    def json_schema(self) -> dict[str, Any]:
        return self.schema_json


def request_temperature(config: LLMConfig, request: LLMRequest | WireRequest) -> float:
    """The sampling temperature of one request: its own, else ``llm.temperature``."""
    return config.temperature if request.temperature is None else request.temperature


@dataclass
class LLMResult:
    key: str
    value: BaseModel | None
    raw: str | None
    reason: str | None
    attempts: int
    seed: int
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class TransportFailure:
    """The transport gave up on a request (after its own retries): reason like 'http_429', 'timeout'."""

    reason: str
    detail: str = ""


def closed_objects(schema: Any) -> Any:
    """Add ``additionalProperties: false`` to every object schema that does not say otherwise.

    pydantic leaves it out, and a constrained decoder then lets a small model invent key after key
    until it runs out of tokens; OpenAI's strict json_schema mode requires it too.
    """
    if isinstance(schema, dict):
        out = {key: closed_objects(value) for key, value in schema.items()}
        if out.get("type") == "object" and "properties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [closed_objects(value) for value in schema]
    return schema


def reply_settings(config: LLMConfig) -> dict[str, Any]:
    """What decides an LLM's reply besides the prompt: part of item keys (and so of seeds).

    Not attempts, batch size or concurrency. A local model folder counts by its content, so the
    same model in another clone gives the same keys and the same sampled text.
    """
    return {"backend": config.backend, "model": model_identity(config.model), "revision": config.revision,
            "gguf_file": config.gguf_file, "served_model_name": config.served_model_name,
            "temperature": config.temperature, "top_p": config.top_p, "max_new_tokens": config.max_new_tokens,
            "seed": config.seed}


def derive_seed(base: int, key: str, attempt: int) -> int:
    """Per-request sampling seed: reproducible, independent of batch order, new on each retry."""
    digest = hashlib.sha256(f"{base}:{key}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def judge_reply(request: LLMRequest, raw: str | TransportFailure) -> tuple[BaseModel | None, str | None, str]:
    """Parse and validate one raw reply: (value, reason, detail). reason None means accepted."""
    if isinstance(raw, TransportFailure):
        return None, raw.reason, raw.detail
    text = raw.strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        reason = "refusal" if looks_like_refusal(text) else "invalid_json"
        return None, reason, f"{exc.msg} at char {exc.pos}"
    try:
        value = request.schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        return None, "schema", f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
    if request.check is not None:
        reason = request.check(value)
        if reason:
            return None, reason, ""
    return value, None, ""


class LLMBackend(ABC):
    """Turns a list of requests into settled results; subclasses only implement ``_complete``."""

    name: str = "base"

    def __init__(self, config: LLMConfig):
        self.config = config
        # Engine requests sent (retries included) and wall seconds inside run(): `sage plan --measured`.
        self.requests_sent = 0
        self.busy_seconds = 0.0

    def engines(self) -> tuple[int, float]:
        """(engines serving requests in parallel, GPUs each): wall seconds x this = device-seconds."""
        return 1, 0.0

    def usage(self) -> dict[str, Any]:
        engines, gpus = self.engines()
        return {"requests": self.requests_sent, "seconds": round(self.busy_seconds, 3), "engines": engines,
                "gpus_per_engine": gpus}

    def describe(self) -> dict[str, Any]:
        """Model and sampling settings, recorded with every output."""
        c = self.config
        return {"backend": self.name, "model": c.model, "revision": c.revision, "gguf_file": c.gguf_file,
                "temperature": c.temperature, "top_p": c.top_p, "max_new_tokens": c.max_new_tokens,
                "seed": c.seed, "max_attempts": c.max_attempts}

    def check_ready(self) -> None:
        """Raise SageError with a one-line message if the backend cannot serve (missing model, no server)."""

    @classmethod
    def plan_chunks(cls, config: LLMConfig, batch: Sequence[tuple[Any, int]]) -> list[list[tuple[Any, int]]]:
        """How ``_complete`` cuts a batch into engine calls. Outputs may depend on which requests share
        a call, so an executor that spreads calls over engines (Ray) cuts them the same way."""
        return [list(batch)] if batch else []

    @abstractmethod
    def _complete(self, batch: Sequence[tuple[LLMRequest, int]]) -> Iterator[tuple[str, str | TransportFailure]]:
        """Send every (request, seed); yield (request key, raw reply text or TransportFailure) as each ends."""

    def run(self, requests: Iterable[LLMRequest], progress: Callable[[LLMResult], None] | None = None
            ) -> Iterator[LLMResult]:
        pending: dict[str, LLMRequest] = {}
        for request in requests:
            if request.key in pending:
                raise SageError(f"two LLM requests share the item key {request.key}; keys must be unique")
            pending[request.key] = request
        errors: dict[str, list[str]] = {key: [] for key in pending}
        if self.streams_retries():
            yield from self._run_streams(pending, errors, progress)
            return
        for attempt in range(1, self.config.max_attempts + 1):
            if not pending:
                break
            batch = [(req, derive_seed(self.config.seed, key, attempt)) for key, req in pending.items()]
            seeds = {req.key: seed for req, seed in batch}
            self.requests_sent += len(batch)
            for key, raw in self._timed(self._complete(batch)):
                request = pending.get(key)
                if request is None:
                    continue
                result = self._settle(request, raw, attempt, seeds[key], errors)
                if result is None:
                    continue
                del pending[key]
                if progress is not None:
                    progress(result)
                yield result
        for key in list(pending):
            # A backend that dropped a request must not make it vanish silently.
            result = LLMResult(key, None, None, "no_reply", self.config.max_attempts, -1, errors.pop(key, []))
            yield result

    def _timed(self, replies: Iterator[tuple[str, str | TransportFailure]]
               ) -> Iterator[tuple[str, str | TransportFailure]]:
        """The engine's replies, its wall seconds (not the caller's) added to ``busy_seconds``."""
        started = time.monotonic()
        for reply in replies:
            self.busy_seconds += time.monotonic() - started
            yield reply
            started = time.monotonic()

    def _settle(self, request: LLMRequest, raw: str | TransportFailure, attempt: int, seed: int,
                errors: dict[str, list[str]]) -> LLMResult | None:
        """One attempt's result; None when it failed with attempts left (its error is recorded)."""
        value, reason, detail = judge_reply(request, raw)
        if reason is not None:
            errors[request.key].append(f"attempt {attempt}: {reason}" + (f" ({detail})" if detail else ""))
            if attempt < self.config.max_attempts:
                return None
        return LLMResult(request.key, value, raw if isinstance(raw, str) else None, reason, attempt, seed,
                         errors.pop(request.key))

    def streams_retries(self) -> bool:
        """True when ``_stream`` serves a queue that grows while it runs (continuous batching)."""
        return False

    def _stream(self, queue: deque[tuple[LLMRequest, int]]) -> Iterator[tuple[str, str | TransportFailure]]:
        """Serve (request, seed) items from ``queue`` until it is empty, yielding (key, raw) as each ends;
        items appended to ``queue`` meanwhile (retries) are served in the same run."""
        raise NotImplementedError

    def _run_streams(self, pending: dict[str, LLMRequest], errors: dict[str, list[str]],
                     progress: Callable[[LLMResult], None] | None) -> Iterator[LLMResult]:
        """``run`` for a streaming engine: a failed attempt's retry (its next seed) joins the running
        stream at once instead of waiting for the whole attempt to end. Same seeds, same judging."""
        attempts = {key: 1 for key in pending}
        seeds = {key: derive_seed(self.config.seed, key, 1) for key in pending}
        for group in self.plan_streams(self.config, [(req, seeds[key]) for key, req in pending.items()]):
            queue = deque(group)
            self.requests_sent += len(group)
            for key, raw in self._timed(self._stream(queue)):
                request = pending.get(key)
                if request is None:
                    continue
                result = self._settle(request, raw, attempts[key], seeds[key], errors)
                if result is None:  # failed, attempts left: the retry joins this stream
                    attempts[key] += 1
                    seeds[key] = derive_seed(self.config.seed, key, attempts[key])
                    queue.append((request, seeds[key]))
                    self.requests_sent += 1
                    continue
                del pending[key]
                if progress is not None:
                    progress(result)
                yield result
        for key in list(pending):
            yield LLMResult(key, None, None, "no_reply", attempts[key], -1, errors.pop(key, []))

    @classmethod
    def plan_streams(cls, config: LLMConfig, batch: Sequence[tuple[Any, int]]) -> list[list[tuple[Any, int]]]:
        """The streams ``_run_streams`` runs one after another (default: one)."""
        return [list(batch)] if batch else []

    def close(self) -> None:
        """Release engines, threads and memory."""

    def __enter__(self) -> LLMBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
