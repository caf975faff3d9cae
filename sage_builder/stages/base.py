"""What a stage is, and how one is run against a run directory (skip, resume, manifest).

A stage says *what* it computes (``run``) and what determines its output (``fingerprint_parts``);
``run_stage`` decides *whether* it needs to run and records the manifest. Where the work executes
(in-process, Ray) is the stage's executor setting, not this module's concern.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from sage_builder.errors import SageError, StageInputError
from sage_builder.logs import stage_log, stage_log_path
from sage_builder.planning import MeasuredCost, llm_usage_cost
from sage_builder.store import (LOCK_NAME, Manifest, RunDir, StageDir, atomic_write_bytes, atomic_write_text,
                                canonical, disk_full_cause, disk_full_error, file_sha256, package_versions,
                                remove_stale_temp_files, stable_hash, write_parquet)

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig

log = logging.getLogger("sage")


@dataclass
class StagePlan:
    """What a dry run expects a stage to do (``sage plan``)."""

    items: int
    unit: str = "items"
    llm_calls: int | None = None
    gpu_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    # False where more GPUs do not shorten the wall time (train: they grow the global batch instead).
    scales_with_gpus: bool = True


@dataclass(frozen=True)
class StageOptions:
    """Choices made per invocation (a contact sheet to draw, a backend a test injects): never part of
    the configuration, never hashed. A stage that takes some subclasses this and sets ``options_type``."""


@dataclass
class StageContext:
    config: PipelineConfig
    run: RunDir
    stage_dir: StageDir
    options: StageOptions = field(default_factory=StageOptions)
    outputs: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    def input(self, stage: str) -> Manifest:
        return self.run.manifest_of(stage, needed_by=self.stage_dir.name)

    def input_path(self, stage: str, relpath: str) -> Path:
        self.input(stage)
        return self.run.stage(stage).file(relpath)

    def write_table(self, relpath: str, table: pa.Table | Any, **kwargs: Any) -> Path:
        """Write one Parquet output of this stage atomically and list it in the manifest."""
        path = self.stage_dir.file(relpath)
        write_parquet(table, path, **kwargs)
        self.add_output(relpath)
        return path

    def add_output(self, relpath: str) -> None:
        """Declare a file the stage wrote itself (PNG, JSON report, shard) as an output."""
        if relpath not in self.outputs:
            self.outputs.append(relpath)


class Stage(ABC):
    """One step of the pipeline. A new stage is a package ``sage_builder/stages/<name>/`` whose
    ``stage.py`` defines ``STAGE``, a config section of the same name, and its entry in ``STAGE_ORDER``."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    # Whether ``executor: ray`` moves this stage's work to a Ray cluster (stages 1-3).
    distributed: ClassVar[bool] = False
    # Whether the stage sends LLM requests: its plan counts ``llm_calls``, its manifest ``llm_usage``.
    uses_llm: ClassVar[bool] = False
    options_type: ClassVar[type[StageOptions]] = StageOptions
    # Folders of the stage dir a rerun resumes from; `--force` deletes them (after every check).
    resume_state: ClassVar[tuple[str, ...]] = ("_items",)

    @property
    def number(self) -> int:
        """1-based position in ``STAGE_ORDER``, the one list of stages."""
        from sage_builder.stages import STAGE_ORDER

        return STAGE_ORDER.index(self.name) + 1

    def config_section(self, config: PipelineConfig) -> Any:
        """The part of the config that determines this stage's output (execution fields are dropped)."""
        return getattr(config, self.name)

    def templates(self, config: PipelineConfig) -> dict[str, Path]:
        """Prompt templates this stage uses; their content hashes enter the fingerprint."""
        return {}

    def model_ids(self, config: PipelineConfig) -> dict[str, dict[str, Any]]:
        return {}

    def fingerprint_parts(self, config: PipelineConfig) -> dict[str, Any]:
        """Anything beyond section, templates, models and inputs that determines the output."""
        return {"seed": config.seed, "categories": config.categories}

    def check(self, config: PipelineConfig, run: RunDir) -> None:
        """Reject bad input before anything is written (raise SageError with a one-line message)."""

    def resume_problem(self, config: PipelineConfig, run: RunDir) -> str | None:
        """Why this config cannot resume the stage's saved state (e.g. a checkpoint of another config),
        asked before anything is written; None when it can. ``--force`` skips it (it starts over)."""
        return None

    def plan(self, config: PipelineConfig) -> StagePlan:
        return StagePlan(items=0)

    def measured_cost(self, run: RunDir, pilot: PipelineConfig) -> MeasuredCost | None:
        """Device-seconds per planned unit this stage measured in a finished pilot run (``sage plan
        --measured``); None when it measured nothing. LLM stages: from their manifest's ``llm_usage``."""
        return llm_usage_cost(self, run, pilot) if self.uses_llm else None

    @abstractmethod
    def run(self, ctx: StageContext) -> None:
        """Compute and write the outputs through ``ctx``; resumable at item granularity."""

    def extras(self, run: RunDir, config: PipelineConfig, options: StageOptions) -> None:
        """Optional viewing aids asked for on the command line (e.g. a contact sheet), made after the
        stage ran or was found up to date; they are not outputs and not in the manifest."""

    def report(self, stage_dir: StageDir, manifest: Manifest) -> dict[str, Any]:
        """A small summary for ``sage status`` (default: the manifest's stats)."""
        return manifest.stats


