"""The run directory: each stage's Parquet outputs, its manifest, and its resumable item parts.

Layout of a run directory::

    RUN/config.yaml                 the resolved pipeline configuration of the last run
    RUN/<stage>/manifest.json       written last, atomically: the stage is done when it exists
    RUN/<stage>/*.parquet           the stage's outputs (sha256 of each in the manifest)
    RUN/<stage>/_items/<name>/      crash-safe parts of finished items, keyed by item key

Nothing is ever written in place: files go to a temporary name in the same folder and are
renamed, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from sage_builder.config_base import hashable_dump
from sage_builder.errors import ConfigError, DiskFullError, RunDirBusy, StageInputError

MANIFEST_NAME = "manifest.json"
ITEM_KEY = "item_key"


def _canonical(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return _canonical(hashable_dump(obj))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bytes):
        return hashlib.sha256(obj).hexdigest()
    if isinstance(obj, float) and obj.is_integer():
        # 1.0 and 1 must hash alike, or a YAML "1" vs "1.0" would invalidate items.
        return int(obj)
    return obj


def canonical(obj: Any) -> Any:
    """``obj`` as the plain JSON data its hash is taken of."""
    return _canonical(obj)


def stable_hash(*parts: Any, length: int = 64) -> str:
    """sha256 of the canonical JSON of ``parts`` (dict order and int/float spelling ignored)."""
    payload = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


TEMP_FILE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")  # atomic_path's names


def remove_stale_temp_files(directory: Path) -> int:
    """Delete ``atomic_path`` temp files under ``directory`` left by processes that died mid-write
    (a SIGKILL between the write and the rename). A live process's file is kept: another rank may be
    writing it. Returns how many were removed."""
    removed = 0
    if not Path(directory).is_dir():
        return 0
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            match = TEMP_FILE.match(name)
            if match and not _pid_alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    (Path(dirpath) / name).unlink()
                    removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_parquet(table: pa.Table | Any, path: Path, **kwargs: Any) -> pa.Table:
    """Write a pyarrow Table (or pandas DataFrame) atomically; returns the table written."""
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return table


class OutputFile(BaseModel):
    sha256: str
    bytes: int
    rows: int | None = None
    mtime_ns: int | None = Field(None, description="when it was written; a later change is checked by hash")


class Manifest(BaseModel):
    """What a finished stage wrote and everything that determined it."""

    stage: str
    fingerprint: str = Field(description="hash of config section, templates, models and input manifests")
    config_hash: str
    templates: dict[str, str] = Field(default_factory=dict, description="template name -> sha256")
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    inputs: dict[str, str] = Field(default_factory=dict, description="upstream stage -> manifest hash")
    outputs: dict[str, OutputFile] = Field(default_factory=dict, description="path relative to the stage dir")
    rows: dict[str, int] = Field(default_factory=dict)
    packages: dict[str, str] = Field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float = 0.0
    seconds: float = 0.0
    stats: dict[str, Any] = Field(default_factory=dict, description="stage-specific figures (reports, counts)")
    config: dict[str, Any] = Field(default_factory=dict, description="the config section as hashed (execution-only "
                                   "keys left out): `sage status` names the keys that changed since")

    def content_hash(self) -> str:
        """Hash downstream stages record as their input: what was produced, not when."""
        return stable_hash(self.stage, self.fingerprint, {k: v.sha256 for k, v in self.outputs.items()})


def package_versions() -> dict[str, str]:
    from importlib import metadata

    names = ["sage-builder", "torch", "diffusers", "transformers", "accelerate", "datasets", "pyarrow",
             "pandas", "numpy", "pydantic", "openai", "huggingface_hub", "vllm", "llguidance"]
    versions = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


class StageDir:
    """One stage's folder inside a run directory."""

    def __init__(self, run: RunDir, name: str):
        self.run = run
        self.name = name
        self.path = run.root / name

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def read_manifest(self) -> Manifest | None:
        if not self.manifest_path.exists():
            return None
        try:
            return Manifest.model_validate_json(self.manifest_path.read_text())
        except ValueError as exc:
            raise StageInputError(f"{self.manifest_path}: unreadable manifest ({exc.__class__.__name__}); "
                                  f"rerun `{self.run.stage_command(self.name, '--force')}`") from None

    def write_manifest(self, manifest: Manifest) -> None:
        atomic_write_text(self.manifest_path, manifest.model_dump_json(indent=2))

    def invalidate(self) -> None:
        """Drop the completion marker; item parts stay, since their keys say whether they still apply."""
        self.manifest_path.unlink(missing_ok=True)

    def items(self, name: str = "items") -> ItemCache:
        return ItemCache(self.path / "_items" / name)

    def file(self, relpath: str) -> Path:
        return self.path / relpath

    def describe_outputs(self, relpaths: Iterable[str]) -> dict[str, OutputFile]:
        described = {}
        for rel in relpaths:
            path = self.file(rel)
            rows = pq.ParquetFile(path).metadata.num_rows if path.suffix == ".parquet" else None
            stat = path.stat()
            described[rel] = OutputFile(sha256=file_sha256(path), bytes=stat.st_size, rows=rows,
                                        mtime_ns=stat.st_mtime_ns)
        return described

    def output_problem(self, manifest: Manifest, full: bool = False) -> str | None:
        """Why the outputs on disk are not the ones ``manifest`` lists (None if they are).

        By default a file whose size and mtime are as recorded is trusted; one whose mtime moved is
        hashed (a copy or ``touch`` that kept the bytes is fine). ``full`` hashes every file.
        """
        for rel, recorded in manifest.outputs.items():
            path = self.file(rel)
            try:
                stat = path.stat()
            except FileNotFoundError:
                return f"{path}: missing"
            except OSError as exc:
                return f"{path}: unreadable ({exc.strerror or type(exc).__name__})"
            if stat.st_size != recorded.bytes:
                return f"{path}: modified ({stat.st_size} bytes, {recorded.bytes} when written)"
            # A manifest written before mtimes were recorded is trusted on size (hashing a whole run's
            # shards on every status would be slow); --verify still hashes it.
            if full or (recorded.mtime_ns is not None and stat.st_mtime_ns != recorded.mtime_ns):
                try:
                    digest = file_sha256(path)
                except OSError as exc:
                    return f"{path}: unreadable ({exc.strerror or type(exc).__name__})"
                if digest != recorded.sha256:
                    return f"{path}: modified (its sha256 differs from the one recorded)"
        return None

    def has_partial_work(self) -> bool:
        items = self.path / "_items"
        return items.exists() and any(items.rglob("*.parquet"))


