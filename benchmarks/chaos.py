"""Chaos: SIGKILL a stage at seeded random points, rerun it, and compare with an uninterrupted run.

For each chosen stage (default 1-4 and 6), N times: copy a reference run directory with only the
stage's inputs done, start ``sage stage <name>`` in its own process, kill it with SIGKILL after a
seeded random share of the stage's reference wall time, rerun the same command to completion and
compare every output with the reference:

- Parquet: the set of rows (row order ignored; duplicates counted), with the same columns, timing
  columns (``images_per_s``...) left out;
- JSON: equal after dropping timings and cache accounting (``seconds``, ``*_s``, ``*_at``, ``usage``,
  ``from_cache``, ``reused``...: a resumed run reuses items and sends fewer requests, by design);
- anything else (PNG, safetensors, text): equal bytes.

A temp file left behind (``.*.tmp-*``) also counts as a difference. The LLM stages talk to the local
chat-completions server (``sage_builder.testing.chat_server``) in this process, so they are fast;
the render and train stages use the tiny models of ``make models``.

    python benchmarks/chaos.py --kills 20                 # stages 1 2 3 4 6
    python benchmarks/chaos.py --kills 3 --stages 2 4     # a quick look

Prints one row per stage: kills (the process was still running when killed), finished first (it ended
before the kill came: not counted as a kill), identical, different, and the files that differed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_builder.config import dump_config, load_config  # noqa: E402
from sage_builder.stages import STAGE_ORDER  # noqa: E402
from sage_builder.store import RunDir  # noqa: E402

MODELS = ROOT / ".cache" / "models"
# JSON keys that describe this invocation rather than the data: timings, and what came from caches or
# was sent (a resumed run reuses items and sends fewer requests, by design).
VOLATILE_KEYS = ("seconds", "elapsed", "duration", "per_second", "throughput", "time", "_at", "_s", "started",
                 "finished", "wall", "usage", "from_cache", "reused", "rendered_now", "requests")


def chaos_pipeline(work: Path, base_url: str) -> Path:
    """The demo, made small, with both LLM stages on the local server and stage 1 embedding locally.

    Written once into ``work``: a later run on the same folder keeps it (only the server's address
    changes, which no hash sees), so its reference stays valid while pipelines/demo.yaml moves on.
    """
    path = work / "chaos.yaml"
    if path.exists():
        path.write_text(dump_config(load_config(path, [f"llm.base_url={base_url}"])))
        return path
    config = load_config(ROOT / "pipelines" / "demo.yaml", [
        "llm.backend=openai", "llm.model=scripted", f"llm.base_url={base_url}", "llm.concurrency=4",
        "llm.max_retries=0", "llm.request_timeout_s=10",
        f"profiles.embedding_model={MODELS / 'smollm2-135m-instruct'}", "profiles.n_users=12",
        "profiles.n_clusters=3", "profiles.tsne_perplexity=3",
        "prompts.seeds_per_category=2", "prompts.concepts_per_category=2", "prompts.pairs_per_concept=2",
        "render.steps=1", "train.grid.steps=1", "train.grid.prompts=[a city street at night]",
        "train.max_steps=4", "train.checkpoint_every=1",
        "train.eval_records=4",
    ])
    path.write_text(dump_config(config))
    return path


def sage_command(pipeline: Path, run: Path, stage: str) -> list[str]:
    # Run from ROOT: `python -m` puts the current folder first on sys.path, ahead of PYTHONPATH.
    return [sys.executable, "-m", "sage_builder.cli", "stage", stage, "--config", str(pipeline), "--run-dir", str(run)]


def environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "SAGE_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_to_end(pipeline: Path, run: Path, stage: str) -> float:
    started = time.monotonic()
    result = subprocess.run(sage_command(pipeline, run, stage), env=environment(), capture_output=True, text=True,
                            timeout=3600, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"sage stage {stage} failed ({result.returncode}): {result.stderr[-1500:]}")
    return time.monotonic() - started


def drop_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: drop_timings(v) for k, v in value.items()
                if not any(k == t or k.endswith(t) for t in VOLATILE_KEYS)}
    if isinstance(value, list):
        return [drop_timings(v) for v in value]
    return value


def same_file(a: Path, b: Path) -> bool:
    if a.suffix == ".parquet":
        import pyarrow.parquet as pq

        ta, tb = pq.read_table(a), pq.read_table(b)
        if ta.schema.names != tb.schema.names:
            return False
        timings = [n for n in ta.schema.names if any(n == t or n.endswith(t) for t in VOLATILE_KEYS)]
        ta, tb = ta.drop_columns(timings), tb.drop_columns(timings)  # e.g. metrics' images_per_s
        rows = lambda t: Counter(json.dumps(r, sort_keys=True, default=repr) for r in t.to_pylist())  # noqa: E731
        return rows(ta) == rows(tb)
    if a.suffix == ".json":
        return drop_timings(json.loads(a.read_text())) == drop_timings(json.loads(b.read_text()))
    return a.read_bytes() == b.read_bytes()


def differences(stage: str, reference: Path, candidate: Path) -> list[str]:
    """The stage's outputs (as the reference manifest lists them) that differ, plus leftovers."""
    manifest = RunDir(reference).stage(stage).read_manifest()
    assert manifest is not None
    found = []
    rerun = RunDir(candidate).stage(stage).read_manifest()
    if rerun is None:
        return ["manifest.json missing"]
    if set(rerun.outputs) != set(manifest.outputs):
        found.append("the list of outputs")
    for rel in manifest.outputs:
        a, b = reference / stage / rel, candidate / stage / rel
        if not b.exists() or not same_file(a, b):
            found.append(rel)
    leftovers = [p.name for p in (candidate / stage).rglob(".*.tmp-*")]
    return found + [f"temp file {name}" for name in leftovers[:3]]


