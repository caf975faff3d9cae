"""Stage 3 on Ray: one render actor per GPU, each holding a loaded pipeline.

The driver cuts the plan into batches exactly as the local executor does (``split_batches``: from
the whole plan in key order, finished keys dropped), so every image is rendered in the same batch
composition, and so with the same bytes, as in a local run. Units of
``ray.render_batches_per_task`` batches go to whichever actor is idle.

Each actor writes its own item parts into ``RUN/render/_items/images`` (atomic rename, a name no
other writer uses), so the run directory must be on a file system every node mounts; an actor
that cannot see it refuses to start. The driver then assembles the shards as in a local run.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_builder.errors import SageError
from sage_builder.executors.ray_cluster import ActorPool, cluster_gpus, connect, kill_actors, start_actors, where
from sage_builder.progress import progress

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig
    from sage_builder.stages.render.config import RenderConfig
    from sage_builder.stages.render.engine import ImageJob, RenderSettings
    from sage_builder.store import ItemCache

log = logging.getLogger("sage.ray")

RERUN = "finished images are saved; rerun the stage to resume"
MARKER_PREFIX = ".ray-visible-"


class RenderActor:
    """A loaded diffusers pipeline on one GPU (or CPU cores) of some node."""

    def __init__(self, config: RenderConfig, settings: RenderSettings, revision: str | None, device: str,
                 cache_dir: str, marker: str, writer_id: str, threads: int | None):
        self.config, self.settings, self.revision, self.device = config, settings, revision, device
        self.cache_dir, self.marker, self.writer_id, self.threads = Path(cache_dir), marker, writer_id, threads
        self.pipe: Any = None

    def start(self) -> dict[str, Any]:
        import torch

        from sage_builder.stages.render.workers import load_worker_pipeline

        info = where()
        if not (self.cache_dir / self.marker).exists():
            raise SageError(f"the run directory {self.cache_dir.parents[2]} is not visible on host {info['host']}: "
                            "put it on a file system every Ray node mounts (NFS, Lustre, a bucket mount)")
        if self.threads:
            torch.set_num_threads(self.threads)
        self.pipe = load_worker_pipeline(self.config, self.device)
        return info

    def render(self, unit: list[list[ImageJob]]) -> int:
        from sage_builder.stages.render.workers import render_cut_batches

        return render_cut_batches(self.pipe, self.config, self.settings, self.device, unit, self.cache_dir,
                                  self.revision, self.writer_id)


def ray_device(config: RenderConfig, gpus: int) -> str:
    """The device render actors use, decided from the cluster (not from the driver's machine)."""
    if config.device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    if config.device.startswith("cuda") and gpus == 0:
        raise SageError(f"render.device: {config.device} but the Ray cluster has no GPUs; add GPU nodes "
                        "or set render.device: cpu")
    return "cuda" if config.device.startswith("cuda") else config.device


def render_on_ray(pipeline: PipelineConfig, settings: RenderSettings, revision: str | None, device: str,
                  jobs: list[ImageJob], done: set[str], cache: ItemCache) -> tuple[int, dict[str, Any]]:
    """Render the ``jobs`` whose keys are not ``done`` on Ray actors; (images written, executor facts)."""
    from sage_builder.stages.render.workers import split_batches

    config, rc = pipeline.render, pipeline.ray
    ray = connect(rc)
    batches = split_batches(jobs, config.batch_size, 1, done)[0]
    total = sum(len(b) for b in batches)
    if not total:
        return 0, {}
    per = rc.render_batches_per_task
    units = [batches[i:i + per] for i in range(0, len(batches), per)]
    gpus_each = rc.render_num_gpus if rc.render_num_gpus is not None else (1.0 if device == "cuda" else 0.0)
    n = rc.render_workers or (max(1, int(cluster_gpus(ray) // gpus_each)) if gpus_each else 1)
    n = min(n, len(units))
    # CPU pixels can round differently with another torch thread count: render.threads when set (as
    # in a local run), else the CPUs the actor reserves.
    threads = (config.threads or max(1, int(rc.render_num_cpus))) if device == "cpu" else None

    cache.directory.mkdir(parents=True, exist_ok=True)
    marker = f"{MARKER_PREFIX}{uuid.uuid4().hex}"
    (cache.directory / marker).touch()
    actors: list[Any] = []
    bar = progress(total=total, desc="render (ray)", unit="img")
    try:
        options = {"num_cpus": rc.render_num_cpus, "num_gpus": gpus_each, "max_restarts": 0}
        args = [(config, settings, revision, device, str(cache.directory), marker, f"ray{i}", threads)
                for i in range(n)]
        actors, labels = start_actors(ray, RenderActor, args, options, "render", rc.startup_timeout_s, RERUN)
        log.info("ray: %d render actor(s) on %s: %s; %d images in %d units", n, device, "; ".join(labels), total,
                 len(units))
        pool: ActorPool[list[list[ImageJob]]] = ActorPool(ray, actors, labels, rc.task_timeout_s, _describe_unit,
                                                          RERUN)
        written = 0
        for _unit, count in pool.run(units, lambda actor, unit: actor.render.remote(unit)):
            written += count
            bar.update(count)
    finally:
        bar.close()
        kill_actors(ray, actors)
        (cache.directory / marker).unlink(missing_ok=True)
    return written, {"executor": "ray", "ray_workers": n, "ray_units": len(units)}


def _describe_unit(unit: list[list[ImageJob]]) -> str:
    images = sum(len(b) for b in unit)
    first = unit[0][0].key if unit and unit[0] else "?"
    return f"a unit of {images} image(s) (first image key {first})"
