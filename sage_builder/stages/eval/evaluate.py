"""One evaluation run, top to bottom: set up (every check and model load before the first write),
render, score, judge, FID, CLIP score, tables, report, plots.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sage_builder.progress import progress
from sage_builder.safety import DISPLAY, make_scorers
from sage_builder.stages.eval import metrics
from sage_builder.stages.eval.methods import ImagePlan, adapter_identity, plan_images
from sage_builder.stages.eval.prompt_sets import load_prompt_sets, load_users, reference_users
from sage_builder.stages.eval.scoring import iter_images, score_images
from sage_builder.store import ItemCache, RunDir, StageDir, atomic_write_text

log = logging.getLogger("sage.eval")


class Evaluation:
    def __init__(self, config: Any, run: RunDir, stage_dir: StageDir, dataset: Path, adapters: dict[str, Path]):
        from sage_builder.executors import make_executor
        from sage_builder.runtime import resolve_device
        from sage_builder.stages.eval.inputs import check_adapter, render_config, worker_request
        from sage_builder.diffusion import RenderSettings, locate_model

        self.config, self.e, self.stage_dir = config, config.eval, stage_dir
        self.render = render_config(config)
        # Images render on the executor's workers; scorers, FID and CLIP score run here, on eval.device.
        self.executor = make_executor(config, worker_request(config))
        self.device = resolve_device(self.e.device, "eval.device")
        _, self.revision = locate_model(self.render)
        self.settings = RenderSettings.from_config(self.render, self.executor.device)
        self.users = load_users(dataset)
        self.levels = reference_users(self.users)
        self.prompts = load_prompt_sets(dataset, list(self.e.splits), Path(self.e.prompts_csv) if self.e.prompts_csv
                                        else None, self.users, list(config.categories), self.e.max_prompts)
        for name, folder in adapters.items():
            check_adapter(folder, "eval.adapter" if name == "psa" else f"eval.adapters.{name}")
        self.adapters = adapters
        missing = [lv for lv in self.e.levels if lv not in self.levels] if "psa" in self.e.methods else []
        if missing:
            log.warning("eval: the dataset has no reference user of level(s) %s; those PSA rows are left out", missing)
        self.plan: ImagePlan = plan_images(self.prompts, self.users, self.levels, list(self.e.methods),
                                           list(self.e.levels), {n: adapter_identity(f, self.e.psa_scale)
                                                                 for n, f in adapters.items()},
                                           self.settings, config.seed)
        self.not_run: list[str] = [f"{DISPLAY[n]}: not run" for n in ("nudenet", "q16") if n not in self.e.scorers]
        self.scorers = make_scorers(self.e, list(self.e.scorers), list(config.categories), self.device, section="eval")
        self.judge = None
        self.rendered_now = 0
        self.executor_facts: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.fid = None
        self.clip = None
        try:
            if self.e.judge.enabled:
                from sage_builder.stages.eval.judge import EvalJudge

                self.judge = EvalJudge(self.e.judge, list(config.categories))
            else:
                self.not_run.append("judge: not run (eval.judge.enabled is false)")
            if self.e.fid.enabled:
                from sage_builder.stages.eval.fid import InceptionFeatures, locate_weights

                self.fid = InceptionFeatures(locate_weights(self.e.fid.weights), self.device, self.e.fid.batch_size)
            else:
                self.not_run.append("FID: not run (eval.fid.enabled is false)")
            if self.e.clip_score.model:
                from sage_builder.stages.eval.clip_score import ClipScorer

                self.clip = ClipScorer(self.e.clip_score.model, self.e.clip_score.revision, self.device,
                                       self.e.clip_score.batch_size)
            else:
                self.not_run.append("CLIP score: not run (eval.clip_score.model is not set)")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Evaluation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for scorer in self.scorers:
            scorer.close()
        for part in (self.judge, self.fid, self.clip):
            if part is not None:
                part.close()

    def cache(self, name: str) -> ItemCache:
        return self.stage_dir.items(name)

    def read_images(self, keys: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for chunk in iter_images(self.cache("images"), keys):
            out.update(chunk)
        return out

    def run(self, ctx: Any) -> dict[str, Any]:
        from sage_builder.stages.eval.outputs import image_metadata, items_table, scores_table, write_shards
        from sage_builder.stages.eval.rendering import render_missing

        images, rows = self.plan.images, self.plan.rows
        log.info("eval: %d prompts, %d rows, %d distinct images (%s); rendering on %s (executor %s), scoring on %s",
                 len(self.prompts), len(rows), len(images), ", ".join(f"{k} {v}" for k, v in self.plan.counts().items()),
                 self.executor.device, self.executor.name, self.device)
        started = time.monotonic()
        cache = self.cache("images")
        embeddings = {u.user_id: u.embedding for u in self.users.values()}
        rendered, units = render_missing(self.executor, images, self.render, self.settings, self.revision, cache,
                                         self.adapters, embeddings, self.e.psa_scale, self.e.batch_size)
        self.seconds["render"] = round(time.monotonic() - started, 2)
        self.rendered_now = rendered  # in the manifest's stats, not in summary.json (same bytes on a rerun)
        self.executor_facts = self.executor.facts(units)  # executor, workers: the manifest's stats
        meta = image_metadata(cache)
        for name in write_shards(self.stage_dir.path, cache, images, meta, self.e.shard_mb * 1_000_000):
            ctx.add_output(name)
        ctx.write_table("items.parquet", items_table(rows))

        keys = [i.key for i in images]
        started = time.monotonic()
        bar = progress(total=len(keys) * len(self.scorers), desc="eval scores", unit="img")
        verdicts = score_images(self.scorers, keys, cache, self.cache("scores"), bar.update)
        bar.close()
        self.seconds["scores"] = round(time.monotonic() - started, 2)
        ip_scorers = [s for s in metrics.IP_SCORERS if s in self.e.scorers]
        summary: dict[str, Any] = {
            "backbone": self.render.backbone, "model": Path(self.render.model).name if Path(self.render.model).exists()
            else self.render.model, "steps": self.render.steps, "guidance": self.render.guidance,
            "resolution": self.render.height, "prompt_sets": _counts(self.prompts), "images": len(images),
            "scorers": list(self.e.scorers), "ip_scorers": ip_scorers,
            "scorer_models": {s.name: s.describe() for s in self.scorers}, "not_run": list(self.not_run),
            "ip": metrics.ip_rows(rows, verdicts, list(self.e.scorers)), "blurred": self.e.plots.blur}

        started = time.monotonic()
        judged_pass, judged_win = self._judge(rows, meta)
        self.seconds["judge"] = round(time.monotonic() - started, 2)
        started = time.monotonic()
        if self.judge is not None:
            summary["judge"] = {"model": self.e.judge.model, "pass": metrics.pass_rates((r, p) for r, p, _ in judged_pass),
                                "win": metrics.win_rates((r, o) for r, o, _ in judged_win)}
        if self.fid is not None:
            summary["fid"] = self._fid(rows)
        clip = None
        if self.clip is not None:
            from sage_builder.stages.eval.clip_score import cached_scores

            clip = cached_scores(self.clip, self.read_images, [(r.image_key, r.caption) for r in rows],
                                 self.cache("clip"))
            summary["clip_score"] = _clip_rows(rows, clip, self.e.clip_score.model)
        self.seconds["fid_clip"] = round(time.monotonic() - started, 2)
        log.info("eval: %d images (%d rendered now); seconds: %s", len(images), rendered,
                 ", ".join(f"{k} {v}" for k, v in self.seconds.items()))
        ctx.write_table("scores.parquet", scores_table(rows, verdicts, list(self.e.scorers), ip_scorers, judged_pass,
                                                       judged_win, clip))
        self._report(ctx, summary, rows)
        return summary

    def _judge(self, rows: list[Any], meta: dict[str, dict[str, Any]]) -> tuple[list[Any], list[Any]]:
        if self.judge is None:
            return [], []
        own = [r for r in rows if r.own_user]
        calls = len(own) + (sum(1 for r in own if r.method != "base") if self.e.judge.win_rate else 0)
        bar = progress(total=calls, desc="eval judge", unit="req")
        try:
            return self.judge.judge(rows, self.users, {k: m["sha256"] for k, m in meta.items()}, self.read_images,
                                    self.cache("judge"), bar.update)
        finally:
            bar.close()

    def _fid(self, rows: list[Any]) -> dict[str, Any]:
        import numpy as np

        from sage_builder.stages.eval.fid import cached_features, describe, reference_features

        assert self.fid is not None
        keys = sorted({r.image_key for r in rows})
        bar = progress(total=len(keys), desc="eval FID features", unit="img")
        feats = cached_features(self.fid, self.read_images, keys, self.cache("fid"), bar.update)
        bar.close()
        reference = None
        if self.e.fid.reference_dir is not None:
            reference = reference_features(self.fid, Path(self.e.fid.reference_dir), self.cache("fid"))
        groups: dict[tuple[str, str, int | None], list[str]] = {}
        for r in rows:
            groups.setdefault((r.prompt_set, r.method, r.level), []).append(r.image_key)
        out = []
        for (prompt_set, method, level), members in groups.items():
            base = groups.get((prompt_set, "base", None))
            mine = np.stack([feats[k] for k in members])
            entry = {"prompt_set": prompt_set, "method": method, "level": level, "n": len(members),
                     "vs_base": metrics.fid(mine, np.stack([feats[k] for k in base])) if base else None}
            if reference is not None:
                entry["vs_reference"] = metrics.fid(mine, reference)
            out.append(entry)
        small = min(len(v) for v in groups.values()) if groups else 0
        result = {**describe(self.fid), "rows": sorted(out, key=lambda e: (e["prompt_set"], e["method"] != "base",
                                                                           e["method"], e["level"] or -1)),
                  "reference": str(Path(self.e.fid.reference_dir).name) if self.e.fid.reference_dir else None}
        if small < 2048:
            result["small"] = (f"the smallest set has {small} images, fewer than the 2,048 feature dimensions: the "
                               "covariances are singular and FID is biased upwards (the paper used 10k images)")
        return result

    def _report(self, ctx: Any, summary: dict[str, Any], rows: list[Any]) -> None:
        from sage_builder.stages.eval.report import plot_ip_by_level, plot_level_grid, render_report

        atomic_write_text(self.stage_dir.file("report.md"), render_report(summary))
        ctx.add_output("report.md")
        if plot_ip_by_level(summary, list(self.config.categories), self.stage_dir.file("ip_by_level.png")):
            ctx.add_output("ip_by_level.png")
        first = next(iter(summary["prompt_sets"]))
        p = self.e.plots
        for level in self.e.levels:
            name = f"grid_level_{level}.png"
            if plot_level_grid([r for r in rows if r.prompt_set == first], level, self.read_images,
                               self.stage_dir.file(name), p.grid_prompts, p.thumbnail, p.blur, p.blur_radius):
                ctx.add_output(name)


def _counts(prompts: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in prompts:
        out[p.prompt_set] = out.get(p.prompt_set, 0) + 1
    return out


def _clip_rows(rows: list[Any], clip: dict[tuple[str, str], float], model: str) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int | None], list[float]] = {}
    for r in rows:
        if (r.image_key, r.caption) in clip:
            groups.setdefault((r.prompt_set, r.method, r.level), []).append(clip[(r.image_key, r.caption)])
    name = Path(model).name if Path(model).exists() else model
    return [{"prompt_set": s, "method": m, "level": lv, "n": len(v), "clip_score": round(sum(v) / len(v), 4),
             "model": name} for (s, m, lv), v in groups.items()]

