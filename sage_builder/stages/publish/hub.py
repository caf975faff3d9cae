"""Pushing a local dataset directory to a Hub dataset repo: plan, upload, one commit, verify.

The order is what makes a push safe to interrupt and to repeat:

1. ``create_repo(private=True by default, exist_ok=True)``, then the repo's head commit and tree;
2. a plan per file: ``add`` / ``update`` / ``unchanged`` (same sha256 already there) / ``delete``
   (a file of an earlier version, under the paths we manage, that the dataset no longer has);
3. ``preupload_lfs_files`` sends the content of every added file first; the Hub answers the LFS
   batch request without upload actions for objects it already holds, so a rerun after an
   interruption sends only what is missing;
4. ONE ``create_commit`` (with ``parent_commit`` = the head we planned against) applies every
   addition and deletion at once: readers see the old version or the new one, never a mix;
5. the remote tree is listed again and every file's size and sha256 is compared with the label
   manifest.

The token comes from ``HF_TOKEN`` or the standard login (``huggingface_hub.get_token``) and is
only ever handed to ``HfApi``; nothing here logs or writes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sage_builder.errors import SageError, StageInputError
from sage_builder.runtime import retry_after_seconds
from sage_builder.stages.publish.config import repo_id_problem

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from sage_builder.store import Manifest

log = logging.getLogger("sage.publish")

REPO_TYPE = "dataset"
# Remote paths a publish owns: stale files under them are deleted; anything else is left alone.
MANAGED_PREFIXES = ("data/", "manifests/")
MANAGED_FILES = ("README.md",)
T = TypeVar("T")


class PublishError(SageError):
    """The Hub refused or interrupted a push (nothing was committed)."""


class VerificationError(SageError):
    """The remote repo does not match the label manifest after the push."""

    exit_code = 3


def is_managed(path: str) -> bool:
    return path in MANAGED_FILES or path.startswith(MANAGED_PREFIXES)


def check_repo_id(value: str, source: str = "--repo-id") -> str:
    problem = repo_id_problem(value)
    if problem is not None:
        raise SageError(f"{source} '{value}': {problem}")
    return value


def git_blob_sha1(path: Path) -> str:
    """The git object id of a regular (non-LFS) file, which is what the Hub lists for it."""
    from huggingface_hub.utils.sha import git_hash

    return git_hash(path.read_bytes())


@dataclass
class LocalFile:
    path_in_repo: str
    local_path: Path
    sha256: str
    size: int


@dataclass
class RemoteFile:
    path: str
    size: int
    blob_id: str
    lfs_sha256: str | None = None

    def same_as(self, local: LocalFile) -> bool:
        if self.size != local.size:
            return False
        if self.lfs_sha256 is not None:
            return self.lfs_sha256 == local.sha256
        return self.blob_id == git_blob_sha1(local.local_path)


@dataclass
class PlannedOp:
    action: str  # add | update | unchanged | delete | keep
    path: str
    bytes: int = 0


@dataclass
class PublishPlan:
    repo_id: str | None
    revision: str
    remote_consulted: bool
    parent_commit: str | None = None
    operations: list[PlannedOp] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(1 for op in self.operations if op.action == action)

    @property
    def bytes_to_send(self) -> int:
        """Upper bound: LFS objects the Hub already holds (an interrupted push) are not resent."""
        return sum(op.bytes for op in self.operations if op.action in ("add", "update"))

    def summary(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "remote_consulted": self.remote_consulted,
                **{action: self.count(action) for action in ("add", "update", "unchanged", "delete", "keep")},
                "bytes_to_send": self.bytes_to_send}

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "parent_commit": self.parent_commit, "notes": self.notes,
                "operations": [asdict(op) for op in self.operations]}

    def lines(self) -> list[str]:
        out = [f"{op.action:>9}  {op.path}" + (f"  ({human_bytes(op.bytes)})" if op.bytes else "")
               for op in self.operations]
        s = self.summary()
        out.append(f"{s['add']} to add, {s['update']} to update, {s['unchanged']} unchanged, "
                   f"{s['delete']} to delete, {s['keep']} kept (not managed by sage); "
                   f"{human_bytes(self.bytes_to_send)} to send at most")
        out.extend(f"note: {note}" for note in self.notes)
        return out


@dataclass
class Difference:
    path: str
    problem: str  # missing | size | sha256 | unexpected
    expected: str = ""
    found: str = ""

    def line(self) -> str:
        detail = f" (expected {self.expected}, found {self.found})" if self.expected or self.found else ""
        return f"{self.path}: {self.problem}{detail}"


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# -- the local side ---------------------------------------------------------------------------

def dataset_files(label_dir: Path, manifest: Manifest, extra: dict[str, Path] | None = None) -> list[LocalFile]:
    """Every ``dataset/`` output of the label manifest, checked on disk against its size and sha256.

    ``extra`` maps more repo paths to local files (the stage manifests), hashed as they are.
    """
    from sage_builder.progress import progress
    from sage_builder.store import file_sha256

    outputs = {rel: out for rel, out in sorted(manifest.outputs.items()) if rel.startswith("dataset/")}
    if not outputs:
        raise StageInputError(f"{label_dir / 'manifest.json'}: lists no dataset/ outputs; "
                              f"rerun `sage stage label --force`")
    files = []
    with progress(total=sum(o.bytes for o in outputs.values()), desc="hash dataset", unit="B",
                  unit_scale=True) as bar:
        for rel, out in outputs.items():
            path = label_dir / rel
            if not path.is_file():
                raise StageInputError(f"{path}: listed in the label manifest but missing; "
                                      f"rerun `sage stage label --force`")
            size = path.stat().st_size
            digest = file_sha256(path) if size == out.bytes else ""
            if size != out.bytes or digest != out.sha256:
                raise StageInputError(f"{path}: changed since the label stage wrote it (sha256/size differ from "
                                      f"{label_dir / 'manifest.json'}); rerun `sage stage label --force`")
            files.append(LocalFile(rel.removeprefix("dataset/"), path, out.sha256, size))
            bar.update(size)
    for path_in_repo, path in sorted((extra or {}).items()):
        files.append(LocalFile(path_in_repo, path, file_sha256(path), path.stat().st_size))
    return files


def plan_operations(files: list[LocalFile], remote: dict[str, RemoteFile]) -> list[PlannedOp]:
    ops = []
    local_paths = {f.path_in_repo for f in files}
    for f in files:
        existing = remote.get(f.path_in_repo)
        if existing is None:
            ops.append(PlannedOp("add", f.path_in_repo, f.size))
        elif existing.same_as(f):
            ops.append(PlannedOp("unchanged", f.path_in_repo))
        else:
            ops.append(PlannedOp("update", f.path_in_repo, f.size))
    for path in sorted(set(remote) - local_paths):
        ops.append(PlannedOp("delete" if is_managed(path) else "keep", path))
    return ops


# -- the Hub side -----------------------------------------------------------------------------

def resolve_token() -> str:
    """HF_TOKEN or the token saved by `hf auth login`; never read from config files of ours."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise SageError("no Hugging Face token: set HF_TOKEN or run `hf auth login` "
                        "(a token with write access to the repo's namespace)")
    return token


