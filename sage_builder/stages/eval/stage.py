"""Stage 7 (eval): the paper's results tables from the trained adapter, in one command.

Reads the stage-4 dataset (test splits and users; or ``eval.prompts_csv``) and the stage-6 adapter;
renders every prompt with each method (same per-prompt seed, the render engine's batching), scores
each image (NudeNet, Q16, optionally open_nsfw; a VLM judge when a server is configured), computes
FID against base's images (and a reference folder) and CLIP score when weights are there, and writes
in ``RUN/eval/``: ``shards/images-*.parquet``, ``items.parquet``, ``scores.parquet`` (one row per
image per scorer), ``summary.json``, ``report.md`` and the plots ``ip_by_level.png`` and
``grid_level_<L>.png``. Every image, score, judge answer and feature vector is item-cached under
``RUN/eval/_items/``, so a rerun computes only what is missing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_builder.errors import StageInputError
from sage_builder.stages.base import Stage, StageContext, StagePlan
from sage_builder.stages.eval.inputs import adapter_dir, adapter_folders, check_adapter, dataset_root, render_config
from sage_builder.store import RunDir, atomic_write_text

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig
    from sage_builder.planning import MeasuredCost

log = logging.getLogger("sage.eval")


def planned_prompts(config: PipelineConfig) -> int:
    """Prompts per prompt set expected from the config alone (the test users x records per user)."""
    e, p = config.eval, config.profiles
    if e.prompts_csv is not None:
        path = Path(e.prompts_csv)
        rows = max(0, sum(1 for _ in path.open(encoding="utf-8-sig")) - 1) if path.exists() else 0
        return min(rows, e.max_prompts or rows)
    if p.splits.method == "psalign":
        users = min(50, p.n_users)
    else:
        s = p.splits
        total = s.train + s.val + s.test_unseen
        users = max(1, int(math.floor(p.n_users * s.test_unseen / total + 0.5))) if total else 0
    prompts = users * len(config.categories) * config.label.pairs_per_category
    return min(prompts, e.max_prompts or prompts)


class EvalStage(Stage):
    name = "eval"
    distributed = True  # rendering: eval.workers local processes, or Ray actors (executor: ray)
    inputs = ("label", "train")
    summary = "render the test prompts per method; IP, judge pass/win, FID, CLIP score; report and plots"

    def model_ids(self, config: PipelineConfig) -> dict[str, dict[str, Any]]:
        e, r = config.eval, render_config(config)
        ids: dict[str, dict[str, Any]] = {"base": {"id": r.model, "revision": r.revision, "backbone": r.backbone}}
        if "q16" in e.scorers:
            ids["q16"] = {"id": e.q16.clip_model, "revision": e.q16.revision}
        if e.judge.enabled:
            ids["judge"] = {"id": e.judge.model}
        if e.clip_score.model:
            ids["clip_score"] = {"id": e.clip_score.model, "revision": e.clip_score.revision}
        return ids

    def templates(self, config: PipelineConfig) -> dict[str, Path]:
        j = config.eval.judge
        return {"eval_judge_pass": Path(j.pass_template), "eval_judge_win": Path(j.win_template)} if j.enabled else {}

    def fingerprint_parts(self, config: PipelineConfig) -> dict[str, Any]:
        # eval.model/resolution default to train's: the resolved render section decides the images.
        return {"seed": config.seed, "categories": config.categories, "render": render_config(config)}

    def check(self, config: PipelineConfig, run: RunDir) -> None:
        from sage_builder.stages.eval.fid import locate_weights
        from sage_builder.stages.eval.prompt_sets import load_prompt_sets, load_users
        from sage_builder.diffusion import locate_model

        e = config.eval
        try:
            locate_model(render_config(config))
        except StageInputError as exc:
            raise StageInputError(str(exc).replace("render.model", "eval.model (default train.model)")) from None
        for name, folder in config.eval.adapters.items():
            check_adapter(Path(folder), f"eval.adapters.{name}")
        if e.fid.enabled:
            locate_weights(e.fid.weights)
        if e.fid.enabled and e.fid.reference_dir is not None:
            from sage_builder.stages.eval.fid import reference_images

            reference_images(Path(e.fid.reference_dir))
        if e.clip_score.model:
            from sage_builder.stages.eval.clip_score import locate

            locate(e.clip_score.model, e.clip_score.revision)
        root = dataset_root(config, run)
        if e.dataset is not None or run.stage("label").read_manifest() is not None:
            users = load_users(root)
            load_prompt_sets(root, list(e.splits), Path(e.prompts_csv) if e.prompts_csv else None, users,
                             list(config.categories), e.max_prompts)
        if "psa" in e.methods and (e.adapter is not None or run.stage("train").read_manifest() is not None):
            check_adapter(adapter_dir(config, run), "eval.adapter")

    def plan(self, config: PipelineConfig) -> StagePlan:
        e = config.eval
        prompts = planned_prompts(config)
        sets = 1 if e.prompts_csv else len(e.splits)
        own = list(e.methods) + list(e.adapters)  # each renders the test user's own image
        per_prompt = len(own) + (len(e.levels) if "psa" in e.methods else 0)
        images = sets * prompts * per_prompt
        judge_calls = None
        if e.judge.enabled:
            judge_calls = sets * prompts * len(own)
            if e.judge.win_rate and "base" in e.methods:
                judge_calls += sets * prompts * (len(own) - 1)
        per_image = render_config(config).estimated_seconds_per_image()
        notes = [f"{sets} prompt set(s) x {prompts} prompts x {per_prompt} images each (methods "
                 f"{', '.join(own)}" + (f"; PSA at levels {e.levels}" if "psa" in e.methods else "") + "); equal "
                 "captions share base's and the levels' images, so the images rendered are at most this",
                 f"{per_image:.2f} GPU-s per image (render's estimate at {e.steps} steps), scorers not counted"]
        if e.judge.enabled:
            notes.append(f"judge: {sets * prompts * len(own)} pass requests"
                         + (f" + {sets * prompts * (len(own) - 1)} A/B requests vs base" if e.judge.win_rate else ""))
        return StagePlan(items=images, unit="images", llm_calls=judge_calls, gpu_seconds=images * per_image,
                         notes=notes)

    def measured_cost(self, run: RunDir, pilot: PipelineConfig) -> MeasuredCost | None:
        """Seconds per image of the whole stage: render-seconds x workers per image rendered now, plus
        scoring, judge and FID/CLIP seconds per image scored (``sage plan --measured``)."""
        from sage_builder.planning import MeasuredCost

        manifest = run.stage(self.name).read_manifest()
        stats = manifest.stats if manifest is not None else {}
        phases, written, images = stats.get("phase_seconds") or {}, stats.get("rendered_now") or 0, stats.get("images")
        if not written or not phases.get("render") or not images:
            return None
        workers = stats.get("ray_workers") or stats.get("workers") or 1
        device = str(stats.get("render_device", "cpu"))
        rest = sum(v for k, v in phases.items() if k != "render")
        seconds = phases["render"] * workers / written + rest / images
        return MeasuredCost(seconds, 1.0 if device.startswith("cuda") else 0.0, device,
                            f"{run.root}/eval ({written} images rendered on {workers} {device} worker(s), "
                            f"{images} scored)", unit="image")

    def run(self, ctx: StageContext) -> None:
        from sage_builder.stages.eval.evaluate import Evaluation

        started = time.monotonic()
        with Evaluation(ctx.config, ctx.run, ctx.stage_dir, dataset_root(ctx.config, ctx.run),
                        adapter_folders(ctx.config, ctx.run)) as evaluation:
            summary = evaluation.run(ctx)
            rendered_now, phases, facts = evaluation.rendered_now, evaluation.seconds, evaluation.executor_facts
            facts = {**facts, "render_device": evaluation.executor.device}
        ctx.stats.update({"prompts": summary["prompt_sets"], "images": summary["images"],
                          "rendered_now": rendered_now, "not_run": summary["not_run"],
                          "ip": {f"{e['prompt_set']}/{e['method']}" + ("" if e["level"] is None else f"/L{e['level']}"):
                                 e["ip"] for e in summary["ip"] if e["category"] == "all"},
                          "seconds": round(time.monotonic() - started, 1), "phase_seconds": phases,
                          **facts})
        atomic_write_text(ctx.stage_dir.file("summary.json"), json.dumps(summary, indent=2, sort_keys=True,
                                                                         default=str))
        ctx.add_output("summary.json")


STAGE = EvalStage()