def template_hashes(stage: Stage, config: PipelineConfig) -> dict[str, str]:
    return {name: file_sha256(path) for name, path in sorted(stage.templates(config).items())}


def fingerprint(stage: Stage, config: PipelineConfig, run: RunDir) -> tuple[str, dict[str, str]]:
    """(fingerprint, input manifest hashes). Raises StageInputError if an input stage is not done."""
    inputs = {name: run.manifest_of(name, needed_by=stage.name).content_hash() for name in stage.inputs}
    value = stable_hash(
        stage.name,
        stage.config_section(config),
        template_hashes(stage, config),
        stage.model_ids(config),
        stage.fingerprint_parts(config),
        inputs,
    )
    return value, inputs


@dataclass
class StageStatus:
    name: str
    number: int
    state: str  # done | dry-run | modified | stale | partial | missing
    rows: dict[str, int]
    outputs: list[str]
    manifest_hash: str | None
    finished_at: float | None
    seconds: float | None
    reason: str = ""
    report: dict[str, Any] = field(default_factory=dict)


def stage_status(stage: Stage, config: PipelineConfig | None, run: RunDir, verify: bool = False) -> StageStatus:
    """``verify`` hashes every output; by default only files whose size or mtime moved are hashed."""
    stage_dir = run.stage(stage.name)
    manifest = stage_dir.read_manifest()
    if manifest is None:
        state = "partial" if stage_dir.has_partial_work() else "missing"
        return StageStatus(stage.name, stage.number, state, {}, [], None, None, None)
    state, reason = "done", ""
    missing = [rel for rel in manifest.outputs if not stage_dir.file(rel).exists()]
    problem = None if missing else stage_dir.output_problem(manifest, full=verify)
    if missing:
        state, reason = "partial", f"output missing: {missing[0]}"
    elif problem:
        state, reason = "modified", f"{problem}; rerun `{run.stage_command(stage.name)}` to rebuild it"
    else:
        for name, recorded in manifest.inputs.items():
            upstream = run.stage(name).read_manifest()
            if upstream is None or upstream.content_hash() != recorded:
                state, reason = "stale", f"input stage '{name}' changed"
                break
        absent = [name for name in stage.inputs if run.stage(name).read_manifest() is None]
        if state == "done" and config is not None and absent and not manifest.inputs:
            # Built outside this run (`sage import`, a copied dataset): there is nothing to compare with.
            reason = f"made outside this run (no {', '.join(absent)} here): not compared with the config"
        elif state == "done" and config is not None:
            try:
                current, _ = fingerprint(stage, config, run)
            except Exception as exc:  # noqa: BLE001 - status must describe, never crash
                current, reason = None, str(exc)
            if current != manifest.fingerprint:
                state, reason = "stale", reason or what_changed(stage, config, manifest)
    if state == "done" and manifest.stats.get("dry_run"):
        state, reason = "dry-run", "a dry run: nothing was pushed (set publish.repo_id to publish)"
    try:
        report = stage.report(stage_dir, manifest)
    except Exception as exc:  # noqa: BLE001
        report = {"error": f"report unavailable: {exc}"}
    return StageStatus(stage.name, stage.number, state, manifest.rows,
                       [str(stage_dir.file(rel)) for rel in manifest.outputs], manifest.content_hash(),
                       manifest.finished_at, manifest.seconds, reason, report)


def section_data(stage: Stage, config: PipelineConfig) -> dict[str, Any]:
    """The stage's config section as plain data, as it is hashed (recorded in the manifest)."""
    data = canonical(stage.config_section(config))
    return data if isinstance(data, dict) else {"value": data}


