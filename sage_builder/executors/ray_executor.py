"""``executor: ray``: a distributed stage's units on Ray actors, one worker per actor.

Each actor holds one started :class:`UnitWorker` (one model load) and runs one unit at a time;
:class:`ActorPool` hands the next unit to whichever actor is idle and turns a raised unit, a dead
actor or a unit past ``ray.task_timeout_s`` into one line. The device is decided from the
cluster's GPUs, not from the driver's machine; Ray gives each GPU actor its own GPU as ``cuda``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sage_builder.errors import SageError
from sage_builder.executors.base import Executor, Report, UnitWorker, WorkerRequest, WorkerSlot, where
from sage_builder.executors.ray_cluster import ActorPool, cluster_gpus, connect, kill_actors, start_actors

if TYPE_CHECKING:
    from sage_builder.executors.config import RayConfig

log = logging.getLogger("sage.ray")

U = TypeVar("U")
R = TypeVar("R")


class UnitActor:
    """A Ray actor around one worker: started once, then one unit per call."""

    def __init__(self, worker: UnitWorker, slot: WorkerSlot):
        self.worker, self.slot = worker, slot

    def start(self) -> dict[str, Any]:
        info = where(self.slot.device)
        self.worker.start(self.slot)
        return info

    def run(self, unit: Any) -> tuple[Any, int]:
        """(the unit's result, the items it reported finished): reports reach the driver per unit."""
        reported = [0]

        def report(n: int) -> None:
            reported[0] += n

        return self.worker.run(unit, report), reported[0]


def ray_device(device: str, key: str, gpus: int) -> str:
    """The device the actors use, decided from the cluster (not from the driver's machine)."""
    if device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    if device.startswith("cuda") and gpus == 0:
        raise SageError(f"{key}: {device} but the Ray cluster has no GPUs; add GPU nodes or set {key}: cpu")
    return "cuda" if device.startswith("cuda") else device


class RayExecutor(Executor):
    """``ray.<stage>_workers`` actors (default one per cluster GPU), each reserving CPUs and GPUs."""

    name = "ray"
    remote = True

    def __init__(self, request: WorkerRequest, config: RayConfig):
        self.config = config
        self.ray = connect(config)
        self.gpus = cluster_gpus(self.ray)
        super().__init__(request, ray_device(request.device, request.device_key, self.gpus))
        r = request
        self.gpus_each = r.ray_num_gpus if r.ray_num_gpus is not None else (1.0 if self.device == "cuda" else 0.0)

    def workers_for(self, n_units: int) -> int:
        r = self.request
        n = r.ray_workers or (max(1, int(self.gpus // self.gpus_each)) if self.gpus_each else 1)
        return max(0, min(n, n_units))

    def facts(self, n_units: int) -> dict[str, Any]:
        if not n_units:
            return {"executor": self.name, "workers": 0}
        n = self.workers_for(n_units)
        return {"executor": self.name, "workers": n, "ray_workers": n, "ray_units": n_units}

    def map_units(self, units: Sequence[U], worker: UnitWorker[U, R], describe_unit: Callable[[U], str],
                  progress: Report | None = None) -> Iterator[tuple[U, R]]:
        n = self.workers_for(len(units))
        if not units:
            return
        r, rc = self.request, self.config
        cpus = max(1, int(r.ray_num_cpus))
        args = [(worker, WorkerSlot(i, f"ray{i}", self.device, cpus)) for i in range(n)]
        options = {"num_cpus": r.ray_num_cpus, "num_gpus": self.gpus_each, "max_restarts": 0}
        actors: list[Any] = []
        try:
            actors, labels = start_actors(self.ray, UnitActor, args, options, r.name, rc.startup_timeout_s, r.hint)
            log.info("ray: %d %s actor(s) on %s: %s; %d units", n, r.name, self.device, "; ".join(labels),
                     len(units))
            pool: ActorPool[U] = ActorPool(self.ray, actors, labels, rc.task_timeout_s, describe_unit, r.hint)
            for unit, (result, reported) in pool.run(units, lambda actor, unit: actor.run.remote(unit)):
                if progress:
                    progress(reported)
                yield unit, result
        finally:
            kill_actors(self.ray, actors)
