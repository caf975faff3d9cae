"""Joining a Ray cluster, starting actors, and running item-keyed work units on them.

The driver keeps the bookkeeping: it cuts the work into units (fixed compositions, from item keys),
hands each idle actor the next unit, and yields every finished unit at once, so the caller saves it
before anything else can go wrong. Resumability is ours, not Ray's: a unit's items are written
when it finishes, and a rerun after a killed driver or a lost node only does the missing ones.

A unit that raises, an actor that dies (lost node, OOM killer, ``kill -9``) or a unit that runs past
``ray.task_timeout_s`` ends the stage: no new units are handed out, the units still running are
waited for (their items are saved), the actors are killed, and a :class:`SageError` names the
worker, its node and the first item of the unit. ``make stage-N`` then resumes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sage_builder.errors import SageError
from sage_builder.executors.base import describe_exception, failure_line, raise_first, worker_label

if TYPE_CHECKING:
    from sage_builder.executors.config import RayConfig

log = logging.getLogger("sage.ray")

U = TypeVar("U")


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SageError("executor: ray needs Ray: pip install 'sage-builder[ray]' (on the driver and every "
                        "node), or set executor: local") from None
    return ray


def connect(config: RayConfig) -> Any:
    """Join the configured cluster (or start a local instance); returns the ``ray`` module."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = config.address or os.environ.get("RAY_ADDRESS") or None
    env = {name: os.environ[name] for name in config.env_vars if name in os.environ}
    kwargs: dict[str, Any] = {"namespace": config.namespace, "log_to_driver": True,
                              "runtime_env": {"env_vars": env} if env else None}
    if address and "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ \
            and (Path.home() / ".ray" / "auth_token").exists():
        # `ray start` turns token authentication on when ~/.ray/auth_token exists; a client joining
        # it must say so itself (Ray 2.60 does not infer it), or the GCS answers "InvalidAuthToken".
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=config.num_cpus, include_dashboard=False, **kwargs)
    except ConnectionError as exc:
        raise SageError(f"ray.address: cannot reach a Ray cluster at '{address}' ({str(exc).splitlines()[0][:160]}); "
                        "start one with `ray start --head` (with token authentication, give the driver the "
                        "cluster's token: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or ~/.ray/auth_token), or unset "
                        "RAY_ADDRESS and ray.address to start a local instance") from None
    resources = ray.cluster_resources()
    log.info("ray: %s, %d CPUs, %d GPUs, %d nodes", address or "local instance", int(resources.get("CPU", 0)),
             int(resources.get("GPU", 0)), len([n for n in ray.nodes() if n.get("Alive")]))
    return ray


def cluster_gpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def describe_failure(exc: BaseException, worker: str, unit: str, hint: str) -> str:
    """One line for a failed unit: what happened, to which worker and item, and what to do."""
    exceptions = import_ray().exceptions
    cause: BaseException = exc
    if isinstance(exc, exceptions.RayTaskError):
        cause = getattr(exc, "cause", None) or exc
    if isinstance(exc, exceptions.OutOfMemoryError):
        what = "was killed by Ray's memory monitor (the node ran out of host memory); reserve more CPUs per " \
               "actor (ray.*_num_cpus) so fewer share a node"
    elif isinstance(exc, (exceptions.ActorDiedError, exceptions.ActorUnavailableError)) \
            or isinstance(exc, getattr(exceptions, "NodeDiedError", ())):
        what = "died (its process was killed or its node was lost)"
    else:
        what = describe_exception(cause)
    return failure_line(worker, what, unit, hint)


@dataclass
class _Slot:
    actor: Any
    label: str
    ref: Any = None
    unit: Any = None
    started: float = 0.0


class ActorPool(Generic[U]):
    """A fixed set of actors, one unit in flight per actor, handed out in order."""

    def __init__(self, ray: Any, actors: Sequence[Any], labels: Sequence[str], timeout_s: float,
                 describe_unit: Callable[[U], str], hint: str):
        self.ray = ray
        self.slots = [_Slot(actor, label) for actor, label in zip(actors, labels, strict=True)]
        self.timeout_s = timeout_s
        self.describe_unit = describe_unit
        self.hint = hint

    def run(self, units: Sequence[U], call: Callable[[Any, U], Any]) -> Iterator[tuple[U, Any]]:
        """Yield (unit, result) as units finish; raise SageError after draining if any failed."""
        ray = self.ray
        pending = list(reversed(units))
        errors: list[str] = []
        busy: dict[Any, _Slot] = {}

        def hand_out() -> None:
            for slot in self.slots:
                if slot.ref is None and pending and not errors:
                    slot.unit = pending.pop()
                    slot.ref = call(slot.actor, slot.unit)
                    slot.started = time.monotonic()
                    busy[slot.ref] = slot

        hand_out()
        while busy:
            ready, _ = ray.wait(list(busy), num_returns=1, timeout=1.0)
            for ref in ready:
                slot = busy.pop(ref)
                unit = slot.unit
                slot.ref = slot.unit = None
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - every failure becomes one line
                    errors.append(describe_failure(exc, slot.label, self.describe_unit(unit), self.hint))
                    continue
                yield unit, result
            now = time.monotonic()
            for ref, slot in list(busy.items()):
                if now - slot.started > self.timeout_s:
                    busy.pop(ref)
                    errors.append(f"{slot.label} did not finish {self.describe_unit(slot.unit)} within "
                                  f"ray.task_timeout_s={self.timeout_s:g} s (hung or far too slow); {self.hint}")
                    ray.kill(slot.actor)
                    slot.ref = slot.unit = None
            hand_out()
        raise_first(errors)


def start_actors(ray: Any, actor_cls: Any, args: Sequence[tuple[Any, ...]], options: dict[str, Any],
                 name: str, timeout_s: float, hint: str) -> tuple[list[Any], list[str]]:
    """Start one actor per ``args`` entry, all at once, and wait until each has loaded its model.

    Returns (actors, labels like 'render#0 (host h GPU 0, pid 123)'). ``actor_cls`` has ``start()``,
    which loads what the actor needs and returns ``executors.base.where()``; loading there, not in
    ``__init__``, lets its errors arrive as they were raised.
    """
    n = len(args)
    resources = ray.cluster_resources()
    need_gpus = n * float(options.get("num_gpus") or 0)
    if need_gpus and need_gpus > resources.get("GPU", 0):
        raise SageError(f"{n} {name} actor(s) need {need_gpus:g} GPUs but the Ray cluster has "
                        f"{resources.get('GPU', 0):g}; lower the number of actors or add GPU nodes")
    remote = ray.remote(actor_cls).options(**options)
    actors = [remote.remote(*a) for a in args]
    refs = {actor.start.remote(): i for i, actor in enumerate(actors)}
    labels = [f"{name}#{i}" for i in range(n)]
    deadline = time.monotonic() + timeout_s
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=max(0.1, deadline - time.monotonic()))
            if not ready:
                raise SageError(f"{len(refs)} {name} actor(s) did not start within ray.startup_timeout_s="
                                f"{timeout_s:g} s (the cluster lacks the CPUs/GPUs they reserve: "
                                f"{options}); see `ray status`")
            for ref in ready:
                i = refs.pop(ref)
                try:
                    info = ray.get(ref)
                except Exception as exc:  # noqa: BLE001
                    raise SageError(describe_failure(exc, labels[i], "startup", hint)) from None
                labels[i] = worker_label(name, i, info)
    except BaseException:
        kill_actors(ray, actors)
        raise
    return actors, labels


def kill_actors(ray: Any, actors: Sequence[Any]) -> None:
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
