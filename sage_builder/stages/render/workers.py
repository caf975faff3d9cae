"""Where rendering runs: in this process, or one worker process per visible GPU.

The work is cut into batches once, from the plan's key order, and batch ``i`` goes to worker
``i % n``. Every image is therefore rendered in the same batch whatever the number of workers,
so the bytes are identical with 1 or N workers on any device (on CPU they are batch-invariant
anyway). A worker writes its own item-cache parts; the stage assembles the shards afterwards.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sage_builder.config  # noqa: F401  (the config tree first: it imports the stage sections)
from sage_builder.errors import SageError
from sage_builder.progress import progress
from sage_builder.stages.render.config import RenderConfig
from sage_builder.stages.render.engine import (ImageJob, RenderSettings, load_pipeline, make_batch_invariant,
                                               render_batches)
from sage_builder.store import ItemCache

log = logging.getLogger("sage.render")


@dataclass
class RenderTask:
    """What one worker renders: its batches (lists of jobs) and how."""

    config: RenderConfig
    settings: RenderSettings
    revision: str | None
    device: str
    batches: list[list[ImageJob]]
    cache_dir: Path
    writer_id: str
    threads: int | None = None


def split_batches(jobs: Sequence[ImageJob], batch_size: int, n_workers: int,
                  done: set[str] | frozenset[str] = frozenset()) -> list[list[list[ImageJob]]]:
    """Cut all ``jobs`` (plan order) into batches, drop finished keys, deal the rest round-robin.

    Batches are cut from the whole plan, not from what is missing: parts are written per batch,
    so after an interruption the remaining batches have exactly their original composition.
    """
    cut = [list(jobs[i:i + batch_size]) for i in range(0, len(jobs), batch_size)]
    todo = [b for b in ([j for j in batch if j.key not in done] for batch in cut) if b]
    return [todo[w::n_workers] for w in range(n_workers)]


def run_task(task: RenderTask, on_written: Any = None) -> int:
    import torch

    previous = torch.get_num_threads()
    if task.threads:
        torch.set_num_threads(task.threads)
    try:
        return _render_task(task, on_written)
    finally:
        torch.set_num_threads(previous)


def load_worker_pipeline(config: RenderConfig, device: str) -> Any:
    """A worker's pipeline (a local process or a Ray actor): compiled if asked, batch-invariant on CPU."""
    pipe = load_pipeline(config, device, compile_unet=config.compile)
    if device == "cpu":
        make_batch_invariant(pipe)
    return pipe


def render_cut_batches(pipe: Any, config: RenderConfig, settings: RenderSettings, device: str,
                       batches: Sequence[Sequence[ImageJob]], cache_dir: Path, revision: str | None,
                       writer_id: str, on_written: Any = None) -> int:
    """Render batches that are already cut (their composition is kept exactly); returns images written."""
    writer = render_batches(pipe, batches, settings, ItemCache(cache_dir), revision, writer_id=writer_id,
                            pad_to=config.batch_size if config.compile else 0, on_written=on_written,
                            invariant=device == "cpu")
    return writer.written


def _render_task(task: RenderTask, on_written: Any) -> int:
    pipe = load_worker_pipeline(task.config, task.device)
    return render_cut_batches(pipe, task.config, task.settings, task.device, task.batches, task.cache_dir,
                              task.revision, task.writer_id, on_written)


def _worker_main(task: RenderTask, events: Any) -> None:
    try:
        run_task(task, on_written=lambda n: events.put(("written", n)))
        events.put(("done", task.writer_id))
    except SageError as exc:
        events.put(("error", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        events.put(("error", f"worker {task.writer_id}: {exc.__class__.__name__}: {exc}"))


def render_all(config: RenderConfig, settings: RenderSettings, revision: str | None, device: str,
               jobs: Sequence[ImageJob], done: set[str], cache: ItemCache, n_workers: int) -> int:
    """Render the ``jobs`` (all of the plan, in order) whose keys are not ``done``; returns images written."""
    per_worker = [w for w in split_batches(jobs, config.batch_size, n_workers, done) if w]
    total = sum(len(b) for batches in per_worker for b in batches)
    if not total:
        return 0
    bar = progress(total=total, desc="render", unit="img")
    try:
        if len(per_worker) == 1:
            task = RenderTask(config, settings, revision, device, per_worker[0], cache.directory, "w0",
                              config.threads)
            return run_task(task, on_written=bar.update)
        return _run_processes(config, settings, revision, device, per_worker, cache, bar)
    finally:
        bar.close()


def _run_processes(config: RenderConfig, settings: RenderSettings, revision: str | None, device: str,
                   per_worker: list[list[list[ImageJob]]], cache: ItemCache, bar: Any) -> int:
    import os

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    n = len(per_worker)
    threads = config.threads or (max(1, (os.cpu_count() or 1) // n) if device == "cpu" else None)
    procs = []
    for rank, batches in enumerate(per_worker):
        worker_device = f"cuda:{rank}" if device.startswith("cuda") else device
        task = RenderTask(config, settings, revision, worker_device, batches, cache.directory, f"w{rank}", threads)
        proc = ctx.Process(target=_worker_main, args=(task, events), name=f"render-w{rank}", daemon=True)
        proc.start()
        procs.append(proc)
    written, finished, errors = 0, 0, []
    try:
        while finished < n:
            try:
                kind, value = events.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead and finished + len(errors) < n:
                    # A worker killed from outside (OOM, signal) reports nothing.
                    time.sleep(1.0)
                    if events.empty():
                        errors.append(f"worker {dead[0].name} died (exit code {dead[0].exitcode})")
                        break
                continue
            if kind == "written":
                written += value
                bar.update(value)
            elif kind == "done":
                finished += 1
            else:
                errors.append(value)
                finished += 1
    finally:
        for proc in procs:
            proc.join(timeout=5 if errors else None)
            if proc.is_alive():
                proc.terminate()
    if errors:
        raise SageError(f"render: {errors[0]} (finished images are kept; rerun to resume)")
    return written
