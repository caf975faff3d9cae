"""Stage 6 (train): the user-conditioned cross-attention adapter, trained with Diffusion-DPO on the
stage-4 dataset, then the levels x prompts grid rendered with it.

Outputs in ``RUN/train/``: ``adapter/`` (adapter.safetensors, written byte-reproducibly, +
adapter_config.json with portable references only, README.md the model card, sage_user_adapter.py
to load it without this package; see docs/adapter.md), ``metrics.parquet`` (one row per optimizer step of the whole run: the rows
are checkpointed with the training state, so a killed and resumed run has the same rows as an
uninterrupted one), ``eval.json`` (implicit accuracy on the held-out split), ``grid.png``; working
files: ``checkpoints/`` (resume), ``cache/`` (latents and text embeddings, content-keyed),
``logs/`` (TensorBoard).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_builder.errors import ConfigError, SageError, StageInputError
from sage_builder.stages.base import Stage, StageContext, StagePlan
from sage_builder.store import Manifest, RunDir, atomic_write_text, stable_hash

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig

log = logging.getLogger("sage.train")
# One SDXL DPO micro-batch of 2 pairs at 1024 px (policy + reference passes, cached latents, bf16),
# measured by benchmarks/gpu/bench_train_gpu.py on an H200: 0.368 s (BENCHMARKS.md).
SDXL_SECONDS_PER_MICRO_BATCH = 0.37


def dataset_source(config: PipelineConfig, run: RunDir) -> str:
    return config.train.dataset or str(run.stage("label").file("dataset"))


def verify_label_dataset(run: RunDir, manifest: Manifest) -> None:
    """The run's stage-4 dataset folder holds no file that ``label/manifest.json`` does not list.

    The run store has already checked the listed files (size and mtime; the hash when the mtime
    moved), but a stray shard beside them would still be read by the dataset loader. Each image is
    also checked against its pair's ``sha256_*`` column as it is read (``PreferenceData.image_bytes``),
    which catches a changed byte even when the file's size and mtime were kept.
    """
    label = run.stage("label")
    root = label.file("dataset")
    fix = f"rerun `{run.stage_command('label', '--force')}` to rewrite the dataset"
    recorded = {rel.removeprefix("dataset/") for rel in manifest.outputs if rel.startswith("dataset/")}
    if not recorded:
        raise StageInputError(f"{label.manifest_path}: lists no files of {root}, so the dataset cannot be verified; "
                              f"{fix}")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if rel.as_posix() not in recorded and not any(part.startswith(".") for part in rel.parts):
            raise StageInputError(f"{path}: not listed in {label.manifest_path} (a stray file the dataset loader "
                                  f"would read); remove it, or {fix}")


def adapter_lineage(run: RunDir, label: Manifest) -> dict[str, dict[str, str]]:
    """Manifest hash and fingerprint of stages 1-4 of the run, for the adapter's card."""
    out = {}
    for stage in ("profiles", "prompts", "render"):
        manifest = run.stage(stage).read_manifest()
        if manifest is not None:
            out[stage] = {"content_hash": manifest.content_hash(), "fingerprint": manifest.fingerprint}
    out["label"] = {"content_hash": label.content_hash(), "fingerprint": label.fingerprint}
    return out


def resume_fingerprint(config: PipelineConfig, run: RunDir) -> str:
    """What a checkpoint must match to be resumed: the train section and the exact input data."""
    cfg = config.train
    data = cfg.dataset or run.manifest_of("label", needed_by="train").content_hash()
    return stable_hash(cfg, data)