LOCK_NAME = ".sage.lock"
_HELD: dict[str, int] = {}  # run dirs this process holds -> nesting depth (`sage run` holds it across stages)


class RunDir:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def check_usable(self) -> None:
        """The run directory is a folder, or can become one: not a file, not under a file."""
        if self.root.is_symlink() and not self.root.exists():
            raise ConfigError(f"--run-dir {self.root}: a symlink to {os.readlink(self.root)}, which does not exist; "
                              "create the target or point --run-dir at a folder")
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--run-dir {self.root}: is a file, not a directory; give a folder for the run")
        for parent in self.root.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"--run-dir {self.root}: {parent} is a file, so no folder can be made under "
                                      f"it; give another --run-dir")
                if not os.access(parent, os.W_OK | os.X_OK) and not self.root.exists():
                    raise ConfigError(f"--run-dir {self.root}: cannot create it ({parent} is not writable)")
                break
        if self.root.is_dir() and not os.access(self.root, os.W_OK | os.X_OK):
            raise ConfigError(f"--run-dir {self.root}: not writable by this user; fix its permissions or use "
                              "another --run-dir")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for this process: a second run on it stops at once, in one line.

        An OS lock (``flock``) on ``RUN/.sage.lock``: the kernel releases it when the holder dies, so a
        killed run never blocks the next one. The file says who holds it, for the message, and is
        removed on release.
        """
        key = str(self.root.resolve())
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_NAME
        handle = _acquire_lock(path)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            with contextlib.suppress(OSError):
                path.unlink()
            handle.close()  # closing drops the flock

    def stage(self, name: str) -> StageDir:
        return StageDir(self, name)

    def manifest_of(self, stage: str, needed_by: str | None = None) -> Manifest:
        manifest = self.stage(stage).read_manifest()
        if manifest is None:
            who = f"stage '{needed_by}' needs" if needed_by else "needs"
            raise StageInputError(f"{who} the outputs of stage '{stage}' in {self.root}, which is not done; "
                                  f"run `{self.stage_command(stage)}` first")
        return manifest

    def stage_command(self, stage: str, *flags: str) -> str:
        """The command that (re)runs ``stage`` here, for error hints: with the config this run used
        (``RUN/config.yaml``), so that a hint typed as shown never runs the demo config into it."""
        config = self.root / "config.yaml"
        return " ".join(["sage stage", stage, "--config", str(config) if config.exists() else "PIPELINE.yaml",
                         "--run-dir", str(self.root), *flags])


def _acquire_lock(path: Path) -> Any:
    import fcntl
    import socket

    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise RunDirBusy(f"{path.parent}: in use by another run ({holder or 'holder unknown'}); wait for it "
                             f"to finish or use another --run-dir") from None
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file between our open and our lock: take the new one
            handle.close()
            continue
        handle.seek(0)
        handle.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {since}")
        handle.flush()
        return handle


def disk_full_cause(exc: BaseException) -> BaseException | None:
    """The ENOSPC error behind ``exc`` (wrapped or chained by a writer thread, safetensors, ...)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "errno", None) == errno.ENOSPC or "No space left on device" in str(current):
            return current
        current = current.__cause__ or current.__context__
    return None


