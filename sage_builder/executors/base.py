"""The executor seam: run units of work on workers and yield each result as its unit finishes.

A distributed stage cuts its work into units (fixed compositions, from item keys) and hands them,
with one picklable :class:`UnitWorker`, to an :class:`Executor`. The executor decides only where
the units run (this process, local worker processes, Ray actors); like datatrove's executors, it
knows nothing about what a unit computes. The worker is copied to every worker slot, started
there once (models load in ``start``), and then runs unit after unit.

Failure semantics are the same everywhere work runs outside the driver: the first failed unit
ends the stage. No new units are handed out, the units still running are waited for (the caller
saves their results), and a :class:`SageError` names the worker (host, GPU, pid), the unit's first
item and what to do next. In this process an error is raised as it was raised.
"""

from __future__ import annotations

import os
import socket
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from sage_builder.errors import SageError

U = TypeVar("U")
R = TypeVar("R")

Report = Callable[[int], None]

MARKER_PREFIX = ".visible-to-workers-"


@dataclass(frozen=True)
class WorkerSlot:
    """Where one worker runs, as the executor assigned it."""

    rank: int
    tag: str  # unique within the run ('w0', 'ray1'): names the files the worker writes
    device: str  # 'cpu', 'cuda', 'cuda:1'; on Ray 'cuda' is the GPU the actor was given
    cpus: int | None = None  # CPU cores reserved for the worker (None: not reserved, in this process)


class UnitWorker(Protocol[U, R]):
    """What an executor runs: started once per slot, then called with one unit at a time."""

    def start(self, slot: WorkerSlot) -> None:
        """Load what the worker needs (models); raises as the loading raised."""

    def run(self, unit: U, report: Report) -> R:
        """Do one unit; ``report(n)`` says that n more items are finished (for progress bars)."""

    def close(self) -> None:
        """Release what ``start`` took (called in this process; worker processes simply exit)."""


@dataclass(frozen=True)
class WorkerRequest:
    """What a distributed stage asks of its workers, for every executor (config values, unresolved)."""

    name: str  # 'render': in labels ('render#1 (host h GPU 0, pid 7)') and messages
    device: str  # auto, cpu, cuda, cuda:N
    device_key: str  # the config key of ``device``, for messages
    workers: int | None  # executor local: worker processes (default one per visible GPU, 1 on CPU)
    items_per_unit: int = 1  # work items per call to a worker process or actor (in this process: all)
    ray_workers: int | None = None
    ray_num_cpus: float = 1.0
    ray_num_gpus: float | None = None
    hint: str = "finished items are saved; rerun the stage to resume"


class Executor(ABC, Generic[U]):
    """Runs a stage's units on worker slots, on the device the request resolved to."""

    name: str = "local"
    # Workers may run on other hosts: what they write must go to a file system every node mounts.
    remote: bool = False

    def __init__(self, request: WorkerRequest, device: str):
        self.request = request
        self.device = device  # resolved where the workers run: 'cpu', 'cuda', 'cuda:1'

    @abstractmethod
    def workers_for(self, n_units: int) -> int:
        """How many worker slots ``n_units`` units get."""

    def cut_units(self, items: Sequence[Any]) -> list[list[Any]]:
        """Consecutive runs of ``items_per_unit`` items: the units handed to workers one at a time."""
        per = self.request.items_per_unit
        return [list(items[i:i + per]) for i in range(0, len(items), per)]

    @abstractmethod
    def map_units(self, units: Sequence[U], worker: UnitWorker[U, R], describe_unit: Callable[[U], str],
                  progress: Report | None = None) -> Iterator[tuple[U, R]]:
        """Yield (unit, result) as units finish; ``progress`` gets the workers' reports."""

    def facts(self, n_units: int) -> dict[str, Any]:
        """What the manifest records about where ``n_units`` units ran (``sage plan --measured`` reads
        ``workers``)."""
        return {"executor": self.name, "workers": self.workers_for(n_units)}


def where(device: str | None = None) -> dict[str, Any]:
    """Where a worker runs (called inside it): host, pid and its GPUs, for labels and messages."""
    gpus: list[str] = []
    try:
        import ray

        if ray.is_initialized():
            gpus = [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - informational only
        pass
    if not gpus and device and device.startswith("cuda:"):
        gpus = [device.split(":", 1)[1]]
    return {"host": socket.gethostname(), "pid": os.getpid(), "gpus": gpus}


def worker_label(name: str, rank: int, info: dict[str, Any]) -> str:
    gpus = f" GPU {','.join(info['gpus'])}" if info.get("gpus") else ""
    return f"{name}#{rank} (host {info['host']}{gpus}, pid {info['pid']})"


def describe_exception(cause: BaseException) -> str:
    """What went wrong in a worker, as the middle of a one-line message."""
    name = type(cause).__name__
    text = str(cause).strip().splitlines()[0][:240] if str(cause).strip() else name
    if isinstance(cause, SageError):
        return text
    if "OutOfMemoryError" in name:
        return f"ran out of GPU memory ({text[:120]}); lower the batch size or use a larger GPU"
    return f"failed: {name}: {text}"


def failure_line(worker: str, what: str, unit: str, hint: str) -> str:
    return f"{worker} {what}, at {unit}; {hint}"


def raise_first(errors: list[str]) -> None:
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SageError(errors[0] + more)


@contextmanager
def shared_marker(directory: Path, worker: Any, remote: bool) -> Iterator[None]:
    """Remote workers first prove that they see the run directory: ``worker.marker`` names a file in
    ``directory`` that :func:`require_shared` must find on their host."""
    directory.mkdir(parents=True, exist_ok=True)
    if not remote:
        yield
        return
    worker.marker = f"{MARKER_PREFIX}{uuid.uuid4().hex}"
    (directory / worker.marker).touch()
    try:
        yield
    finally:
        (directory / worker.marker).unlink(missing_ok=True)


def require_shared(directory: Path, marker: str | None, run_dir: Path) -> None:
    """In a worker: refuse to start when the driver's marker file is not visible on this host."""
    if marker and not (directory / marker).exists():
        raise SageError(f"the run directory {run_dir} is not visible on host {socket.gethostname()}: put it on a "
                        "file system every Ray node mounts (NFS, Lustre, a bucket mount)")


def run_batches(executor: Executor, batches: list[list[Any]], worker: Any, describe_unit: Callable[[Any], str],
                directory: Path, desc: str) -> tuple[int, int]:
    """Hand ``batches`` (lists of items, cut by the stage) to the executor's workers as units, with a
    progress bar of items; remote workers must see ``directory`` (:func:`shared_marker`). Each unit's
    result is the number of items it wrote; returns (items written, units run)."""
    from sage_builder.progress import progress

    total = sum(len(b) for b in batches)
    if not total:
        return 0, 0
    units = executor.cut_units(batches)
    bar = progress(total=total, desc=desc, unit="img")
    written = 0
    try:
        with shared_marker(directory, worker, executor.remote):
            for _unit, count in executor.map_units(units, worker, describe_unit, bar.update):
                written += count
    finally:
        bar.close()
    return written, len(units)
