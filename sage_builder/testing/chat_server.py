"""A local OpenAI-compatible chat-completions server for tests and benchmarks.

It speaks just enough of the protocol for the ``openai`` client: ``POST /v1/chat/completions``
and ``GET /v1/models``. What each call answers is decided by a *script*, a function
``(request_json, call_number) -> behaviour`` (``call_number`` counts chat calls from 1), where a
behaviour is a reply text (``str``) or one of the classes below: an HTTP error status, a delay,
a refusal in the ``message.refusal`` field, a broken HTTP body, or a dropped connection.
Without a script the server answers every request with a minimal object that satisfies the
request's JSON schema (``response_format``), optionally after a fixed latency: a stand-in for a
fast, obedient model in throughput benchmarks.

Every request body is recorded in ``server.requests`` so that tests can assert what was sent::

    with ChatServer(script=lambda req, n: Status(429, retry_after=0) if n == 1 else '{"a": 1}') as srv:
        client = OpenAI(base_url=srv.base_url, api_key="x")
        ...
        assert srv.requests[0]["seed"] == 7
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Union

__all__ = [
    "ChatServer", "Status", "Delay", "Refusal", "BrokenBody", "Drop", "Behaviour", "Script",
    "schema_example", "REFUSAL_TEXT",
]

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."


@dataclass(frozen=True)
class Status:
    """Answer with an HTTP error status (429, 500, 503...), optionally with a Retry-After header."""

    code: int
    retry_after: float | None = None
    message: str = "scripted error"


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds`` (longer than the client's timeout makes a timeout), then behave as ``then``."""

    seconds: float
    then: Behaviour | None = None


@dataclass(frozen=True)
class Refusal:
    """A structured-outputs refusal: ``message.content`` is null and ``message.refusal`` holds the text."""

    text: str = REFUSAL_TEXT


@dataclass(frozen=True)
class BrokenBody:
    """HTTP 200 whose body is not JSON at all (a proxy or server fault, not a model reply)."""

    body: str = "<html>502 Bad Gateway</html>"


@dataclass(frozen=True)
class Drop:
    """Close the connection without answering."""


Behaviour = Union[str, Status, Delay, Refusal, BrokenBody, Drop, None]
Script = Callable[[dict[str, Any], int], Behaviour]


def schema_example(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> Any:
    """A small value that satisfies ``schema`` (the subset pydantic emits: refs, enums, bounds)."""
    defs = defs if defs is not None else schema.get("$defs", schema.get("definitions", {}))
    if "$ref" in schema:
        return schema_example(defs[schema["$ref"].split("/")[-1]], defs)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return schema_example(options[0], defs)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: schema_example(props[name], defs) for name in props if name in schema.get("required", props)}
    if kind == "array":
        items = schema.get("items", {})
        count = schema.get("minItems", 0)
        if count and items.get("enum"):
            return list(items["enum"][:count])
        return [schema_example(items, defs) for _ in range(count)]
    if kind == "string":
        return "x" * max(schema.get("minLength", 1), 1)
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
        return int(low) if kind == "integer" else float(low)
    if kind == "boolean":
        return False
    return None


def _schema_of(request: dict[str, Any]) -> dict[str, Any] | None:
    fmt = request.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema")
    structured = request.get("structured_outputs") or {}
    return structured.get("json")


class ChatServer:
    """Start with ``with ChatServer(...) as srv`` (or ``start()``/``stop()``); point clients at ``srv.base_url``.

    ``model``: the name ``GET /v1/models`` lists (None: an empty list, so any name is accepted).
    ``max_in_flight`` records the most chat calls that were open at once (for concurrency bounds).
    """

    def __init__(self, script: Script | None = None, latency_s: float = 0.0, model: str | None = None):
        self.script = script
        self.latency_s = latency_s
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._calls = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the server is not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def calls(self) -> int:
        return self._calls

    def start(self) -> ChatServer:
        server = self

        class Handler(_Handler):
            owner = server

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024  # the stdlib's 5 resets connections under a wide client window

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # do not wait for handlers still sleeping in a Delay
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="chat-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _begin(self, request: dict[str, Any]) -> int:
        with self._lock:
            self._calls += 1
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self._calls

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def default_reply(self, request: dict[str, Any]) -> str:
        schema = _schema_of(request)
        return json.dumps(schema_example(schema) if schema else {"reply": "ok"})


class _Handler(BaseHTTPRequestHandler):
    owner: ChatServer
    protocol_version = "HTTP/1.1"  # keep-alive, like a real server; every reply sets Content-Length

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without this, Nagle + delayed ACK add ~40 ms per call.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass

    def _send(self, code: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            # With no model name the list is empty: clients then skip their served-model check.
            models = [] if self.owner.model is None else [self.owner.model]
            self._send(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "sage-test"} for name in models]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        try:
            request = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._send(400, {"error": {"message": "request body is not JSON", "type": "invalid_request_error"}})
            return
        owner = self.owner
        call = owner._begin(request)
        try:
            if owner.script is None:
                owner._sleep(owner.latency_s)
                behaviour: Behaviour = owner.default_reply(request)
            else:
                behaviour = owner.script(request, call)
            self._behave(request, behaviour)
        finally:
            owner._end()

    def _behave(self, request: dict[str, Any], behaviour: Behaviour) -> None:
        owner = self.owner
        while isinstance(behaviour, Delay):
            owner._sleep(behaviour.seconds)
            if owner._stopping.is_set():
                self.close_connection = True
                return
            behaviour = behaviour.then
        if behaviour is None:
            behaviour = owner.default_reply(request)
        if isinstance(behaviour, Drop):
            self.close_connection = True
            return
        if isinstance(behaviour, Status):
            headers = {} if behaviour.retry_after is None else {"Retry-After": f"{behaviour.retry_after:g}"}
            self._send(behaviour.code, {"error": {"message": behaviour.message, "type": "scripted",
                                                  "code": behaviour.code}}, headers)
            return
        if isinstance(behaviour, BrokenBody):
            self._send(200, behaviour.body)
            return
        content, refusal = (None, behaviour.text) if isinstance(behaviour, Refusal) else (behaviour, None)
        completion_tokens = len((content or refusal or "").split())
        self._send(200, {
            "id": f"chatcmpl-{owner.calls}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", owner.model or "test-model"),
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content, "refusal": refusal}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": completion_tokens,
                      "total_tokens": 1 + completion_tokens},
        })
