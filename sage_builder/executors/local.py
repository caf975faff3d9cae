"""``executor: local``: the units run in this process, or in one spawned worker process per GPU.

One worker runs in this process, unit after unit, and an error is raised as it was raised (a
Ctrl-C stops the stage at once; what is written stays). Several workers are
``concurrent.futures.ProcessPoolExecutor`` processes (spawn: CUDA cannot be forked); each pulls
its rank once, starts its worker, then takes one unit at a time. A worker's reports travel back on
a queue, so the progress bar moves per batch, not per unit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from sage_builder.executors.base import (Executor, Report, UnitWorker, WorkerRequest, WorkerSlot,
                                         describe_exception, failure_line, raise_first, where, worker_label)
from sage_builder.runtime import resolve_device

U = TypeVar("U")
R = TypeVar("R")


def local_executor(request: WorkerRequest) -> Executor:
    """This process for one worker, else one process per worker (default: one per visible GPU)."""
    device = resolve_device(request.device, request.device_key)
    workers = request.workers if request.workers is not None else default_workers(device)
    if workers == 1:
        return InProcessExecutor(request, device)
    return ProcessExecutor(request, device, workers)


def default_workers(device: str) -> int:
    if device.startswith("cuda") and ":" not in device:
        import torch

        return max(1, torch.cuda.device_count())
    return 1


class InProcessExecutor(Executor):
    """One worker, in this process: all of the work is one unit (nothing to balance)."""

    def workers_for(self, n_units: int) -> int:
        return 1

    def cut_units(self, items: Sequence[Any]) -> list[list[Any]]:
        # One unit keeps one background writer over the whole run (encoding overlaps rendering).
        return [list(items)] if len(items) else []

    def map_units(self, units: Sequence[U], worker: UnitWorker[U, R], describe_unit: Callable[[U], str],
                  progress: Report | None = None) -> Iterator[tuple[U, R]]:
        if not units:
            return
        worker.start(WorkerSlot(0, "w0", self.device))
        try:
            for unit in units:
                yield unit, worker.run(unit, progress or _ignore)
        finally:
            worker.close()


class ProcessExecutor(Executor):
    """``workers`` spawned processes; worker ``r`` on ``cuda:r`` when the device is CUDA."""

    def __init__(self, request: WorkerRequest, device: str, workers: int):
        super().__init__(request, device)
        self.workers = workers

    def workers_for(self, n_units: int) -> int:
        return max(1, min(self.workers, n_units))

    def facts(self, n_units: int) -> dict[str, Any]:
        return {"executor": self.name, "workers": self.workers}

    def map_units(self, units: Sequence[U], worker: UnitWorker[U, R], describe_unit: Callable[[U], str],
                  progress: Report | None = None) -> Iterator[tuple[U, R]]:
        n = self.workers_for(len(units))
        if not units:
            return
        ctx = mp.get_context("spawn")
        # SimpleQueue writes at put(), with no feeder thread: a worker killed right after telling
        # which unit it took has still told it.
        events, ranks = ctx.SimpleQueue(), ctx.SimpleQueue()
        for rank in range(n):
            ranks.put(rank)
        # CPU: the cores are shared out, one torch thread pool per process.
        cpus = max(1, (os.cpu_count() or 1) // n) if self.device == "cpu" else None
        pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_start_worker,
                                   initargs=(worker, self.request.name, self.device, cpus, ranks, events))
        runs = _Runs(units, describe_unit, self.request.hint, events, progress or _ignore)
        try:
            yield from runs.drive(pool, n)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            runs.drain()
        raise_first(runs.errors)


class _Runs:
    """The driver's side of a process pool: one unit in flight per process, failures as lines."""

    def __init__(self, units: Sequence[Any], describe_unit: Callable[[Any], str], hint: str, events: Any,
                 progress: Report):
        self.units, self.describe_unit, self.hint = units, describe_unit, hint
        self.events, self.progress = events, progress
        self.errors: list[str] = []
        self.started: dict[int, tuple[int, str]] = {}  # unit index -> (pid, worker label)

    def drive(self, pool: ProcessPoolExecutor, n: int) -> Iterator[tuple[Any, Any]]:
        todo = iter(range(len(self.units)))
        running: dict[Future, int] = {}

        def hand_out() -> None:
            while len(running) < n and not self.errors:
                index = next(todo, None)
                if index is None:
                    return
                running[pool.submit(_run_unit, index, self.units[index])] = index

        hand_out()
        while running:
            finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            self.drain()
            in_flight = sorted(running.values())
            for future in finished:
                index = running.pop(future)
                try:
                    status, label, payload = future.result()
                except BrokenProcessPool:
                    if not self.errors:
                        self.errors.append(self._died(pool, in_flight))
                    continue
                if status == "error":
                    self.errors.append(failure_line(label, payload, self.describe_unit(self.units[index]),
                                                    self.hint))
                    continue
                yield self.units[index], payload
            hand_out()

    def drain(self) -> None:
        while not self.events.empty():
            kind, *value = self.events.get()
            if kind == "report":
                self.progress(value[0])
            else:
                index, pid, label = value
                self.started[index] = (pid, label)

    def _died(self, pool: ProcessPoolExecutor, in_flight: list[int]) -> str:
        """The line for a worker process that vanished (killed, OOM): which one, at which unit."""
        self.drain()  # a "unit started" event written just before the death may still be unread
        # concurrent.futures keeps no public handle on its processes; their exit codes say who died.
        processes = dict(getattr(pool, "_processes", None) or {})
        terminated = (0, None, -signal.SIGTERM)
        for index in in_flight:
            pid, label = self.started.get(index, (None, None))
            process = processes.get(pid)
            if process is not None and process.exitcode is None:
                process.join(timeout=2.0)  # not reaped yet: its exit code says whether it is the one that died
            if label and (process is None or process.exitcode not in terminated):
                code = f" (exit code {process.exitcode})" if process is not None else ""
                return failure_line(label, f"died{code} (its process was killed, e.g. out of memory)",
                                    self.describe_unit(self.units[index]), self.hint)
        first = self.describe_unit(self.units[in_flight[0]]) if in_flight else "startup"
        return failure_line("a worker process", "died (its process was killed, e.g. out of memory)", first,
                            self.hint)


_STATE: dict[str, Any] = {}  # this worker process's worker, label, queue and start-up error


def _start_worker(worker: UnitWorker, name: str, device: str, cpus: int | None, ranks: Any, events: Any) -> None:
    rank = ranks.get()
    slot = WorkerSlot(rank, f"w{rank}", f"cuda:{rank}" if device.startswith("cuda") else device, cpus)
    _STATE.update(worker=worker, events=events, error=None, label=worker_label(name, rank, where(slot.device)))
    try:
        worker.start(slot)
    except BaseException as exc:  # noqa: BLE001 - reported with the first unit this process takes
        _STATE["error"] = describe_exception(exc)


def _run_unit(index: int, unit: Any) -> tuple[str, str, Any]:
    events, label = _STATE["events"], _STATE["label"]
    events.put(("unit", index, os.getpid(), label))
    if _STATE["error"] is not None:
        return "error", label, f"{_STATE['error']} (at start-up)"
    try:
        return "ok", label, _STATE["worker"].run(unit, lambda n: events.put(("report", n)))
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line in the driver
        return "error", label, describe_exception(exc)


def _ignore(_n: int) -> None:
    pass
