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
    from sage_builder.config import load_config
    from sage_builder.stages import all_stages

    run = RunDir(run_dir)
    config_path = run.root / "config.yaml"
    if not config_path.exists():
        raise SageError(f"--measured {run_dir}: no config.yaml there; give the run directory of a finished "
                        "pilot run (e.g. runs/demo)")
    pilot = load_config(config_path)
    costs = {stage.name: cost for stage in all_stages() if (cost := stage.measured_cost(run, pilot)) is not None}
    if not costs:
        raise SageError(f"--measured {run_dir}: no stage there measured anything (all items came from caches, "
                        "or the run predates usage records); rerun a small pilot with --force")
    return costs
