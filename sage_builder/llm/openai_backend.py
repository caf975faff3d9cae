"""Any OpenAI-compatible chat endpoint (OpenAI itself, a vLLM server, ...), with bounded concurrency.

A batch is served by ``llm.concurrency`` asyncio workers that pull the next request as soon as
they finish one, so the window stays full and replies come back in completion order. The event
loop lives in a background thread; ``_complete`` hands replies over through a queue, so callers
keep a plain synchronous iterator.

Transport faults (HTTP 429, 5xx, timeouts, dropped connections, unparsable bodies) are retried
with exponential backoff by tenacity (a ``Retry-After`` header is honoured); what still fails
becomes a ``TransportFailure`` such as ``http_429`` or ``timeout`` and goes through the shared
retry/reject loop of ``LLMBackend.run``. Replies are constrained with ``response_format`` of type
``json_schema`` and, for vLLM servers, also with ``structured_outputs`` (vLLM's current field;
the old ``guided_json`` is silently ignored by current servers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import openai
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from sage_builder.errors import SageError
from sage_builder.llm.base import (
    LLMBackend,
    LLMRequest,
    TransportFailure,
    request_temperature,
)
from sage_builder.runtime import retry_after_seconds

log = logging.getLogger("sage.llm.openai")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_WAIT_S = 60.0
RETRYABLE_STATUS = {408, 409, 425, 429}


class _BadResponse(Exception):
    """The server answered 200 with a body that is not a chat completion."""


def failure_reason(exc: BaseException) -> str:
    """A short, stable reason for the rejects table."""
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, (_BadResponse, json.JSONDecodeError, openai.APIResponseValidationError)):
        return "bad_response"
    return type(exc).__name__


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return isinstance(exc, (openai.APIConnectionError, _BadResponse, json.JSONDecodeError,
                            openai.APIResponseValidationError))


def is_openai_host(base_url: str) -> bool:
    return (urlparse(base_url).hostname or "").endswith("openai.com")


class OpenAIBackend(LLMBackend):
    name = "openai"

    def __init__(self, config):  # type: ignore[no-untyped-def]
        super().__init__(config)
        self.base_url = (config.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.model_name = config.served_model_name or config.model
        # OpenAI rejects unknown request fields; vLLM and most compatible servers accept them.
        self.send_structured_outputs = not is_openai_host(self.base_url)
        self.stats: Counter[str] = Counter()
        self._schemas: dict[type, dict[str, Any]] = {}
        self._api_key = os.environ.get(config.api_key_env) or "EMPTY"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: openai.AsyncOpenAI | None = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "served_model_name": self.model_name}

    def check_ready(self) -> None:
        client = openai.OpenAI(base_url=self.base_url, api_key=self._api_key, max_retries=0,
                               timeout=min(10.0, self.config.request_timeout_s))
        try:
            models = [m.id for m in client.models.list().data]
        except (openai.APIConnectionError, openai.APITimeoutError):
            raise SageError(f"llm.base_url: no OpenAI-compatible server answers at {self.base_url} "
                            "(start it, or fix llm.base_url)") from None
        except openai.AuthenticationError:
            raise SageError(f"llm.api_key_env: {self.base_url} refused the API key; put a valid key in "
                            f"${self.config.api_key_env}") from None
        except openai.APIStatusError as exc:
            log.warning("%s/models answered HTTP %s; going on without checking the model name",
                        self.base_url, exc.status_code)
            return
        finally:
            client.close()
        if models and self.model_name not in models and not is_openai_host(self.base_url):
            key = "llm.served_model_name" if self.config.served_model_name else "llm.model"
            raise SageError(f"{key}: {self.base_url} serves {', '.join(models[:5])}, not '{self.model_name}' "
                            "(set llm.served_model_name to the served name)")

    def request_body(self, request: LLMRequest, seed: int) -> dict[str, Any]:
        """The keyword arguments of ``chat.completions.create`` for one request."""
        c = self.config
        schema = self._schemas.get(request.schema)
        if schema is None:
            schema = self._schemas[request.schema] = request.json_schema()
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": request.messages,
            "temperature": request_temperature(c, request),
            "top_p": c.top_p,
            "seed": seed,
            "max_tokens": request.max_new_tokens or c.max_new_tokens,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": request.schema.__name__, "schema": schema, "strict": True}},
        }
        if self.send_structured_outputs:
            body["extra_body"] = {"structured_outputs": {"json": schema}}
        return body

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="sage-openai-loop", daemon=True)
            self._thread.start()
        return self._loop

    def _complete(self, batch: Sequence[tuple[LLMRequest, int]]) -> Iterator[tuple[str, str | TransportFailure]]:
        if not batch:
            return
        replies: queue.Queue[tuple[str, str | TransportFailure]] = queue.Queue()
        future = asyncio.run_coroutine_threadsafe(self._serve(batch, replies), self._ensure_loop())
        delivered = 0
        try:
            while delivered < len(batch):
                try:
                    item = replies.get(timeout=0.2)
                except queue.Empty:
                    if future.done() and replies.empty():
                        future.result()  # re-raise a crash of the workers here
                        break
                    continue
                delivered += 1
                yield item
        finally:
            future.cancel()  # the caller stopped early: stop sending

    async def _serve(self, batch: Sequence[tuple[LLMRequest, int]],
                     replies: queue.Queue[tuple[str, str | TransportFailure]]) -> None:
        if self._client is None:
            self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, max_retries=0,
                                              timeout=self.config.request_timeout_s)
        work = iter(batch)

        async def worker() -> None:
            for request, seed in work:  # a shared iterator: each worker takes the next request when free
                replies.put((request.key, await self._one(request, seed)))

        await asyncio.gather(*(worker() for _ in range(min(self.config.concurrency, len(batch)))))

    def _wait(self, retry_state: Any) -> float:
        backoff = min(MAX_WAIT_S, self.config.retry_backoff_s * 2 ** (retry_state.attempt_number - 1))
        after = retry_after_seconds(retry_state.outcome.exception() if retry_state.outcome else None)
        return backoff if after is None else min(MAX_WAIT_S, max(backoff, after))

    def _before_sleep(self, retry_state: Any) -> None:
        exc = retry_state.outcome.exception()
        self.stats["transport_retries"] += 1
        self.stats[f"retry_{failure_reason(exc)}"] += 1
        log.debug("retrying after %s (attempt %d)", failure_reason(exc), retry_state.attempt_number)

    async def _one(self, request: LLMRequest, seed: int) -> str | TransportFailure:
        assert self._client is not None
        body = self.request_body(request, seed)
        self.stats["requests"] += 1
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(self.config.max_retries + 1),
                                               wait=self._wait, retry=retry_if_exception(_retryable),
                                               before_sleep=self._before_sleep, reraise=True):
                with attempt:
                    self.stats["http_calls"] += 1
                    completion = await self._client.chat.completions.create(**body)
                    if not getattr(completion, "choices", None):
                        raise _BadResponse("no choices in the reply")
        except Exception as exc:  # noqa: BLE001 - every transport fault becomes a reason, none escapes
            reason = failure_reason(exc)
            self.stats[f"failed_{reason}"] += 1
            return TransportFailure(reason, str(exc).splitlines()[0][:200] if str(exc) else "")
        choice = completion.choices[0]
        message = choice.message
        if getattr(message, "refusal", None):
            return TransportFailure("refusal", message.refusal[:200])
        content = message.content
        if content is None:
            return TransportFailure("empty_reply", f"finish_reason={choice.finish_reason}")
        if choice.finish_reason == "length":
            try:
                json.loads(content)
            except json.JSONDecodeError:
                return TransportFailure("truncated", f"max_tokens={body['max_tokens']} reached")
        return content

    def close(self) -> None:
        if self._loop is None:
            return
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(timeout=10)
            self._client = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = None
