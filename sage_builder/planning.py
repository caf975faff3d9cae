"""Per-item costs measured by an earlier (pilot) run, for ``sage plan --measured RUN``.

A pilot run at small scale records, in its manifests, how long its LLM engines were busy and how
many requests they served (``llm_usage``), and how long its render workers took per image. From
those, a full-size plan gets device-seconds per LLM call (retries and rejects included, since the
pilot's cost is divided by the calls its own plan expected) and per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_builder.errors import SageError
from sage_builder.store import RunDir


@dataclass
class MeasuredCost:
    seconds: float  # device-seconds per planned unit (LLM call or image), per engine/worker
    gpus: float  # GPUs each engine/worker held (0: CPU)
    device: str
    source: str

    def describe(self, unit: str) -> str:
        what = f"{self.seconds:.3g} {'GPU' if self.gpus else 'CPU'}-s per {unit}"
        return f"{what} measured in {self.source}"


def measured_costs(run_dir: Path) -> dict[str, MeasuredCost]:
    """{stage: cost} for the stages of ``run_dir`` that measured something (nothing cached counts)."""
    from sage_builder.config import load_config
    from sage_builder.stages import get_stage

    run = RunDir(run_dir)
    config_path = run.root / "config.yaml"
    if not config_path.exists():
        raise SageError(f"--measured {run_dir}: no config.yaml there; give the run directory of a finished "
                        "pilot run (e.g. runs/demo)")
    pilot = load_config(config_path)
    costs: dict[str, MeasuredCost] = {}
    for name in ("profiles", "prompts"):
        manifest = run.stage(name).read_manifest()
        usage: dict[str, Any] | None = (manifest.stats.get("llm_usage") if manifest else None)
        calls = get_stage(name).plan(pilot).llm_calls
        if not usage or not usage.get("requests") or not calls:
            continue
        per_call = usage["seconds"] * usage["engines"] / calls
        gpus = float(usage.get("gpus_per_engine") or 0.0)
        costs[name] = MeasuredCost(per_call, gpus, "cuda" if gpus else "cpu",
                                   f"{run.root}/{name} ({usage['requests']} requests for {calls} planned calls, "
                                   f"{usage['engines']} engine(s), {usage['seconds']:.0f} s)")
    manifest = run.stage("render").read_manifest()
    if manifest is not None:
        stats = manifest.stats
        written = stats.get("rendered_now") or 0
        workers = stats.get("ray_workers") or stats.get("workers") or 1
        if written and stats.get("render_seconds"):
            device = str(stats.get("device", "cpu"))
            costs["render"] = MeasuredCost(stats["render_seconds"] * workers / written,
                                           1.0 if device.startswith("cuda") else 0.0, device,
                                           f"{run.root}/render ({written} images on {workers} {device} worker(s))")
    if not costs:
        raise SageError(f"--measured {run_dir}: no stage there measured anything (all items came from caches, "
                        "or the run predates usage records); rerun a small pilot with --force")
    return costs
