"""Stage 2 of the demo, the old path against the new one, in one run on one machine (issue 18).

Both paths run the whole prompts stage of ``pipelines/demo.yaml`` as a user runs it (``sage stage
prompts`` in its own process, a fresh run directory, so no item cache), with the same model, seeds,
concepts and checks:

- ``old``: ``llm.decoder: generate`` (transformers' generate() and the old logits processor), the
  stage-2 templates as committed at ``--old-templates`` (fields first; default ``fdfd633^``, the commit
  before they were reordered), p_s at ``llm.temperature`` (``prompts.safe_temperature: null``) and the
  demo's batch size before issue 18 (``llm.batch_size: 8``);
- ``new``: the working tree's config (the cached engine, today's templates, the demo's
  ``safe_temperature`` and ``batch_size``).

``--set KEY=VALUE`` (repeatable) applies to both paths, after the above.

Per path it prints the stage's seconds (its manifest), engine requests, kept pairs, requests per
kept pair, rejected attempts, the torch threads the backend chose and the decoder; then the speed-up
(old seconds / new seconds), the load average before and after each path, and the CPU time the
hypervisor stole during each path (``/proc/stat``; a VM's neighbours can slow one path and not the
other, so a ratio with much steal on one side is not a clean figure).

    python benchmarks/bench_stage2.py                      # old, then new
    python benchmarks/bench_stage2.py --paths new old      # the other order
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD_TEMPLATES = "fdfd633^"
TEMPLATE_NAMES = ("concept_describe", "concept_expand", "pair_unsafe", "pair_safe")


def old_overrides(revision: str, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    sets = ["llm.decoder=generate", "prompts.safe_temperature=null", "llm.batch_size=8"]
    for name in TEMPLATE_NAMES:
        text = subprocess.run(["git", "show", f"{revision}:prompts/{name}.txt"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
        sets.append(f"prompts.templates.{name}={folder / f'{name}.txt'}")
    return sets


def cpu_steal_seconds() -> float | None:
    """CPU time the hypervisor gave to others (``/proc/stat`` steal, all cores); None where unreadable."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_path(config: Path, run: Path, sets: list[str]) -> dict:
    before = os.getloadavg()[0]
    steal_before = cpu_steal_seconds()
    command = [sys.executable, "-m", "sage_builder.cli", "stage", "prompts", "--config", str(config),
               "--run-dir", str(run)]
    for item in sets:
        command += ["--set", item]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAGE_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"sage stage prompts failed ({result.returncode}): {result.stderr.strip()[-800:]}")
    manifest = json.loads((run / "prompts" / "manifest.json").read_text())
    stats, usage = manifest["stats"], manifest["stats"]["llm_usage"]
    return {"seconds": manifest["seconds"], "requests": usage["requests"], "pairs": stats["pairs"],
            "slots": stats["pair_slots"], "rejected": stats["rejected_attempts"],
            "threads": usage.get("threads"), "decoder": usage.get("decoder"),
            "edit_similarity": stats.get("edit_similarity_mean"), "concept_named": stats.get("concept_named_share"),
            "load_before": before, "load_after": os.getloadavg()[0],
            "steal": None if steal_before is None else cpu_steal_seconds() - steal_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "pipelines" / "demo.yaml")
    parser.add_argument("--paths", nargs="+", default=["old", "new"], choices=["old", "new"])
    parser.add_argument("--old-templates", default=OLD_TEMPLATES, help="git revision of the old path's templates")
    parser.add_argument("--work", type=Path, default=None, help="folder for the run directories (default: temp)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both paths")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-stage2-"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; code at {commit}; "
          f"config {args.config.name}; work {work}")
    results = {}
    for path in args.paths:
        sets = old_overrides(args.old_templates, work / "old-templates") if path == "old" else []
        results[path] = run_path(args.config, work / path, sets + args.sets)
        r = results[path]
        print(f"{path}: {r['seconds']:.1f} s, {r['requests']} requests, {r['pairs']}/{r['slots']} pairs kept, "
              f"{r['requests'] / max(r['pairs'], 1):.2f} requests per kept pair, {r['rejected']} rejected attempts, "
              f"decoder {r['decoder']}, {r['threads']} threads, edit similarity {r['edit_similarity']}, concept "
              f"named {r['concept_named']}; load {r['load_before']:.2f} -> {r['load_after']:.2f}; CPU steal "
              f"{'not readable' if r['steal'] is None else format(r['steal'], '.1f') + ' core-s'}", flush=True)
    if {"old", "new"} <= results.keys():
        print(f"speed-up old/new: {results['old']['seconds'] / results['new']['seconds']:.2f}x by stage seconds; "
              f"{results['old']['seconds'] / results['old']['requests']:.2f} vs "
              f"{results['new']['seconds'] / results['new']['requests']:.2f} s per request")


if __name__ == "__main__":
    main()
