"""Stage 3 (render): both images of every prompt pair, seeded per pair, sharded, resumable.

Reads ``RUN/prompts/pairs.parquet``; writes ``RUN/render/shards/*.parquet`` (one row per image,
encoded bytes + metadata) and ``RUN/render/index.parquet`` ((pair, variant) -> shard and row).
Finished images live in ``RUN/render/_items/images/`` keyed by image key, so a rerun renders only
what is missing and an interrupted run loses at most the batches in flight.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from sage_builder.errors import StageInputError
from sage_builder.executors import WorkerRequest, make_executor
from sage_builder.stages.base import Stage, StageContext, StageOptions, StagePlan
from sage_builder.stages.render.screen import check_screen, screen_rendered
from sage_builder.stages.render.shards import PlannedImage, assemble_shards
from sage_builder.store import RunDir

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig
    from sage_builder.planning import MeasuredCost
    from sage_builder.diffusion import ImageJob, RenderSettings

log = logging.getLogger("sage.render")

PAIRS_FILE = "pairs.parquet"
PAIR_COLUMNS = ["pair_id", "prompt_unsafe", "prompt_safe"]


def read_pairs(path: Any) -> list[dict[str, Any]]:
    """The pairs to render, validated: a one-line error names the first bad pair."""
    schema = pq.read_schema(path)
    missing = [c for c in PAIR_COLUMNS if c not in schema.names]
    if missing:
        raise StageInputError(f"{path}: column '{missing[0]}' is missing; rerun stage 'prompts' (--force)")
    rows = pq.read_table(path, columns=PAIR_COLUMNS).to_pylist()
    seen: set[str] = set()
    for number, row in enumerate(rows):
        pair_id = row["pair_id"]
        if not pair_id:
            raise StageInputError(f"{path}: row {number} has no pair_id; rerun stage 'prompts' (--force)")
        if pair_id in seen:
            raise StageInputError(f"{path}: pair '{pair_id}' appears twice; rerun stage 'prompts' (--force)")
        seen.add(pair_id)
        for column in ("prompt_unsafe", "prompt_safe"):
            if not isinstance(row[column], str) or not row[column].strip():
                raise StageInputError(f"{path}: pair '{pair_id}' has no {column}; fix or regenerate it "
                                      f"(rerun stage 'prompts')")
    return rows


def plan_images(pairs: list[dict[str, Any]], settings: RenderSettings,
                global_seed: int) -> tuple[list[PlannedImage], list[ImageJob]]:
    """(one PlannedImage per pair and variant, one ImageJob per distinct key), both in pairs order."""
    from sage_builder.diffusion import ImageJob, image_key, pair_seed

    planned, jobs, seen = [], [], set()
    for pair in pairs:
        seed = pair_seed(global_seed, pair["pair_id"])
        for variant, column in (("u", "prompt_unsafe"), ("s", "prompt_safe")):
            prompt = pair[column]
            key = image_key(prompt, seed, settings)
            planned.append(PlannedImage(pair["pair_id"], variant, key))
            if key not in seen:
                seen.add(key)
                jobs.append(ImageJob(key, prompt, seed))
    return planned, jobs


def worker_request(config: PipelineConfig) -> WorkerRequest:
    """What render asks of its executor: one pipeline per worker, on render.device."""
    r, ray = config.render, config.ray
    return WorkerRequest(name="render", device=r.device, device_key="render.device", workers=r.workers,
                         items_per_unit=ray.render_batches_per_task, ray_workers=ray.render_workers,
                         ray_num_cpus=ray.render_num_cpus, ray_num_gpus=ray.render_num_gpus,
                         hint="finished images are saved; rerun the stage to resume")


@dataclass(frozen=True)
class RenderOptions(StageOptions):
    contact_sheet: int = 0  # also write a PNG grid of this many pairs (a viewing aid, not an output)


class RenderStage(Stage):
    name = "render"
    distributed = True
    options_type = RenderOptions
    inputs = ("prompts",)
    summary = "render both images of every prompt pair with SDXL (or SD1.5)"

    def model_ids(self, config: PipelineConfig) -> dict[str, dict[str, Any]]:
        r = config.render
        return {"render": {"model": r.model, "revision": r.revision, "backbone": r.backbone}}

    def fingerprint_parts(self, config: PipelineConfig) -> dict[str, Any]:
        return {"seed": config.seed}

    def check(self, config: PipelineConfig, run: RunDir) -> None:
        from sage_builder.diffusion import locate_model

        locate_model(config.render)
        check_screen(config.render.screen, config.categories)
        pairs = run.stage("prompts").file(PAIRS_FILE)
        if run.stage("prompts").read_manifest() is not None and pairs.exists():
            read_pairs(pairs)

    def plan(self, config: PipelineConfig) -> StagePlan:
        p, r = config.prompts, config.render
        n_pairs = len(config.categories) * p.concepts_per_category * p.pairs_per_concept
        per_image = r.estimated_seconds_per_image()
        source = "render.seconds_per_image" if r.seconds_per_image else \
            "2.5 s/image (SDXL 1024 px, 30 steps, A100, bf16+compile) scaled by steps and pixels"
        return StagePlan(items=2 * n_pairs, unit="images", gpu_seconds=2 * n_pairs * per_image,
                         notes=[f"{per_image:.2f} GPU-s per image: {source}"])

    def run(self, ctx: StageContext) -> None:
        from sage_builder.diffusion import RenderSettings, locate_model
        from sage_builder.stages.render.levers import RenderLevers
        from sage_builder.stages.render.workers import render_missing

        config = ctx.config.render
        pairs = read_pairs(ctx.input_path("prompts", PAIRS_FILE))
        executor = make_executor(ctx.config, worker_request(ctx.config))
        device = executor.device
        _, revision = locate_model(config)
        settings = RenderSettings.from_config(config, device)
        planned, jobs = plan_images(pairs, settings, ctx.config.seed)

        cache = ctx.stage_dir.items("images")
        done = cache.done_keys()
        todo = [job for job in jobs if job.key not in done]
        log.info("render: %d pairs, %d images, %d already rendered, %d to render on %s (executor %s)", len(pairs),
                 len(jobs), len(jobs) - len(todo), len(todo), device, executor.name)
        started = time.monotonic()
        written, units = render_missing(executor, config, settings, revision, jobs, done, cache)
        render_seconds = time.monotonic() - started
        if config.screen.enabled:
            # Rerenders go through the same executor; images of dropped pairs stay out of the shards.
            planned = screen_rendered(ctx, pairs, planned, settings, executor, lambda more: render_missing(
                executor, config, settings, revision, more, cache.done_keys(), cache)[0])

        shard_names, index = assemble_shards(ctx.stage_dir.path, cache, planned, config.shard_mb * 1_000_000)
        for name in shard_names:
            ctx.add_output(name)
        ctx.write_table("index.parquet", index)
        ctx.models["render"]["resolved_revision"] = revision
        ctx.stats.update({
            "pairs": len(pairs), "images": len(jobs), "rendered_now": written, "reused": len(jobs) - len(todo),
            "shards": len(shard_names), "device": device, "dtype": settings.dtype, "encoding": settings.encoding,
            "quality": settings.quality, "levers": RenderLevers.from_config(config).describe(),
            "render_seconds": round(render_seconds, 2),
            "images_per_second": round(written / render_seconds, 3) if written and render_seconds > 0 else None,
            **executor.facts(units),  # executor, workers (and on Ray its actors and units)
        })

    def measured_cost(self, run: RunDir, pilot: PipelineConfig) -> MeasuredCost | None:
        """Render-seconds x workers per image rendered now (images from the item cache cost nothing)."""
        from sage_builder.planning import MeasuredCost

        manifest = run.stage(self.name).read_manifest()
        stats = manifest.stats if manifest is not None else {}
        written = stats.get("rendered_now") or 0
        workers = stats.get("ray_workers") or stats.get("workers") or 1
        if not written or not stats.get("render_seconds"):
            return None
        device = str(stats.get("device", "cpu"))
        return MeasuredCost(stats["render_seconds"] * workers / written, 1.0 if device.startswith("cuda") else 0.0,
                            device, f"{run.root}/render ({written} images on {workers} {device} worker(s))",
                            unit="image")

    def extras(self, run: RunDir, config: PipelineConfig, options: RenderOptions) -> None:  # type: ignore[override]
        n = options.contact_sheet
        if n > 0:
            from sage_builder.stages.render.contact_sheet import write_contact_sheet

            path = write_contact_sheet(run.stage(self.name).path, n)
            log.info("render: contact sheet of %d pairs -> %s", n, path)


STAGE = RenderStage()