def hub_api(token: str) -> HfApi:
    """An HfApi for HF_ENDPOINT (read now, so a test or proxy endpoint set at run time is used)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise SageError("HF_HUB_OFFLINE=1 is set (the Makefile and tests set it): publishing needs the network; "
                        "run `HF_HUB_OFFLINE=0 sage publish ...`")
    if os.environ.get("SAGE_NO_PROGRESS") == "1":
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)


def with_rate_limit_retry(call: Callable[[], T], what: str, retries: int, max_wait_s: float) -> T:
    """Retry ``call`` after a 429 (the request was refused, so repeating it cannot apply it twice).

    huggingface_hub already retries its uploads and pre-upload calls; repo creation and the commit
    are sent once by the library, so we add this for them.
    """
    from huggingface_hub.errors import HfHubHTTPError
    from tenacity import retry, retry_if_exception, stop_after_attempt

    def after(exc: BaseException | None) -> float | None:
        return retry_after_seconds(exc, only_status=429, default=1.0)  # None: not a 429, not retried

    def wait(state: Any) -> float:
        seconds = after(state.outcome.exception())
        return min(max_wait_s, seconds if seconds is not None else 2.0 ** state.attempt_number)

    def before_sleep(state: Any) -> None:
        log.warning("%s: rate limited by the Hub (429); retry %d/%d in %.1f s", what, state.attempt_number,
                    retries, wait(state))

    wrapped = retry(retry=retry_if_exception(lambda e: isinstance(e, HfHubHTTPError) and after(e) is not None),
                    stop=stop_after_attempt(retries + 1), wait=wait, before_sleep=before_sleep, reraise=True)(call)
    return wrapped()


def _http_cause(exc: BaseException) -> BaseException | None:
    """The HTTP or network error behind ``exc`` (huggingface_hub wraps upload errors in RuntimeError)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (HfHubHTTPError, httpx2.TransportError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def hub_failure(exc: BaseException, repo_id: str, step: str) -> PublishError | None:
    """One line for a Hub failure (what failed, the repo's state, what to do); None if not one."""
    cause = _http_cause(exc)
    if cause is None:
        return None
    response = getattr(cause, "response", None)
    status = getattr(response, "status_code", None)
    detail = " ".join(str(exc).split())[:160] or exc.__class__.__name__
    if cause is not exc:
        detail += f": {' '.join(str(cause).split())[:160]}"
    if status == 401:
        hint = "the token was rejected: check HF_TOKEN or `hf auth login`"
    elif status == 403:
        hint = f"the token has no write access to '{repo_id.split('/')[0]}': use a write token for that namespace"
    elif status == 412:
        hint = "someone pushed to the repo meanwhile; rerun to plan against the new head"
    else:
        hint = "rerun the same command to resume (files the Hub already has are not sent again)"
    return PublishError(f"publish {repo_id}: {step} failed ({detail}); nothing was committed, the repo still "
                        f"shows its previous version; {hint}")


@contextlib.contextmanager
def hub_step(repo_id: str, step: str) -> Iterator[None]:
    """Turn an HTTP/network failure inside the block into a one-line PublishError."""
    try:
        yield
    except SageError:
        raise
    except Exception as exc:
        error = hub_failure(exc, repo_id, step)
        if error is None:
            raise
        raise error from None


def remote_state(api: HfApi, repo_id: str, revision: str) -> tuple[str | None, dict[str, RemoteFile]]:
    """(head commit, files) of the revision; (None, {}) if the repo or the branch does not exist."""
    from huggingface_hub import RepoFile
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = api.dataset_info(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None, {}
    files = {}
    for entry in api.list_repo_tree(repo_id, recursive=True, revision=info.sha, repo_type=REPO_TYPE):
        if isinstance(entry, RepoFile):
            files[entry.path] = RemoteFile(entry.path, entry.size, entry.blob_id,
                                           entry.lfs.sha256 if entry.lfs is not None else None)
    return info.sha, files


def plan_publish(files: list[LocalFile], repo_id: str | None, revision: str,
                 api: HfApi | None = None) -> PublishPlan:
    """The operations a push would make; consults the Hub only when ``api`` is given."""
    if api is None or repo_id is None:
        plan = PublishPlan(repo_id, revision, remote_consulted=False, operations=plan_operations(files, {}))
        plan.notes.append("the Hub was not consulted: every file is listed as an addition")
        return plan
    head, remote = remote_state(api, repo_id, revision)
    plan = PublishPlan(repo_id, revision, remote_consulted=True, parent_commit=head,
                       operations=plan_operations(files, remote))
    if head is None:
        plan.notes.append(f"{repo_id}@{revision} does not exist yet: it will be created")
    return plan


@dataclass
class PushResult:
    plan: PublishPlan
    commit: str | None
    differences: list[Difference]
    private: bool | None
    gated: str | bool | None


def ensure_repo(api: HfApi, repo_id: str, private: bool, gated: str | bool, revision: str,
                retries: int, max_wait_s: float) -> tuple[bool | None, str | bool | None]:
    """Create the repo (private unless told otherwise), apply gating, create the branch; (private, gated)."""
    with hub_step(repo_id, "creating the repo"):
        with_rate_limit_retry(lambda: api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True),
                              "create repo", retries, max_wait_s)
        info = api.dataset_info(repo_id)
        if info.private is False and private:
            raise PublishError(f"publish {repo_id}: the repo already exists and is PUBLIC; pass --public to push "
                               f"to a public repo, or make it private on the Hub first")
        if info.private and not private:
            log.warning("%s exists and is private: --public does not change an existing repo's visibility "
                        "(change it in the repo settings on the Hub)", repo_id)
        current_gated = info.gated
        if gated and current_gated != gated:
            with_rate_limit_retry(lambda: api.update_repo_settings(repo_id, gated=gated, repo_type=REPO_TYPE),
                                  "gate repo", retries, max_wait_s)
            current_gated = gated
        if revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True)
    return info.private, current_gated


