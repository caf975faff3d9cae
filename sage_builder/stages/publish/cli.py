"""``sage publish``: push a run's dataset to the Hub (private by default), or show the plan."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sage_builder import PROJECT_ROOT
from sage_builder.cli_util import handle_errors, setup_logging
from sage_builder.errors import SageError


def register(app: typer.Typer) -> None:
    app.command("publish")(publish)


@handle_errors
def publish(
    repo_id: Annotated[Optional[str], typer.Option(
        "--repo-id", help="ORG/NAME of the dataset repo (default: publish.repo_id of the config)")] = None,
    run_dir: Annotated[Path, typer.Option("--run-dir", "-r", help="run directory holding label/dataset")] = Path(
        "runs/demo"),
    config_path: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="pipeline YAML (default: the run's own config.yaml)")] = None,
    public: Annotated[bool, typer.Option(
        "--public", help="create the repo PUBLIC (default: private); the data is harmful by design")] = False,
    gated: Annotated[Optional[str], typer.Option(
        "--gated", help="gate access: auto (requests approved automatically) or manual")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="print the planned operations and bytes to send; commit nothing")] = False,
    revision: Annotated[Optional[str], typer.Option(help="branch to commit to (default: main)")] = None,
    allow_stale: Annotated[bool, typer.Option(
        "--allow-stale", help="push a stale label dataset (its config or inputs changed) instead of refusing")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Push RUN/label/dataset to a Hub dataset repo in ONE commit, then verify it against the manifest.

    The token comes from HF_TOKEN or `hf auth login`, never from a file of ours. A rerun after an
    interruption resumes: files the Hub already holds are not sent again.
    """
    from sage_builder.config import load_config
    from sage_builder.stages.base import run_stage
    from sage_builder.stages.publish import hub
    from sage_builder.stages.publish.stage import STAGE, check_label_fresh, local_files
    from sage_builder.store import RunDir

    setup_logging(verbose)
    if repo_id is not None:
        hub.check_repo_id(repo_id)
    if gated is not None and gated not in ("auto", "manual"):
        raise SageError(f"--gated '{gated}': expected auto or manual")
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise SageError(f"{run_dir}: no such run directory (run the pipeline first: `sage run --run-dir {run_dir}`)")
    saved = run.root / "config.yaml"
    config = load_config(config_path or (saved if saved.exists() else PROJECT_ROOT / "pipelines" / "demo.yaml"))
    section = config.publish
    if repo_id is not None:
        section.repo_id = repo_id
    if public:
        section.private = False
    if gated is not None:
        section.gated = gated  # type: ignore[assignment]
    if revision is not None:
        section.revision = revision
    if allow_stale:
        section.allow_stale = True

    if dry_run:
        stale = check_label_fresh(config, run, dry_run=True)
        files = local_files(run, section.include_manifests)
        api = None
        reason = ""
        if section.repo_id is not None:
            try:
                api = hub.hub_api(hub.resolve_token())
            except SageError as exc:
                reason = str(exc)
        plan = hub.plan_publish(files, section.repo_id, section.revision, api)
        if reason:
            plan.notes.append(f"remote not consulted: {reason}")
        if stale:
            plan.notes.append(f"a push would be refused: {stale} (or pass --allow-stale)")
        visibility = "private" if section.private else "PUBLIC"
        typer.echo(f"dry run: {section.repo_id or '(no repo id)'}@{section.revision} ({visibility}"
                   + (f", gated={section.gated}" if section.gated else "") + ")")
        for line in plan.lines():
            typer.echo(line)
        return

    if section.repo_id is None:
        raise SageError("no repo to publish to: pass --repo-id ORG/NAME (or set publish.repo_id); "
                        "--dry-run shows the plan without one")
    hub.hub_api(hub.resolve_token())  # fail on a missing token or offline mode before touching RUN/publish
    manifest = run_stage(STAGE, config, run, force=True)
    stats = manifest.stats
    typer.echo(f"published {section.repo_id}@{section.revision} "
               f"({'private' if stats.get('private') else 'public'}"
               + (f", gated={stats['gated']}" if stats.get("gated") else "") + f"): commit {stats.get('commit')}; "
               f"{stats.get('add', 0)} added, {stats.get('update', 0)} updated, {stats.get('unchanged', 0)} unchanged, "
               f"{stats.get('delete', 0)} deleted; verified against the label manifest")
