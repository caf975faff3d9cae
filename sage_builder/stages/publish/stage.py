"""Stage 5 (publish): push the label stage's dataset directory to a Hub dataset repo.

With no ``publish.repo_id`` (the demo) the stage is a dry run: it writes ``plan.json`` (every file
it would add, with bytes) and makes no network call. With a repo id it creates the repo (private
unless ``publish.private: false``), uploads, commits once and verifies; see ``hub.py``.

Outputs in ``RUN/publish/``: ``plan.json`` (operations and bytes) and, after a push,
``verification.json`` (commit, visibility, every difference found; empty when all is well).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_builder.errors import StageInputError
from sage_builder.stages.base import Stage, StageContext, StagePlan
from sage_builder.stages.publish import hub
from sage_builder.store import atomic_write_text

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig
    from sage_builder.store import RunDir

log = logging.getLogger("sage.publish")

LINEAGE_STAGES = ("profiles", "prompts", "render", "label")


def public_manifests(run: RunDir) -> dict[str, Path]:
    """Copies of the lineage manifests without local paths (relative to the run, or a model's name and
    content identity), written to ``RUN/publish/manifests/``: what the Hub gets as ``manifests/*.json``."""
    from sage_builder.public import public_data

    out: dict[str, Path] = {}
    for name in LINEAGE_STAGES:
        path = run.stage(name).manifest_path
        if not path.exists():
            continue
        public = public_data(json.loads(path.read_text()), run.root)
        copy = run.stage("publish").file(f"manifests/{name}.json")
        text = json.dumps(public, indent=2, sort_keys=True) + "\n"
        if not copy.exists() or copy.read_text() != text:
            atomic_write_text(copy, text)
        out[f"manifests/{name}.json"] = copy
    return out


def local_files(run: RunDir, include_manifests: bool) -> list[hub.LocalFile]:
    """The dataset files (checked against the label manifest) plus the stage manifests for lineage."""
    label = run.stage("label")
    manifest = run.manifest_of("label", needed_by="publish")
    extra = public_manifests(run) if include_manifests else {}
    return hub.dataset_files(label.path, manifest, extra)


def label_staleness(config: PipelineConfig, run: RunDir) -> str | None:
    """Why the run's label dataset no longer matches its config and inputs (None: it does). Its card's
    lineage would then disagree with the manifests pushed beside it."""
    from sage_builder.stages import get_stage
    from sage_builder.stages.base import stage_status

    status = stage_status(get_stage("label"), config, run)
    return (status.reason or "stale") if status.state == "stale" else None


def check_label_fresh(config: PipelineConfig, run: RunDir, dry_run: bool = False) -> str | None:
    """Refuse to push a stale label dataset unless ``publish.allow_stale``; a dry run only warns.
    Returns the warning line, if any."""
    reason = label_staleness(config, run)
    if reason is None:
        return None
    line = (f"{run.stage('label').path} is stale ({reason}): the card's lineage would disagree with the pushed "
            f"manifests; rerun `{run.stage_command('label')}` first")
    if dry_run or config.publish.allow_stale:
        log.warning("publish: %s", line)
        return line
    raise StageInputError(f"{line}, or pass --allow-stale to push it as it is")


def warn_if_public(private: bool, repo_id: str | None) -> None:
    if not private and repo_id:
        log.warning("=" * 72)
        log.warning("PUBLIC RELEASE of %s: anyone will be able to download harmful prompts and images.", repo_id)
        log.warning("Sage is harmful by design (SPEC §7). Prefer a private or gated repo (--gated auto|manual).")
        log.warning("=" * 72)


class PublishStage(Stage):
    name = "publish"
    inputs = ("label",)
    summary = "push the dataset to a Hub dataset repo (private by default) in one commit, then verify it"

    def check(self, config: PipelineConfig, run: RunDir) -> None:
        run.manifest_of("label", needed_by=self.name)
        check_label_fresh(config, run, dry_run=config.publish.repo_id is None)

    def fingerprint_parts(self, config: PipelineConfig) -> dict[str, Any]:
        return {}

    def plan(self, config: PipelineConfig) -> StagePlan:
        target = config.publish.repo_id
        notes = [f"push to {target} ({'private' if config.publish.private else 'PUBLIC'})" if target
                 else "no publish.repo_id: dry run only (plan.json), no network"]
        return StagePlan(items=1, unit="commit" if target else "dry-run plan", notes=notes)

    def run(self, ctx: StageContext) -> None:
        cfg = ctx.config.publish
        files = local_files(ctx.run, cfg.include_manifests)
        for local in files:
            if local.path_in_repo.startswith("manifests/"):
                ctx.add_output(local.path_in_repo)
        if cfg.repo_id is None:  # `sage publish --dry-run` plans against the Hub without running the stage
            plan = hub.plan_publish(files, cfg.repo_id, cfg.revision, api=None)  # the demo never touches the network
            self._write_json(ctx, "plan.json", plan.to_json())
            ctx.stats.update({"dry_run": True, **plan.summary()})
            for line in plan.lines():
                log.info("publish plan: %s", line)
            return
        assert cfg.repo_id is not None
        warn_if_public(cfg.private, cfg.repo_id)
        api = hub.hub_api(hub.resolve_token())
        result = hub.push(api, files, cfg.repo_id, private=cfg.private, gated=cfg.gated, revision=cfg.revision,
                          commit_message=cfg.commit_message, num_threads=cfg.num_threads,
                          retries=cfg.rate_limit_retries, max_wait_s=cfg.max_rate_limit_wait_s)
        self._write_json(ctx, "plan.json", result.plan.to_json())
        verification = {"repo_id": cfg.repo_id, "revision": cfg.revision, "commit": result.commit,
                        "private": result.private, "gated": result.gated, "files": len(files),
                        "differences": [d.__dict__ for d in result.differences]}
        self._write_json(ctx, "verification.json", verification)
        ctx.stats.update({"dry_run": False, **result.plan.summary(), "commit": result.commit,
                          "private": result.private, "gated": result.gated,
                          "differences": len(result.differences)})
        if result.differences:
            for difference in result.differences:
                log.error("verification: %s", difference.line())
            shown = "; ".join(d.line() for d in result.differences[:10])
            more = f"; +{len(result.differences) - 10} more" if len(result.differences) > 10 else ""
            raise hub.VerificationError(
                f"publish {cfg.repo_id}: the Hub does not match the label manifest, {len(result.differences)} "
                f"difference(s): {shown}{more} (all in {ctx.stage_dir.file('verification.json')})")
        log.info("publish %s: verified %d files against the label manifest", cfg.repo_id, len(files))

    @staticmethod
    def _write_json(ctx: StageContext, relpath: str, data: dict[str, Any]) -> None:
        atomic_write_text(ctx.stage_dir.file(relpath), json.dumps(data, indent=2, default=str) + "\n")
        ctx.add_output(relpath)


STAGE = PublishStage()
