"""The ``ray:`` section of a pipeline config: how the Ray executor uses a cluster.

Every field here schedules work and never changes it, so the whole section stays out of item keys
and fingerprints: a run switched between ``executor: local`` and ``executor: ray`` (or to another
cluster size) reuses every finished item.
"""

from __future__ import annotations

from pydantic import Field

from sage_builder.config_base import StrictModel, execution


class RayConfig(StrictModel):
    address: str | None = execution(
        None, description="cluster to join: 'auto' (a `ray start` cluster on this node), host:6379 or "
        "ray://host:10001; default: $RAY_ADDRESS if set, else a local Ray instance started for the run")
    namespace: str = execution("sage", description="Ray namespace of the run's actors")
    num_cpus: int | None = execution(None, ge=1, description="local instance only: CPUs it may use "
                                      "(default: all)")
    llm_replicas: int = execution(1, ge=1, description="LLM engine actors (each loads the model once)")
    llm_num_gpus: float | None = execution(
        None, ge=0, description="GPUs per LLM actor; default llm.tensor_parallel_size for the vllm "
        "backend, 0 for transformers on CPU, 1 for transformers on CUDA")
    llm_num_cpus: float = execution(1, ge=0, description="CPUs reserved per LLM actor")
    llm_requests_per_task: int = execution(
        256, ge=1, description="vllm backend: requests per engine call sent to an actor (the transformers "
        "backend sends its own llm.batch_size chunks)")
    render_workers: int | None = execution(
        None, ge=1, description="render actors; default one per GPU of the cluster (or 1 without GPUs)")
    render_num_gpus: float | None = execution(None, ge=0, description="GPUs per render actor; default 1 on "
                                              "CUDA, 0 on CPU")
    render_num_cpus: float = execution(1, ge=0, description="CPUs reserved per render actor (on CPU also its "
                                       "torch threads)")
    render_batches_per_task: int = execution(
        2, ge=1, description="render batches per call to an actor (or to a local worker process with "
        "render.workers > 1): larger keeps the encoder/writer overlap, smaller loses less work to a crash")
    task_timeout_s: float = execution(1800.0, gt=0, description="a call running longer counts as hung: "
                                      "the stage stops with a message (finished items are kept)")
    startup_timeout_s: float = execution(1800.0, gt=0, description="time an actor may take to load its "
                                         "model before the stage stops")
    env_vars: list[str] = Field(
        default_factory=lambda: ["HF_HUB_OFFLINE", "HF_HOME", "HF_TOKEN", "TOKENIZERS_PARALLELISM",
                                 "HF_HUB_DISABLE_XET", "TRANSFORMERS_OFFLINE"],
        json_schema_extra={"execution": True},
        description="environment variables of the driver passed to every actor (if set)")