def _changed_keys(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for key in sorted(set(old) | set(new), key=str)
                for c in _changed_keys(old.get(key), new.get(key), f"{prefix}.{key}")]
    return [] if old == new else [f"{prefix} {_short(old)} -> {_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def what_changed(stage: Stage, config: PipelineConfig, manifest: Manifest) -> str:
    """Why the fingerprint moved, as specific as the manifest allows: config keys, templates, models."""
    changes = _changed_keys(manifest.config, section_data(stage, config), stage.name) if manifest.config else []
    changes += [f"template {name} edited" for name, digest in template_hashes(stage, config).items()
                if manifest.templates.get(name) not in (None, digest)]
    if canonical(stage.model_ids(config)) != canonical(manifest.models) and manifest.models:
        changes.append("a model changed")
    if not changes:
        return "configuration or templates changed" if not manifest.config else \
            "seed, categories or another setting outside the section changed"
    more = f" (+{len(changes) - 3} more, see --json)" if len(changes) > 3 else ""
    return "changed since it ran: " + "; ".join(changes[:3]) + more


def run_status(config: PipelineConfig | None, run: RunDir, verify: bool = False) -> list[StageStatus]:
    """Every stage's status, with staleness carried downstream: a stage whose input stage is not done
    (stale, modified, partial, missing) is not done either, whatever its own manifest says."""
    from sage_builder.stages import all_stages

    rows: dict[str, StageStatus] = {}
    for stage in all_stages():
        status = stage_status(stage, config, run, verify=verify)
        behind = [name for name in stage.inputs if rows[name].state not in ("done", "dry-run")]
        if status.state in ("done", "dry-run") and behind:
            status.state = "stale"
            status.reason = f"input stage '{behind[0]}' is {rows[behind[0]].state}; rerun it, then this stage"
        rows[stage.name] = status
    return list(rows.values())


def stage_options(stage: Stage, options: StageOptions | dict[str, Any] | None) -> StageOptions:
    """The stage's typed options, from an options object or keyword values; an unknown one is an error."""
    if isinstance(options, StageOptions):
        return options
    given = dict(options or {})
    known = {f.name for f in fields(stage.options_type)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise SageError(f"stage '{stage.name}' has no option '{unknown[0]}' "
                        f"(its options: {', '.join(sorted(known)) or 'none'})")
    return stage.options_type(**given)


def run_stage(stage: Stage, config: PipelineConfig, run: RunDir, force: bool = False,
              options: StageOptions | dict[str, Any] | None = None, save_config: bool = False) -> Manifest:
    """Run one stage unless its manifest already matches and its outputs are intact; write the manifest
    last. Every check comes before the first write; one run at a time holds the run directory
    (``RunDir.lock``); ``save_config`` records the resolved config as ``RUN/config.yaml`` (the CLI)."""
    stage_dir = run.stage(stage.name)
    opts = stage_options(stage, options)
    if stage.distributed:
        from sage_builder.executors import check_executor

        check_executor(config)  # e.g. Ray not installed: one line now, before anything is written
    run.check_usable()
    with readable_inputs(stage, run):
        stage.check(config, run)
    verify_inputs(stage, run)
    value, inputs = fingerprint(stage, config, run)
    problem = None if force else stage.resume_problem(config, run)
    if problem:
        raise StageInputError(problem)
    if is_worker_rank():
        return _run_checked(stage, config, run, force, opts, value, inputs, save_config)
    created_root = not run.root.exists()
    try:
        with run.lock():
            return _run_checked(stage, config, run, force, opts, value, inputs, save_config)
    except BaseException as exc:
        if created_root:
            with contextlib.suppress(OSError):
                run.root.rmdir()  # only if this failed run left it empty
        cause = disk_full_cause(exc) if isinstance(exc, Exception) else None
        if cause is not None:
            raise disk_full_error(cause, stage_dir.path, space_needed(stage, run)) from None
        raise


def is_worker_rank() -> bool:
    """Under `accelerate launch` / torchrun, ranks other than 0 compute but never record the stage."""
    return os.environ.get("RANK", "0") != "0"


def verify_inputs(stage: Stage, run: RunDir, full: bool = False) -> None:
    """Every input stage is done and its files are the ones its manifest lists (size and mtime, or hash)."""
    for name in stage.inputs:
        manifest = run.manifest_of(name, needed_by=stage.name)
        problem = run.stage(name).output_problem(manifest, full=full)
        if problem is not None:
            raise StageInputError(f"{problem} since stage '{name}' wrote it (corrupt or edited), so stage "
                                  f"'{stage.name}' cannot use it; rerun `{run.stage_command(name)}` to rebuild it")


@contextlib.contextmanager
def readable_inputs(stage: Stage, run: RunDir) -> Iterator[None]:
    """A Parquet input that cannot be read becomes one line naming the damaged file and its stage. An
    Arrow error with every input intact is the stage's own and keeps its traceback."""
    import pyarrow as pa

    try:
        yield
    except pa.ArrowException:
        log.debug("stage %s: Arrow error; hashing its inputs", stage.name, exc_info=True)
        verify_inputs(stage, run, full=True)  # raises naming the file when one differs from its manifest
        raise


def space_needed(stage: Stage, run: RunDir) -> tuple[int, str] | None:
    """A rough size of what the stage writes, and where the figure comes from."""
    items = run.stage(stage.name).path / "_items"
    cached = sum(f.stat().st_size for f in items.rglob("*") if f.is_file()) if items.exists() else 0
    if cached:
        return cached, "to assemble its outputs from the items it cached"
    upstream = [run.stage(name).read_manifest() for name in stage.inputs]
    total = sum(f.bytes for m in upstream if m is not None for f in m.outputs.values())
    return (total, "about the size of its inputs") if total else None


def _snapshot(root: Path) -> tuple[set[str], set[str]]:
    """(files, folders) under ``root``, relative, leaving out the lock."""
    files, folders = set(), set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        folders.update(str(rel / d) for d in dirnames)
        files.update(str(rel / f) for f in filenames if f != LOCK_NAME)
    return files, folders


def _run_checked(stage: Stage, config: PipelineConfig, run: RunDir, force: bool, opts: StageOptions, value: str,
                 inputs: dict[str, str], save_config: bool) -> Manifest:
    """The part of ``run_stage`` that writes, once every check has passed. If it fails before it
    finished any item, the run directory is put back as it was: the config, the manifest, folders."""
    stage_dir = run.stage(stage.name)
    config_path = run.root / "config.yaml"
    saved_config = config_path.read_bytes() if config_path.exists() else None
    files_before, folders_before = _snapshot(run.root)
    existing = stage_dir.read_manifest()
    log_path = stage_log_path(stage_dir.path, stage.name)
    log_before = log_path.read_bytes() if log_path.exists() else None
    try:
        with stage_log(stage_dir.path, stage.name) if not is_worker_rank() else contextlib.nullcontext():
            if save_config and not is_worker_rank():
                from sage_builder.config import dump_config

                atomic_write_text(config_path, dump_config(config))
            if existing is not None and not force and existing.fingerprint == value:
                problem = stage_dir.output_problem(existing)
                if problem is None:
                    log.info("stage %s: up to date (%s), skipped", stage.name, stage_dir.path)
                    stage.extras(run, config, opts)
                    return existing
                log.warning("stage %s: %s; rebuilding it from the item cache", stage.name, problem)
            return _run_and_record(stage, config, run, force, opts, value, inputs, existing)
    except BaseException:
        files_after, folders_after = _snapshot(run.root)
        if existing is not None and not stage_dir.manifest_path.exists() \
                and stage_dir.output_problem(existing) is None:
            stage_dir.write_manifest(existing)  # its outputs are intact: the stage is still done
        if not (files_after - files_before - {"config.yaml", str(log_path.relative_to(run.root))}):
            if log_before is None:
                log_path.unlink(missing_ok=True)  # nothing was done, so nothing to read in a log
            else:
                atomic_write_bytes(log_path, log_before)
            if saved_config is None:
                config_path.unlink(missing_ok=True)
            elif config_path.exists() and config_path.read_bytes() != saved_config:
                atomic_write_text(config_path, saved_config.decode("utf-8"))
            for folder in sorted(folders_after - folders_before, key=len, reverse=True):
                with contextlib.suppress(OSError):
                    (run.root / folder).rmdir()  # empty folders this run made
        raise


def _run_and_record(stage: Stage, config: PipelineConfig, run: RunDir, force: bool, opts: StageOptions, value: str,
                    inputs: dict[str, str], existing: Manifest | None) -> Manifest:
    stage_dir = run.stage(stage.name)
    if existing is not None:
        stage_dir.invalidate()
    if force:
        for folder in stage.resume_state:
            shutil.rmtree(stage_dir.path / folder, ignore_errors=True)
    stale = remove_stale_temp_files(stage_dir.path)
    if stale:
        log.info("stage %s: removed %d temp file(s) of an interrupted run", stage.name, stale)
    started = time.time()
    ctx = StageContext(config=config, run=run, stage_dir=stage_dir, options=opts)
    ctx.models = stage.model_ids(config)
    with readable_inputs(stage, run):
        stage.run(ctx)
    described = stage_dir.describe_outputs(ctx.outputs)
    finished = time.time()
    manifest = Manifest(
        stage=stage.name,
        fingerprint=value,
        config_hash=stable_hash(stage.config_section(config)),
        templates=template_hashes(stage, config),
        models=ctx.models,
        inputs=inputs,
        outputs=described,
        rows={rel: f.rows for rel, f in described.items() if f.rows is not None},
        packages=package_versions(),
        started_at=started,
        finished_at=finished,
        seconds=round(finished - started, 3),
        stats=ctx.stats,
        config=section_data(stage, config),
    )
    if is_worker_rank():
        return manifest  # rank 0 records the stage (its outputs are complete)
    stage_dir.write_manifest(manifest)
    log.info("stage %s: done in %.1f s -> %s", stage.name, manifest.seconds, stage_dir.path)
    stage.extras(run, config, ctx.options)
    return manifest
