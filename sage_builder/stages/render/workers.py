"""Render as units of an executor: batches cut once from the plan, a worker that renders them.

The work is cut into batches once, from the plan's key order (finished keys dropped from their
batch), so every image is rendered in the same batch composition whatever the executor and the
number of workers, and so with the same bytes. Units of batches go to whichever worker is idle
(:mod:`sage_builder.executors`); each worker holds a loaded pipeline and writes its own
item-cache parts (a unique name, atomic rename). The stage assembles the shards afterwards.

Workers on other hosts (Ray) write into the same run directory, so it must be on a file system
every node mounts: a worker that cannot see the driver's marker file there refuses to start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_builder.diffusion import ImageJob, RenderSettings, load_pipeline, make_batch_invariant, render_batches
from sage_builder.executors import Executor
from sage_builder.executors.base import WorkerSlot, require_shared, run_batches
from sage_builder.stages.render.config import RenderConfig
from sage_builder.stages.render.levers import RenderLevers, check_levers, compile_pipeline, fuse_projections
from sage_builder.store import ItemCache

log = logging.getLogger("sage.render")

Unit = list[list[ImageJob]]


def cut_batches(jobs: Sequence[ImageJob], batch_size: int,
                done: set[str] | frozenset[str] = frozenset()) -> list[list[ImageJob]]:
    """Cut all ``jobs`` (plan order) into batches and drop finished keys.

    Batches are cut from the whole plan, not from what is missing: parts are written per batch,
    so after an interruption the remaining batches have exactly their original composition.
    """
    cut = [list(jobs[i:i + batch_size]) for i in range(0, len(jobs), batch_size)]
    return [b for b in ([j for j in batch if j.key not in done] for batch in cut) if b]


def load_worker_pipeline(config: RenderConfig, device: str) -> Any:
    """A worker's pipeline: its speed levers applied (fused, compiled), batch-invariant on CPU."""
    levers = RenderLevers.from_config(config)
    check_levers(levers, device)
    pipe = load_pipeline(config, device)
    # Batch invariance wraps the (possibly fused) projections before they are compiled.
    fuse_projections(pipe, levers)
    if device == "cpu":
        make_batch_invariant(pipe)
    return compile_pipeline(pipe, levers, device)


def render_cut_batches(pipe: Any, config: RenderConfig, settings: RenderSettings, device: str,
                       batches: Sequence[Sequence[ImageJob]], cache_dir: Path, revision: str | None,
                       writer_id: str, on_written: Callable[[int], None] | None = None) -> int:
    """Render batches that are already cut (their composition is kept exactly); returns images written."""
    # A compiled worker sees one shape per model: every batch is padded to render.batch_size.
    writer = render_batches(pipe, batches, settings, ItemCache(cache_dir), revision, writer_id=writer_id,
                            pad_to=config.batch_size if config.compile else 0, on_written=on_written,
                            invariant=device == "cpu", sdpa_backend=config.sdpa_backend)
    return writer.written


@dataclass
class RenderWorker:
    """One pipeline on one device; copied to every worker slot, started there, then fed units."""

    config: RenderConfig
    settings: RenderSettings
    revision: str | None
    cache_dir: Path
    marker: str | None = None  # a file the driver made in cache_dir: proves the directory is shared

    def start(self, slot: WorkerSlot) -> None:
        import torch

        require_shared(self.cache_dir, self.marker, self.cache_dir.parents[2])
        self.slot = slot
        self._threads = torch.get_num_threads()
        # CPU pixels can round differently with another torch thread count: render.threads when set
        # (the same on every executor), else the cores the executor reserved for this worker.
        threads = self.config.threads or (slot.cpus if slot.device == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        self.pipe = load_worker_pipeline(self.config, slot.device)

    def run(self, unit: Unit, report: Callable[[int], None]) -> int:
        return render_cut_batches(self.pipe, self.config, self.settings, self.slot.device, unit, self.cache_dir,
                                  self.revision, self.slot.tag, report)

    def close(self) -> None:
        import torch

        self.pipe = None
        torch.set_num_threads(self._threads)


def describe_unit(unit: Unit) -> str:
    images = sum(len(b) for b in unit)
    first = unit[0][0].key if unit and unit[0] else "?"
    return f"a unit of {images} image(s) (first image key {first})"


def render_missing(executor: Executor, config: RenderConfig, settings: RenderSettings, revision: str | None,
                   jobs: Sequence[ImageJob], done: set[str], cache: ItemCache) -> tuple[int, int]:
    """Render the ``jobs`` (all of the plan, in order) whose keys are not ``done``.

    Returns (images written, units run).
    """
    batches = cut_batches(jobs, config.batch_size, done)
    worker = RenderWorker(config, settings, revision, cache.directory)
    return run_batches(executor, batches, worker, describe_unit, cache.directory, f"render ({executor.name})")