class TrainStage(Stage):
    name = "train"
    inputs = ("label",)
    summary = "user adapter trained with Diffusion-DPO; levels x prompts grid"
    # --force starts over: no item parts and no checkpoint to resume from.
    resume_state = ("_items", "checkpoints")

    def resume_problem(self, config: PipelineConfig, run: RunDir) -> str | None:
        from sage_builder.stages.train.trainer import CHECKPOINT_PREFIX

        folder = run.stage(self.name).file("checkpoints")
        found = sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer.json").exists()) \
            if folder.exists() and config.train.resume else []
        if found and json.loads((found[-1] / "trainer.json").read_text()).get("fingerprint") \
                != resume_fingerprint(config, run):
            return (f"{found[-1]}: checkpoint made with another train config or dataset; restore that config, "
                    f"or start over with `{run.stage_command(self.name, '--force')}`")
        return None

    def model_ids(self, config: PipelineConfig) -> dict[str, dict[str, Any]]:
        return {"base": {"id": config.train.model, "revision": config.train.revision,
                         "backbone": config.train.backbone}}

    def fingerprint_parts(self, config: PipelineConfig) -> dict[str, Any]:
        return {"dataset": config.train.dataset}

    def check(self, config: PipelineConfig, run: RunDir) -> None:
        cfg = config.train
        if cfg.resolution % 8:
            raise ConfigError(f"train.resolution: {cfg.resolution} is not a multiple of 8")
        if cfg.model.startswith("/") and not (Path(cfg.model) / "model_index.json").exists():
            raise StageInputError(f"train.model: {cfg.model} is not a diffusers pipeline folder (no model_index.json); "
                                  f"run `make models` for the tiny demo models")
        if cfg.stop_at_step is not None and cfg.stop_at_step > cfg.max_steps:
            raise ConfigError(f"train.stop_at_step ({cfg.stop_at_step}) is beyond train.max_steps ({cfg.max_steps})")

    def plan(self, config: PipelineConfig) -> StagePlan:
        cfg = config.train
        micro = cfg.max_steps * cfg.gradient_accumulation
        gpu = micro * SDXL_SECONDS_PER_MICRO_BATCH * cfg.batch_size / 2 if cfg.backbone == "sdxl" and cfg.resolution >= 512 else None
        return StagePlan(items=cfg.max_steps, unit="optimizer steps", gpu_seconds=gpu, scales_with_gpus=False, notes=[
            f"{micro} micro-batches of {cfg.batch_size} pairs per GPU ({2 * cfg.batch_size * micro} images per GPU), "
            f"{cfg.optimizer} lr {cfg.learning_rate:g} ({cfg.lr_scheduler}, {cfg.warmup_steps} warmup), beta {cfg.beta:g}",
            f"GPU-hours assume {SDXL_SECONDS_PER_MICRO_BATCH} s per 2 pairs of a micro-batch (measured on an H200) "
            f"on one GPU; with N GPUs (accelerate) the wall time stays and the global batch and GPU-hours grow N-fold",
            *([f"train.gradient_checkpointing: the GPU-hours leave out its recompute (not measured on a GPU; "
               f"1.3-1.5x the CPU time per step on the tiny SDXL)"] if cfg.gradient_checkpointing else [])])

    def run(self, ctx: StageContext) -> None:
        from sage_builder.config_base import model_identity, public_model_ref
        from sage_builder.adapter import CARD_NAME, CONFIG_NAME, STANDALONE_NAME, WEIGHTS_NAME
        from sage_builder.stages.train.card import adapter_card, base_model_refs, dataset_refs
        from sage_builder.stages.train.data import load_preference_data
        from sage_builder.stages.train.generate import render_grid, users_from_dataset
        from sage_builder.stages.train.trainer import AdapterTrainer, load_base_pipeline

        config, cfg = ctx.config, ctx.config.train
        source = dataset_source(config, ctx.run)
        if not cfg.dataset:
            verify_label_dataset(ctx.run, ctx.input("label"))
        data = load_preference_data(source, [cfg.train_split], optional=[cfg.eval_split] if cfg.eval_split else [])
        fingerprint = resume_fingerprint(config, ctx.run)
        trainer = AdapterTrainer(cfg, data, ctx.stage_dir.path, fingerprint,
                                 lambda dtype: load_base_pipeline(cfg.backbone, cfg.model, cfg.revision, dtype),
                                 cfg.model)
        try:
            result = trainer.train(data.splits[cfg.train_split])
            if not result.finished:
                raise SageError(f"train: stopped at step {result.step} of {cfg.max_steps} (train.stop_at_step); "
                                f"run the stage again without it to continue from {trainer.checkpoint_dir}")
            log.info("train: %d steps done; evaluating and saving", result.step)
            evaluation: dict[str, Any] = {"records": 0}
            if cfg.eval_split and data.splits[cfg.eval_split]:
                held_out = data.splits[cfg.eval_split]
                evaluation = trainer.evaluate(held_out[: cfg.eval_records] if cfg.eval_records else held_out)
            if not trainer.accelerator.is_main_process:
                return
            label_manifest = ctx.input("label")
            refs = {**base_model_refs(cfg.model, cfg.revision),
                    **dataset_refs(cfg.dataset, model_identity(cfg.dataset) if cfg.dataset else label_manifest.content_hash()),
                    "embedding_model": public_model_ref(config.profiles.embedding_model or config.llm.model)}
            trainer.adapter.config = replace(trainer.adapter.config, **refs)
            adapter_dir = ctx.stage_dir.file("adapter")
            trainer.adapter.save(adapter_dir, steps=result.step, beta=cfg.beta,
                                 learning_rate=cfg.learning_rate, optimizer=cfg.optimizer, resolution=cfg.resolution,
                                 dataset_fingerprint=fingerprint)
            evaluation_card = {"split": cfg.eval_split, **{k: v for k, v in evaluation.items() if k != "z"}}
            records = {split: len(rows) for split, rows in data.splits.items()}
            atomic_write_text(adapter_dir / CARD_NAME, adapter_card(
                json.loads((adapter_dir / CONFIG_NAME).read_text()), lineage=adapter_lineage(ctx.run, label_manifest),
                records=records, evaluation=evaluation_card, embedding_model=refs["embedding_model"],
                categories=list(config.categories)))
            for name in (WEIGHTS_NAME, CONFIG_NAME, STANDALONE_NAME, CARD_NAME):
                ctx.add_output(f"adapter/{name}")
            if result.metrics:
                import pyarrow as pa

                ctx.write_table("metrics.parquet", pa.Table.from_pylist(result.metrics))
            summary = {k: v for k, v in evaluation.items() if k != "z"}
            atomic_write_text(ctx.stage_dir.file("eval.json"), json.dumps(
                {"split": cfg.eval_split, **summary, "z": evaluation.get("z", [])}, indent=2))
            ctx.add_output("eval.json")
            if cfg.grid.enabled:
                log.info("train: rendering the levels x prompts grid")
                self._grid(ctx, trainer, data, source, render_grid, users_from_dataset)
            last = result.metrics[-1] if result.metrics else {}
            ctx.stats.update({
                "steps": result.step, "records": len(data.splits[cfg.train_split]),
                "n_user_tokens": cfg.n_user_tokens, "final_loss": last.get("loss"),
                "final_train_accuracy": last.get("implicit_accuracy"),
                f"{cfg.eval_split}_implicit_accuracy": summary.get("implicit_accuracy"),
                f"{cfg.eval_split}_reward_margin": summary.get("reward_margin"),
                "cache": result.cache, "seconds": round(result.seconds, 1)})
        finally:
            trainer.close()

    def _grid(self, ctx: StageContext, trainer: Any, data: Any, source: str, render_grid: Any,
              users_from_dataset: Any) -> None:
        cfg = ctx.config.train
        levels = sorted(data.levels)
        if not levels:
            log.warning("train: no reference users (level 0-5) in %s; grid.png not written", source)
            return
        pipeline = trainer.frozen.pipeline
        pipeline.set_progress_bar_config(disable=True)
        grid = render_grid(pipeline, trainer.adapter, users_from_dataset(source, levels=levels), cfg.grid.prompts,
                           cfg.grid.scale, cfg.grid.steps, cfg.grid.guidance, cfg.grid.seed, cfg.resolution)
        path = ctx.stage_dir.file("grid.png")
        from sage_builder.store import atomic_path

        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        ctx.add_output("grid.png")


STAGE = TrainStage()