@dataclass
class StageResult:
    stage: str
    reference_s: float
    kills: int = 0
    finished_first: int = 0
    identical: int = 0
    different: int = 0
    what_differed: Counter = field(default_factory=Counter)


def chaos_stage(stage: str, pipeline: Path, reference: Path, reference_s: float, work: Path, kills: int,
                rng: random.Random) -> StageResult:
    result = StageResult(stage, reference_s)
    downstream = STAGE_ORDER[STAGE_ORDER.index(stage):]
    attempt = 0
    while result.kills < kills and attempt < kills * 3:
        attempt += 1
        run = work / f"{stage}-{attempt:03d}"
        shutil.copytree(reference, run)
        for name in downstream:
            shutil.rmtree(run / name, ignore_errors=True)  # the stage starts from its inputs only
        delay = rng.uniform(0.05, 1.0) * reference_s
        process = subprocess.Popen(sage_command(pipeline, run, stage), env=environment(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            process.wait(timeout=delay)
            result.finished_first += 1
            shutil.rmtree(run, ignore_errors=True)
            continue
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        result.kills += 1
        run_to_end(pipeline, run, stage)
        found = differences(stage, reference, run)
        if found:
            result.different += 1
            result.what_differed.update(found)
        else:
            result.identical += 1
            shutil.rmtree(run, ignore_errors=True)
        print(f"  {stage} kill {result.kills} at {delay:.1f} s: {'different: ' + ', '.join(found) if found else 'identical'}",
              flush=True)
    return result


def llm_script() -> Any:
    """Stage 2's requests get its scripted replies; stage 1's get the server's schema-valid default."""
    from sage_builder.stages.prompts.fixtures import chat_script

    prompts = chat_script()
    names = {"ConceptDescription", "ConceptExpansion", "ImagePrompt"}

    def script(request: dict[str, Any], call: int) -> Any:
        # A request without a schema (the backend's readiness probe) gets the server's default.
        name = ((request.get("response_format") or {}).get("json_schema") or {}).get("name")
        return prompts(request, call) if name in names else None

    return script


def needed_stages(stages: list[str]) -> list[str]:
    """The chosen stages and every stage they read from, in pipeline order."""
    from sage_builder.stages import get_stage

    needed, todo = set(), list(stages)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(get_stage(name).inputs)
    return [name for name in STAGE_ORDER if name in needed]


def run_chaos(work: Path, stages: list[str], kills: int, seed: int,
              kills_for: dict[str, int] | None = None) -> list[StageResult]:
    """``kills`` per stage (``kills_for`` overrides it per stage). A reference already in ``work``
    (with ``reference-times.json``) is reused; the stages it lacks are run and added."""
    from sage_builder.testing.chat_server import ChatServer

    rng = random.Random(seed)
    results = []
    with ChatServer(script=llm_script()) as server:
        pipeline = chaos_pipeline(work, server.base_url)
        reference = work / "reference"
        times_file = work / "reference-times.json"
        times = json.loads(times_file.read_text()) if times_file.exists() else {}
        for name in needed_stages(stages):
            if name in times and (reference / name / "manifest.json").exists():
                continue
            times[name] = run_to_end(pipeline, reference, name)
            times_file.write_text(json.dumps(times))
            print(f"reference {name}: {times[name]:.1f} s", flush=True)
        for name in stages:
            n = (kills_for or {}).get(name, kills)
            results.append(chaos_stage(name, pipeline, reference, times[name], work, n, rng))
    return results


def table(results: list[StageResult]) -> str:
    lines = ["| # | stage | reference s | kills | finished before the kill | identical | different | what differed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        what = ", ".join(f"{k} ({v})" for k, v in r.what_differed.most_common(4)) or "-"
        lines.append(f"| {STAGE_ORDER.index(r.stage) + 1} | {r.stage} | {r.reference_s:.1f} | {r.kills} | "
                     f"{r.finished_first} | {r.identical} | {r.different} | {what} |")
    return "\n".join(lines)


def frozen_code(work: Path) -> Path:
    """The committed code (``git archive HEAD``) in ``work/code``, made once: the stages then run the
    same code and templates from the reference to the last kill, whatever changes in the work tree."""
    code = work / "code"
    if not code.exists():
        code.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
        (code / ".cache").symlink_to(ROOT / ".cache")
    return code


def main() -> None:
    if os.environ.get("SAGE_CHAOS_FROZEN") != "1" and "--live" not in sys.argv:
        work = next((Path(b) for a, b in zip(sys.argv, sys.argv[1:]) if a == "--work"), None)
        if work is None:
            work = Path(tempfile.mkdtemp(prefix="sage-chaos-"))
            sys.argv += ["--work", str(work)]
        code = frozen_code(work.resolve())
        env = {**os.environ, "SAGE_CHAOS_FROZEN": "1", "PYTHONPATH": str(code)}
        os.execve(sys.executable, [sys.executable, str(code / "benchmarks" / "chaos.py"), *sys.argv[1:]], env)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", action="store_true", help="run the work tree's code (default: HEAD, frozen)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs per stage")
    parser.add_argument("--stages", nargs="+", default=["1", "2", "3", "4", "6"], help="names or numbers")
    parser.add_argument("--kills-for", nargs="*", default=[], metavar="STAGE=N",
                        help="another number of kills for some stages, e.g. profiles=5 train=5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temp folder)")
    args = parser.parse_args()
    stages = [STAGE_ORDER[int(s) - 1] if s.isdigit() else s for s in args.stages]
    work = args.work or Path(tempfile.mkdtemp(prefix="sage-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    kills_for = {}
    for item in args.kills_for:
        name, _, n = item.partition("=")
        kills_for[STAGE_ORDER[int(name) - 1] if name.isdigit() else name] = int(n)
    results = run_chaos(work, stages, args.kills, args.seed, kills_for)
    print(table(results))
    print(f"{sum(r.kills for r in results)} kills in {time.monotonic() - started:.0f} s; seed {args.seed}; "
          f"work folder {work} (runs that differed are kept there)")


if __name__ == "__main__":
    main()