def push(api: HfApi, files: list[LocalFile], repo_id: str, *, private: bool = True, gated: str | bool = False,
         revision: str = "main", commit_message: str = "Publish Sage dataset", num_threads: int = 5,
         retries: int = 5, max_wait_s: float = 60.0) -> PushResult:
    """Create/update the repo in one commit and verify it; see the module docstring for the order."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    is_private, is_gated = ensure_repo(api, repo_id, private, gated, revision, retries, max_wait_s)
    with hub_step(repo_id, "listing the remote files"):
        plan = plan_publish(files, repo_id, revision, api)
    by_path = {f.path_in_repo: f for f in files}
    additions = []
    for op in plan.operations:
        if op.action in ("add", "update"):
            local = by_path[op.path]
            addition = CommitOperationAdd(path_in_repo=op.path, path_or_fileobj=str(local.local_path))
            addition.upload_info.sha256 = bytes.fromhex(local.sha256)  # hashed once, against the manifest
            additions.append(addition)
    deletions = [CommitOperationDelete(path_in_repo=op.path) for op in plan.operations if op.action == "delete"]
    commit = plan.parent_commit
    if additions or deletions:
        log.info("publish %s@%s: uploading %d files (%s at most), deleting %d", repo_id, revision, len(additions),
                 human_bytes(plan.bytes_to_send), len(deletions))
        with hub_step(repo_id, "uploading files"):
            api.preupload_lfs_files(repo_id, additions, repo_type=REPO_TYPE, revision=revision,
                                    num_threads=num_threads)
        with hub_step(repo_id, "the commit"):
            info = with_rate_limit_retry(
                lambda: api.create_commit(repo_id, [*additions, *deletions], commit_message=commit_message,
                                          repo_type=REPO_TYPE, revision=revision, parent_commit=plan.parent_commit,
                                          num_threads=num_threads),
                "commit", retries, max_wait_s)
        commit = info.oid
        log.info("publish %s: committed %s", repo_id, commit)
    else:
        log.info("publish %s@%s: already up to date, nothing to commit", repo_id, revision)
    with hub_step(repo_id, "verification (listing the pushed files)"):
        differences = verify(api, repo_id, commit or revision, files)
    return PushResult(plan, commit, differences, is_private, is_gated)


def verify(api: HfApi, repo_id: str, revision: str, files: list[LocalFile]) -> list[Difference]:
    """Every local file must be on the Hub with its size and sha256; no stale managed file may remain."""
    _, remote = remote_state(api, repo_id, revision)
    differences = []
    for f in files:
        found = remote.get(f.path_in_repo)
        if found is None:
            differences.append(Difference(f.path_in_repo, "missing"))
        elif found.size != f.size:
            differences.append(Difference(f.path_in_repo, "size", f"{f.size} B", f"{found.size} B"))
        elif found.lfs_sha256 is not None and found.lfs_sha256 != f.sha256:
            differences.append(Difference(f.path_in_repo, "sha256", f.sha256, found.lfs_sha256))
        elif found.lfs_sha256 is None and found.blob_id != git_blob_sha1(f.local_path):
            differences.append(Difference(f.path_in_repo, "git blob id", git_blob_sha1(f.local_path), found.blob_id))
    local_paths = {f.path_in_repo for f in files}
    for path in sorted(set(remote) - local_paths):
        if is_managed(path):
            differences.append(Difference(path, "unexpected", "absent", "a file of an earlier version"))
    return differences