def disk_full_error(exc: BaseException, where: Path, needed: tuple[int, str] | None) -> DiskFullError:
    """One line: the disk is full, where, how much is free, and about how much the stage writes."""
    filename = getattr(exc, "filename", None)
    target = Path(filename) if filename else where
    probe = next((p for p in [target, *target.parents] if p.exists()), where)
    free = shutil.disk_usage(probe).free
    need = f"; the stage needs at least {_mb(needed[0])} more ({needed[1]})" if needed else ""
    return DiskFullError(f"disk full (no space left on device) writing {target}: {_mb(free)} free there{need}; "
                         f"free some space or use a --run-dir on a larger disk, then rerun: finished items are kept")


def _mb(n: int) -> str:
    if n < 1e6:
        return f"{n / 1e3:.0f} kB"
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _corrupt_part(part: Path, exc: BaseException) -> StageInputError:
    return StageInputError(f"{part}: a corrupt item part ({type(exc).__name__}); delete it and rerun the stage: "
                           "only its items are computed again")


class ItemCache:
    """Crash-safe, append-only store of finished items, keyed by ``item_key``.

    Every flush writes one new Parquet part atomically, so ``kill -9`` loses at most the rows not
    yet flushed; a rerun asks ``done_keys()`` and computes only what is missing. If two parts ever
    hold the same key (parallel writers), the part that sorts first wins.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def parts(self) -> list[Path]:
        if not self.directory.exists():
            return []
        return sorted(self.directory.glob("part-*.parquet"))

    def _dataset(self) -> ds.Dataset | None:
        """Every part as one dataset, in part order; columns a part lacks read as nulls."""
        parts = self.parts()
        if not parts:
            return None
        schemas = []
        for part in parts:
            try:
                schemas.append(pq.read_schema(part))
            except (pa.ArrowException, OSError) as exc:
                raise _corrupt_part(part, exc) from None
        schema = pa.unify_schemas(schemas, promote_options="default")
        return ds.dataset([str(part) for part in parts], schema=schema, format="parquet")

    def _table(self, columns: list[str] | None) -> pa.Table | None:
        dataset = self._dataset()
        if dataset is None:
            return None
        try:
            return dataset.to_table(columns=columns)
        except (pa.ArrowException, OSError):
            for part in self.parts():  # which part is damaged: read them one by one
                try:
                    pq.read_table(part, columns=columns)
                except (pa.ArrowException, OSError) as exc:
                    raise _corrupt_part(part, exc) from None
            raise

    def done_keys(self) -> set[str]:
        table = self._table([ITEM_KEY])
        return set() if table is None else set(table.column(ITEM_KEY).to_pylist())

    def write(self, rows: list[dict[str, Any]] | pa.Table, writer_id: str = "0") -> Path | None:
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
        if table.num_rows == 0:
            return None
        if ITEM_KEY not in table.column_names:
            raise ValueError(f"item rows need an '{ITEM_KEY}' column (got {table.column_names})")
        name = f"part-{time.time_ns():020d}-{writer_id}-{uuid.uuid4().hex[:8]}.parquet"
        path = self.directory / name
        write_parquet(table, path)
        return path

    def read(self, keys: Iterable[str] | None = None, columns: list[str] | None = None) -> pa.Table | None:
        """All finished items (or only ``keys``), one row per key, in part order."""
        table = self._table(columns)
        if table is None:
            return None
        seen: set[str] = set()
        wanted = set(keys) if keys is not None else None
        mask = []
        for key in table.column(ITEM_KEY).to_pylist():
            keep = key not in seen and (wanted is None or key in wanted)
            seen.add(key)
            mask.append(keep)
        return table.filter(pa.array(mask, type=pa.bool_()))

    def writer(self, flush_rows: int = 64, flush_seconds: float = 30.0, writer_id: str = "0") -> ItemWriter:
        return ItemWriter(self, flush_rows, flush_seconds, writer_id)

    def clear(self) -> None:
        for part in self.parts():
            part.unlink()


class ItemWriter:
    """Buffers finished items and flushes a part every ``flush_rows`` rows or ``flush_seconds``."""

    def __init__(self, cache: ItemCache, flush_rows: int, flush_seconds: float, writer_id: str):
        self.cache = cache
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.writer_id = writer_id
        self._rows: list[dict[str, Any]] = []
        self._last = time.monotonic()
        self.written = 0

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.flush_rows or time.monotonic() - self._last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            self.cache.write(self._rows, self.writer_id)
            self.written += len(self._rows)
            self._rows = []
        self._last = time.monotonic()

    def __enter__(self) -> ItemWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Flush on errors too: finished items are worth keeping whatever broke the loop.
        self.flush()
