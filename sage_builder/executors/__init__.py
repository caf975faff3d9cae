"""Where a stage's work runs: in this process (``executor: local``) or on a Ray cluster (``executor: ray``).

Stages decide *what* to compute and cut it into item-keyed units; an executor only decides *where*
the units run (:mod:`sage_builder.executors.base` is the seam). Both write the same item parts and
manifests, so the outputs do not depend on the executor. This module is the one place that reads
``executor:``; ``ray`` is imported only by the ``ray_*`` modules here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sage_builder.executors.base import Executor, WorkerRequest

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig
    from sage_builder.llm.base import LLMBackend

log = logging.getLogger("sage.ray")

__all__ = ["Executor", "WorkerRequest", "check_executor", "make_executor", "make_stage_backend"]


def on_ray(config: PipelineConfig) -> bool:
    return config.executor == "ray"


def check_executor(config: PipelineConfig) -> None:
    """Before a distributed stage writes anything: Ray missing is one line now, not a failure later."""
    if on_ray(config):
        from sage_builder.executors.ray_cluster import import_ray

        import_ray()


def make_executor(config: PipelineConfig, request: WorkerRequest) -> Executor:
    """The executor of a distributed stage's units: local processes, or actors on the Ray cluster."""
    if on_ray(config):
        from sage_builder.executors.ray_executor import RayExecutor

        return RayExecutor(request, config.ray)
    from sage_builder.executors.local import local_executor

    return local_executor(request)


def make_stage_backend(config: PipelineConfig) -> LLMBackend:
    """The LLM backend a stage uses: in-process, or engine actors on Ray (``executor: ray``)."""
    from sage_builder.llm.factory import make_backend

    if on_ray(config) and config.llm.backend != "openai":
        from sage_builder.executors.ray_llm import RayLLMBackend

        backend: LLMBackend = RayLLMBackend(config)
        backend.check_ready()
        return backend
    if on_ray(config):
        log.info("ray: llm.backend openai sends requests from the driver to %s; scale that server out",
                 config.llm.base_url)
    return make_backend(config.llm)
