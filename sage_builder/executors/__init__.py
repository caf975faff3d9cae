"""Where a stage's work runs: in this process (``executor: local``) or on a Ray cluster (``executor: ray``).

Stages decide *what* to compute and cut it into item-keyed units; an executor only decides *where*
the units run. Both write the same item parts and manifests, so the outputs do not depend on the
executor. ``ray`` is imported only by :mod:`sage_builder.executors.ray_cluster` and its users.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig
    from sage_builder.llm.base import LLMBackend

log = logging.getLogger("sage.ray")


def make_stage_backend(config: PipelineConfig) -> LLMBackend:
    """The LLM backend a stage uses: in-process, or engine actors on Ray (``executor: ray``)."""
    from sage_builder.llm.factory import make_backend

    if config.executor == "ray" and config.llm.backend != "openai":
        from sage_builder.executors.ray_llm import RayLLMBackend

        backend: LLMBackend = RayLLMBackend(config)
        backend.check_ready()
        return backend
    if config.executor == "ray":
        log.info("ray: llm.backend openai sends requests from the driver to %s; scale that server out",
                 config.llm.base_url)
    return make_backend(config.llm)
