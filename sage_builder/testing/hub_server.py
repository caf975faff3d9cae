"""A local stand-in for the Hugging Face Hub, for tests of ``sage publish``.

It speaks just enough of the Hub's HTTP API for what ``huggingface_hub.HfApi`` sends when we
create a dataset repo, pre-upload LFS files, commit, list the tree and change settings:

- ``POST /api/repos/create`` (409 if the repo exists), ``GET /api/datasets/ORG/NAME[/revision/REV]``,
  ``PUT /api/datasets/ORG/NAME/settings``, ``POST /api/validate-yaml``;
- ``POST /api/datasets/ORG/NAME/preupload/REV``: ``*.parquet`` and binary samples are LFS,
  small text is regular, and the current remote oid is returned (what the Hub does);
- the LFS batch API ``POST /datasets/ORG/NAME.git/info/lfs/objects/batch`` (objects the server
  already holds come back without ``actions``, so a client does not send them again), the
  upload ``PUT /_lfs/OID`` (the sha256 of the body is checked) and ``POST /_lfs/verify``;
- ``POST /api/datasets/ORG/NAME/commit/REV``: the NDJSON payload, applied atomically (every LFS
  object must be uploaded; ``parentCommit`` must be the head, else 412);
- ``GET /api/datasets/ORG/NAME/tree/REV[/PATH]`` with ``lfs`` info, ``POST .../branch/BRANCH``.

Every request needs ``Authorization: Bearer <token>`` (else 401). Tests inject faults with
:meth:`HubServer.fail` (a status for the next N requests matching a method and path pattern)
and read what was asked in ``server.requests``::

    with HubServer(token="hf_test") as hub:
        hub.fail("POST", r"/commit/", status=500)      # the next commit fails once
        ...
        assert hub.count("PUT", r"^/_lfs/") == 3        # LFS objects actually sent
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer", "Fault", "RemoteFile", "git_blob_sha1", "lfs_pointer"]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class RemoteFile:
    """One file of a commit's tree: regular (``content``) or LFS (``lfs_sha256``, ``size``)."""

    size: int
    content: bytes | None = None
    lfs_sha256: str | None = None

    def tree_entry(self, path: str) -> dict[str, Any]:
        if self.lfs_sha256 is None:
            return {"type": "file", "path": path, "size": self.size, "oid": git_blob_sha1(self.content or b"")}
        pointer = lfs_pointer(self.lfs_sha256, self.size)
        return {"type": "file", "path": path, "size": self.size, "oid": git_blob_sha1(pointer),
                "lfs": {"oid": self.lfs_sha256, "size": self.size, "pointerSize": len(pointer)}}

    def oid(self) -> str:
        # What the preupload endpoint reports: sha256 for LFS, git sha1 for regular files.
        return self.lfs_sha256 if self.lfs_sha256 is not None else git_blob_sha1(self.content or b"")


@dataclass
class Repo:
    repo_id: str
    private: bool
    gated: str | bool = False
    commits: dict[str, dict[str, RemoteFile]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class Fault:
    method: str
    pattern: str
    status: int
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    after: int = 0  # let this many matching requests through first


@dataclass
class Request:
    method: str
    path: str
    status: int
    body: bytes
    headers: dict[str, str]  # names lowercased

    def json(self) -> Any:
        return json.loads(self.body)


class HubServer:
    """Threaded HTTP server on 127.0.0.1; use as a context manager. ``endpoint`` is its base URL."""

    def __init__(self, token: str = "hf_test_token", lfs_threshold_bytes: int = 10 * 1024 * 1024):
        self.token = token
        self.lfs_threshold_bytes = lfs_threshold_bytes
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.before_commit: list[Callable[[str], None]] = []  # called with the repo id before a commit applies
        self.after_commit: list[Callable[[str], None]] = []  # called with the repo id after each commit
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def endpoint(self) -> str:
        assert self._httpd is not None, "start the server with `with HubServer() as hub:`"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- test controls -------------------------------------------------------------------------
    def fail(self, method: str, pattern: str, status: int, times: int = 1, after: int = 0,
             headers: dict[str, str] | None = None) -> None:
        """Answer ``status`` to the next ``times`` requests whose path matches ``pattern`` (regex)."""
        with self._lock:
            self.faults.append(Fault(method.upper(), pattern, status, times, dict(headers or {}), after))

    def count(self, method: str, pattern: str, status: int | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.method == method.upper() and re.search(pattern, r.path)
                       and (status is None or r.status == status))

    def matching(self, method: str, pattern: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == method.upper() and re.search(pattern, r.path)]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, RemoteFile]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision) or ""]

    def tamper(self, repo_id: str, path: str, *, content: bytes | None = None, delete: bool = False,
               revision: str = "main") -> None:
        """Change the head tree behind the client's back (a corrupted or lost file on the Hub)."""
        with self._lock:
            tree = self.files(repo_id, revision)
            if delete:
                del tree[path]
                return
            assert content is not None
            old = tree[path]
            if old.lfs_sha256 is None:
                tree[path] = RemoteFile(size=len(content), content=content)
            else:
                sha = hashlib.sha256(content).hexdigest()
                self.lfs_objects[sha] = content
                tree[path] = RemoteFile(size=len(content), lfs_sha256=sha)

    # -- state changes (called by the handler under the lock) ----------------------------------
    def push_elsewhere(self, repo_id: str, path: str, content: bytes, branch: str = "main") -> str:
        """A commit by someone else (another client) adding one regular file; returns its sha."""
        with self._lock:
            repo = self.repos[repo_id]
            tree = dict(repo.commits[repo.branches[branch]])
            tree[path] = RemoteFile(len(content), content=content)
            return self._new_commit(repo, branch, tree)

    def _new_commit(self, repo: Repo, branch: str, tree: dict[str, RemoteFile]) -> str:
        sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo.commits[sha] = tree
        repo.branches[branch] = sha
        return sha

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.method == method and re.search(fault.pattern, path) and fault.times > 0:
                if fault.after > 0:
                    fault.after -= 1
                    return None
                fault.times -= 1
                return fault
        return None


