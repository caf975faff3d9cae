"""What eval reads and renders with: the dataset and adapter folders, and its render settings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sage_builder.errors import StageInputError
from sage_builder.store import RunDir

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig
    from sage_builder.executors import WorkerRequest
    from sage_builder.stages.render.config import RenderConfig


def render_config(config: PipelineConfig) -> RenderConfig:
    """The render section eval renders with: the adapter's base model and eval's own settings."""
    from sage_builder.stages.render.config import RenderConfig

    e, t = config.eval, config.train
    size = e.resolution or t.resolution
    return RenderConfig(backbone=t.backbone, model=e.model or t.model, revision=None if e.model else t.revision,
                        scheduler=e.scheduler, steps=e.steps, guidance=e.guidance, height=size, width=size,
                        negative_prompt=e.negative_prompt, dtype=e.dtype, encoding=e.encoding, quality=e.quality,
                        batch_size=e.batch_size, device=e.device, threads=e.threads)


def worker_request(config: PipelineConfig) -> WorkerRequest:
    """What eval's rendering asks of its executor: one pipeline (and its adapters) per worker, on eval.device.

    On Ray and in units per call it schedules as render does (``ray.render_*``).
    """
    from sage_builder.executors import WorkerRequest

    e, ray = config.eval, config.ray
    return WorkerRequest(name="eval", device=e.device, device_key="eval.device", workers=e.workers,
                         items_per_unit=ray.render_batches_per_task, ray_workers=ray.render_workers,
                         ray_num_cpus=ray.render_num_cpus, ray_num_gpus=ray.render_num_gpus,
                         hint="finished images are saved; rerun the stage to resume")


def dataset_root(config: PipelineConfig, run: RunDir) -> Path:
    return Path(config.eval.dataset) if config.eval.dataset else run.stage("label").file("dataset")


def adapter_dir(config: PipelineConfig, run: RunDir) -> Path:
    return Path(config.eval.adapter) if config.eval.adapter else run.stage("train").file("adapter")


def adapter_folders(config: PipelineConfig, run: RunDir) -> dict[str, Path]:
    folders = {name: Path(path) for name, path in config.eval.adapters.items()}
    if "psa" in config.eval.methods:
        folders["psa"] = adapter_dir(config, run)
    return folders


def check_adapter(folder: Path, label: str) -> None:
    for name in ("adapter.safetensors", "adapter_config.json"):
        if not (folder / name).exists():
            raise StageInputError(f"{label}: {folder} has no {name}; run `sage stage train` or point {label} at a "
                                  "user-adapter folder")
