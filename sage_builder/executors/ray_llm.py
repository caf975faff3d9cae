"""LLM stages on Ray: engine actors (vLLM, or transformers on CPU/GPU) behind the usual backend.

:class:`RayLLMBackend` is an :class:`LLMBackend` like the others, so stages 1 and 2 do not change:
the validate-retry-reject loop, the per-request seeds and the item-keyed writes stay in the driver.
Only the engine calls move. A batch is cut into engine calls exactly as the in-process backend
cuts it (``plan_chunks``), each call goes to an idle actor, and replies come back as plain text:
the rows equal a local run's wherever the engine is deterministic for a fixed call composition
(transformers; vLLM on GPU batches continuously, so it is not bit-reproducible locally either).

Requests travel as :class:`WireRequest` (plain data); reply models and checks never leave the
driver. With ``llm.backend: openai`` there is no engine to place: requests go from the driver to
the server, which is the unit to scale (run several behind a load balancer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sage_builder.executors.base import where
from sage_builder.executors.ray_cluster import ActorPool, connect, kill_actors, start_actors
from sage_builder.llm.base import LLMBackend, LLMRequest, TransportFailure, WireRequest

if TYPE_CHECKING:
    from sage_builder.config import LLMConfig, PipelineConfig

log = logging.getLogger("sage.ray")

RERUN = "finished items are saved; rerun the stage to resume"


def _local_class(config: LLMConfig) -> type[LLMBackend]:
    if config.backend == "vllm":
        from sage_builder.llm.vllm_backend import VLLMBackend

        return VLLMBackend
    from sage_builder.llm.transformers_backend import TransformersBackend

    return TransformersBackend


class LLMEngineActor:
    """One engine (one model load) in a Ray worker; serves engine calls of plain requests."""

    def __init__(self, config: LLMConfig, threads: int = 1):
        self.config = config
        self.threads = threads
        self.backend: LLMBackend | None = None

    def start(self) -> dict[str, Any]:
        if self.config.backend == "transformers" and self.config.device == "cpu":
            import torch

            torch.set_num_threads(self.threads)
        backend = _local_class(self.config)(self.config)
        if self.config.backend == "vllm" and self.config.tensor_parallel_size > 1:
            # TP inside a Ray actor: vLLM's own worker processes on the actor's GPUs (vllm#30016).
            backend.engine_kwargs["distributed_executor_backend"] = "mp"  # type: ignore[attr-defined]
        backend.check_ready()
        self.backend = backend
        return where()

    def complete(self, chunk: list[tuple[WireRequest, int]]) -> list[tuple[str, str | TransportFailure]]:
        assert self.backend is not None, "start() first"
        return list(self.backend._complete(chunk))  # noqa: SLF001 - the engine call itself


def llm_gpus(config: PipelineConfig, cluster_gpus: int) -> float:
    if config.ray.llm_num_gpus is not None:
        return config.ray.llm_num_gpus
    llm = config.llm
    if llm.backend == "vllm":
        return float(llm.tensor_parallel_size)
    if llm.device.startswith("cuda") or (llm.device == "auto" and cluster_gpus > 0):
        return 1.0
    return 0.0


class RayLLMBackend(LLMBackend):
    """``llm.backend`` (transformers or vllm) served by ``ray.llm_replicas`` actors."""

    def __init__(self, pipeline: PipelineConfig):
        super().__init__(pipeline.llm)
        self.name = pipeline.llm.backend
        self.pipeline = pipeline
        self.ray: Any = None
        self.pool: ActorPool[list[tuple[WireRequest, int]]] | None = None
        self.actors: list[Any] = []
        self.gpus = 0.0

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "executor": "ray", "replicas": self.pipeline.ray.llm_replicas}

    def engines(self) -> tuple[int, float]:
        return len(self.actors) or self.pipeline.ray.llm_replicas, self.gpus

    def check_ready(self) -> None:
        if self.pool is not None:
            return
        from sage_builder.executors.ray_cluster import cluster_gpus

        rc = self.pipeline.ray
        self.ray = connect(rc)
        gpus = self.gpus = llm_gpus(self.pipeline, cluster_gpus(self.ray))
        options = {"num_cpus": rc.llm_num_cpus, "num_gpus": gpus, "max_restarts": 0}
        if self.config.device == "auto" and gpus == 0:
            # Resolved here, not per node: a CPU actor on a GPU node must not pick the GPU up.
            self.config = self.config.model_copy(update={"device": "cpu"})
        args = [(self.config, max(1, int(rc.llm_num_cpus)))] * rc.llm_replicas
        self.actors, labels = start_actors(self.ray, LLMEngineActor, args, options, "llm", rc.startup_timeout_s,
                                           RERUN)
        log.info("ray: %d LLM actor(s) ready: %s", len(labels), "; ".join(labels))
        self.pool = ActorPool(self.ray, self.actors, labels, rc.task_timeout_s, _describe_chunk, RERUN)

    def _chunks(self, batch: Sequence[tuple[LLMRequest, int]]) -> list[list[tuple[WireRequest, int]]]:
        wire = [(request.to_wire(), seed) for request, seed in batch]
        chunks = _local_class(self.config).plan_chunks(self.config, wire)
        if self.config.backend == "vllm":
            # One engine call locally; spread over the replicas in calls of bounded size.
            size = self.pipeline.ray.llm_requests_per_task
            chunks = [chunk[i:i + size] for chunk in chunks for i in range(0, len(chunk), size)]
        return chunks

    def _complete(self, batch: Sequence[tuple[LLMRequest, int]]) -> Iterator[tuple[str, str | TransportFailure]]:
        self.check_ready()
        assert self.pool is not None
        for _chunk, replies in self.pool.run(self._chunks(batch), lambda actor, chunk: actor.complete.remote(chunk)):
            yield from replies

    def close(self) -> None:
        if self.ray is not None:
            kill_actors(self.ray, self.actors)
        self.actors, self.pool = [], None


def _describe_chunk(chunk: list[tuple[WireRequest, int]]) -> str:
    first = chunk[0][0].key if chunk else "?"
    return f"an engine call of {len(chunk)} request(s) (first item {first})"