_REPO = r"/api/datasets/(?P<org>[^/]+)/(?P<name>[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
        body = b"" if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        self._status = status

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        headers = dict(headers or {})
        if status == 404:
            headers.setdefault("X-Error-Code", "RepoNotFound")
        self._send(status, {"error": message}, headers)

    def _handle(self, method: str) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        body = self._body()
        self._status = 0
        with hub._lock:
            fault = hub._take_fault(method, path)
        try:
            if fault is not None:
                self._error(fault.status, f"injected fault {fault.status}", fault.headers)
            elif self.headers.get("Authorization") != f"Bearer {hub.token}" and not (
                    method == "PUT" and path.startswith("/_lfs/")):  # upload URLs are pre-signed, as on S3
                self._error(401, "Invalid credentials in Authorization header")
            else:
                with hub._lock:
                    self._route(method, path, query, body)
        finally:
            with hub._lock:
                hub.requests.append(Request(method, path, self._status, body,
                                            {k.lower(): v for k, v in self.headers.items()}))

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    # -- the API -------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        hub = self.hub
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if method == "PUT" and path.startswith("/_lfs/"):
            return self._lfs_put(path.rsplit("/", 1)[1], body)
        if method == "POST" and path == "/_lfs/verify":
            return self._send(200 if json.loads(body)["oid"] in hub.lfs_objects else 404, {})
        m = re.fullmatch(r"/datasets/(?P<org>[^/]+)/(?P<name>[^/]+)\.git/info/lfs/objects/batch", path)
        if m and method == "POST":
            return self._lfs_batch(json.loads(body))
        m = re.fullmatch(_REPO + r"(?P<rest>/.*)?", path)
        if not m:
            return self._error(404, f"no route for {method} {path}")
        repo = hub.repos.get(f"{m['org']}/{m['name']}")
        if repo is None:
            return self._error(404, "Repository not found")
        rest = m["rest"] or ""
        if method == "GET" and (rest == "" or rest.startswith("/revision/")):
            return self._info(repo, rest.removeprefix("/revision/") or "main")
        if method == "PUT" and rest == "/settings":
            settings = json.loads(body)
            if "gated" in settings:
                repo.gated = settings["gated"]
            if "visibility" in settings:
                repo.private = settings["visibility"] != "public"
            return self._send(200, {})
        if method == "POST" and rest.startswith("/preupload/"):
            return self._preupload(repo, rest.removeprefix("/preupload/"), json.loads(body))
        if method == "POST" and rest.startswith("/commit/"):
            return self._commit(repo, rest.removeprefix("/commit/"), body)
        if method == "POST" and rest.startswith("/branch/"):
            branch = rest.removeprefix("/branch/")
            if branch in repo.branches:
                return self._error(409, "Reference already exists")
            repo.branches[branch] = repo.branches["main"]
            return self._send(200, {})
        if method == "GET" and rest.startswith("/tree/"):
            revision, _, sub = rest.removeprefix("/tree/").partition("/")
            return self._tree(repo, revision, sub, query.get("recursive", ["False"])[0].lower() == "true")
        return self._error(404, f"no route for {method} {path}")

    def _create_repo(self, payload: dict[str, Any]) -> None:
        hub = self.hub
        repo_id = f"{payload['organization']}/{payload['name']}"
        if payload.get("type") != "dataset":
            return self._error(400, "this test server only hosts datasets")
        if repo_id in hub.repos:  # the Hub's 409 carries the url, and huggingface_hub reads it
            return self._send(409, {"error": "You already created this dataset repo",
                                    "url": f"{hub.endpoint}/datasets/{repo_id}"})
        repo = Repo(repo_id, private=payload.get("visibility", "public") != "public")
        gitattributes = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"
        hub._new_commit(repo, "main", {".gitattributes": RemoteFile(len(gitattributes), gitattributes)})
        hub.repos[repo_id] = repo
        self._send(200, {"url": f"{hub.endpoint}/datasets/{repo_id}", "name": repo_id})

    def _info(self, repo: Repo, revision: str) -> None:
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, f"Invalid rev id: {revision}", {"X-Error-Code": "RevisionNotFound"})
        siblings = [{"rfilename": p} for p in sorted(repo.commits[sha])]
        self._send(200, {"id": repo.repo_id, "sha": sha, "private": repo.private, "gated": repo.gated,
                         "siblings": siblings, "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z")})

    def _preupload(self, repo: Repo, revision: str, payload: dict[str, Any]) -> None:
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, f"Invalid rev id: {revision}", {"X-Error-Code": "RevisionNotFound"})
        tree = repo.commits[sha]
        files = []
        for item in payload["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = (item["path"].endswith(".parquet") or b"\0" in sample
                   or item["size"] > self.hub.lfs_threshold_bytes)
            remote = tree.get(item["path"])
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": remote.oid() if remote else None})
        self._send(200, {"files": files, "commitOid": sha})

    def _lfs_batch(self, payload: dict[str, Any]) -> None:
        hub = self.hub
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in hub.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{hub.endpoint}/_lfs/{obj['oid']}"},
                                    "verify": {"href": f"{hub.endpoint}/_lfs/verify"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, f"sha256 of the body does not match {oid}")
        self.hub.lfs_objects[oid] = body
        self._send(200, {})

    def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
        hub = self.hub
        head = repo.resolve(revision)
        if head is None or revision not in repo.branches:
            return self._error(404, f"Invalid rev id: {revision}", {"X-Error-Code": "RevisionNotFound"})
        for hook in hub.before_commit:
            hook(repo.repo_id)
        head = repo.resolve(revision)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]
        if header["key"] != "header":
            return self._error(400, "the first NDJSON line must be the header")
        parent = header["value"].get("parentCommit")
        if parent is not None and parent != head:
            return self._error(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo.commits[head])
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                content = base64.b64decode(value["content"])
                tree[value["path"]] = RemoteFile(len(content), content=content)
            elif key == "lfsFile":
                if value["oid"] not in hub.lfs_objects:
                    return self._error(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                tree[value["path"]] = RemoteFile(value["size"], lfs_sha256=value["oid"])
            elif key == "deletedFile":
                if value["path"] not in tree:
                    return self._error(404, f"A file with this name doesn't exist: {value['path']}",
                                       {"X-Error-Code": "EntryNotFound"})
                del tree[value["path"]]
            else:
                return self._error(400, f"unsupported commit operation {key}")
        sha = hub._new_commit(repo, revision, tree)
        for hook in hub.after_commit:
            hook(repo.repo_id)
        self._send(200, {"commitUrl": f"{hub.endpoint}/datasets/{repo.repo_id}/commit/{sha}",
                         "commitOid": sha, "pullRequestUrl": None, "success": True})

    def _tree(self, repo: Repo, revision: str, sub: str, recursive: bool) -> None:
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, f"Invalid rev id: {revision}", {"X-Error-Code": "RevisionNotFound"})
        prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, remote in sorted(repo.commits[sha].items()):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):].split("/")
            for depth in range(1, len(rel)):
                folder = prefix + "/".join(rel[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder, "oid": "0" * 40, "size": 0})
                if not recursive:
                    break
            if recursive or len(rel) == 1:
                entries[path] = remote.tree_entry(path)
        self._send(200, sorted(entries.values(), key=lambda e: e["path"]))


@contextlib.contextmanager
def local_hub(monkeypatch: Any, token: str) -> Iterator[HubServer]:
    """A HubServer that huggingface_hub talks to: online, LFS (not Xet), HF_ENDPOINT and HF_TOKEN set.

    ``monkeypatch`` is pytest's: huggingface_hub reads offline mode and Xet once at import, so the
    two library constants are set directly; nothing of sage-builder is patched.
    """
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(token=token) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_TOKEN", token)
        yield server
