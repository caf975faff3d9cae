"""Per-item costs measured by an earlier (pilot) run, for ``sage plan --measured RUN``.

A pilot run at small scale records, in its manifests, how long its LLM engines were busy and how
many requests they served (``llm_usage``), and how long its render workers took per image. From
those, a full-size plan gets device-seconds per LLM call (retries and rejects included, since the
pilot's cost is divided by the calls its own plan expected) and per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_builder.errors import SageError
from sage_builder.store import RunDir

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig
    from sage_builder.stages.base import Stage, StagePlan


@dataclass
class MeasuredCost:
    seconds: float  # device-seconds per planned unit (LLM call or image), per engine/worker
    gpus: float  # GPUs each engine/worker held (0: CPU)
    device: str
    source: str
    unit: str = "LLM call"  # what ``seconds`` is per: "LLM call" (the plan's llm_calls) or the plan's items

    def describe(self) -> str:
        what = f"{self.seconds:.3g} {'GPU' if self.gpus else 'CPU'}-s per {self.unit}"
        return f"{what} measured in {self.source}"

    def planned_units(self, plan: StagePlan) -> int | None:
        return plan.llm_calls if self.unit == "LLM call" else plan.items


def llm_usage_cost(stage: Stage, run: RunDir, pilot: PipelineConfig) -> MeasuredCost | None:
    """An LLM stage's busy seconds x engines, divided by the calls the pilot's own plan expected
    (so retries and rejects are counted); None when its manifest has no requests recorded."""
    manifest = run.stage(stage.name).read_manifest()
    usage: dict[str, Any] | None = manifest.stats.get("llm_usage") if manifest else None
    calls = stage.plan(pilot).llm_calls
    if not usage or not usage.get("requests") or not calls:
        return None
    per_call = usage["seconds"] * usage["engines"] / calls
    gpus = float(usage.get("gpus_per_engine") or 0.0)
    return MeasuredCost(per_call, gpus, "cuda" if gpus else "cpu",
                        f"{run.root}/{stage.name} ({usage['requests']} requests for {calls} planned calls, "
                        f"{usage['engines']} engine(s), {usage['seconds']:.0f} s)")


def measured_costs(run_dir: Path) -> dict[str, MeasuredCost]:
    """{stage: cost} for the stages of ``run_dir`` that measured something (nothing cached counts)."""
    from sage_builder.stages import all_stages

    run = RunDir(run_dir)
    pilot = pilot_config(run_dir)
    costs = {stage.name: cost for stage in all_stages() if (cost := stage.measured_cost(run, pilot)) is not None}
    if not costs:
        raise SageError(f"--measured {run_dir}: no stage there measured anything (all items came from caches, "
                        "or the run predates usage records); rerun a small pilot with --force")
    return costs


# What a pilot must share with the target config for its per-call and per-image costs to transfer.
PILOT_KEYS = {"profiles": ("llm.backend", "llm.model"), "prompts": ("llm.backend", "llm.model"),
              "render": ("render.backbone", "render.model", "render.height", "render.width", "render.steps"),
              "eval": ("render.model", "render.height", "render.width")}


def pilot_config(run_dir: Path) -> PipelineConfig:
    from sage_builder.config import load_config

    config_path = RunDir(run_dir).root / "config.yaml"
    if not config_path.exists():
        raise SageError(f"--measured {run_dir}: no config.yaml there; give the run directory of a finished "
                        "pilot run (e.g. runs/demo)")
    return load_config(config_path)


def _value(config: PipelineConfig, dotted: str) -> Any:
    from sage_builder.config_base import model_identity

    value: Any = config
    for key in dotted.split("."):
        value = getattr(value, key)
    return model_identity(value) if dotted.endswith(".model") and isinstance(value, str) else value


def pilot_mismatches(pilot: PipelineConfig, target: PipelineConfig, costs: dict[str, MeasuredCost]) -> list[str]:
    """Why the pilot's measured costs would not carry over to ``target`` (models, resolution, steps,
    CPU vs GPU), one phrase each; empty when they do."""
    problems = []
    for stage, cost in costs.items():
        for key in PILOT_KEYS.get(stage, ()):
            mine, theirs = _value(pilot, key), _value(target, key)
            if mine != theirs:
                shown = [str(v) if not str(v).startswith("local-model:") else "a local folder" for v in (mine, theirs)]
                problems.append(f"{key} {shown[0]} (pilot) vs {shown[1]}")
        if not cost.gpus and stage in {"render", "eval"} and target.render.device != "cpu":
            problems.append(f"{stage} was measured on {cost.device}, the target renders on GPUs")
    return list(dict.fromkeys(problems))


# Bytes per image pixel assumed for photographic SDXL output when no pilot measured it.
BYTES_PER_PIXEL = {"jpeg": 0.45, "webp": 1.5, "png": 1.8}


def bytes_per_image(config: PipelineConfig, pilot_run: Path | None = None) -> tuple[float, str]:
    """(bytes per rendered image, where the figure comes from): the pilot's render shards per pixel,
    scaled to the target resolution, or an assumption per encoding."""
    r = config.render
    pixels = r.height * r.width
    if pilot_run is not None:
        manifest = RunDir(pilot_run).stage("render").read_manifest()
        if manifest is not None:
            shards = [f for rel, f in manifest.outputs.items() if rel.startswith("shards/")]
            images = sum(f.rows or 0 for f in shards)
            pilot = pilot_config(pilot_run).render
            if images and pilot.encoding == r.encoding:
                per_pixel = sum(f.bytes for f in shards) / images / (pilot.height * pilot.width)
                return per_pixel * pixels, f"{per_pixel:.2f} B/pixel measured in the pilot's shards"
    per_pixel = BYTES_PER_PIXEL[r.encoding]
    return per_pixel * pixels, f"{per_pixel} B/pixel assumed for {r.encoding}"


def disk_line(stage: str, plan: StagePlan, config: PipelineConfig, per_image: float) -> tuple[float, str] | None:
    """(bytes, what they are) a stage writes under the run directory, or None when small."""
    if stage == "render":
        return plan.items * per_image, "image shards"
    if stage == "label" and config.label.include_pairs:
        images = 2 * len(config.categories) * config.prompts.concepts_per_category * config.prompts.pairs_per_concept
        return images * per_image, "the pairs config: a second copy of every rendered image"
    if stage == "eval":
        return plan.items * per_image, "the evaluation images"
    return None


def llm_seconds(config: PipelineConfig, calls: int, tokens_per_s: float) -> tuple[float, str] | None:
    """GPU-seconds of ``calls`` LLM replies at ``tokens_per_s`` generated tokens per engine, or None on
    CPU (only a pilot says what a CPU model costs)."""
    llm = config.llm
    if llm.backend == "transformers" and llm.device == "cpu":
        return None
    gpus = llm.tensor_parallel_size if llm.backend == "vllm" else 1
    seconds = calls * llm.max_new_tokens / tokens_per_s * gpus
    where = " on the server's GPUs" if llm.backend == "openai" else ""
    return seconds, (f"LLM GPU-hours{where} assume {tokens_per_s:g} generated tokens/s per engine (--llm-tokens-per-s) "
                     f"and up to llm.max_new_tokens={llm.max_new_tokens} per reply; a pilot measures it (--measured)")


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.0f} KB"
