"""The whole demo with ``executor: local`` and then ``executor: ray``, on this machine, from scratch.

Each run goes into a fresh run directory; the script reports wall time (the `sage run` process),
each stage's seconds from its manifest, the Ray/local ratio, and whether the Parquet outputs of
stages 1-3 are byte-identical between the two runs. The Ray run starts its own local Ray instance
(set RAY_ADDRESS to use a cluster instead); its `ray:` settings are demo.yaml's.

    python benchmarks/bench_ray_demo.py [--config pipelines/demo.yaml] [--keep DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["profiles", "prompts", "render", "label", "publish", "train"]


def run_demo(config: Path, run_dir: Path, extra: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAGE_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sage_builder.cli", "run", "--config", str(config),
                           "--run-dir", str(run_dir), *extra], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"`sage run {' '.join(extra)}` failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return wall


def stage_seconds(run_dir: Path) -> dict[str, float]:
    return {s: json.loads((run_dir / s / "manifest.json").read_text())["seconds"] for s in STAGES}


def parquet_digests(run_dir: Path, stage: str) -> dict[str, str]:
    root = run_dir / stage
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.parquet")) if "_items" not in p.parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "pipelines" / "demo.yaml")
    parser.add_argument("--keep", type=Path, help="write the two run directories here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-ray-"))
    local_dir, ray_dir = base / "local", base / "ray"
    for d in (local_dir, ray_dir):
        if d.exists():
            sys.exit(f"{d} exists; give --keep an empty folder")

    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, python {platform.python_version()}")
    local_wall = run_demo(args.config, local_dir, [])
    ray_wall = run_demo(args.config, ray_dir, ["--set", "executor=ray"])
    local_s, ray_s = stage_seconds(local_dir), stage_seconds(ray_dir)

    print(f"\n{'stage':<10}{'local s':>10}{'ray s':>10}{'ray/local':>11}")
    for stage in STAGES:
        print(f"{stage:<10}{local_s[stage]:>10.1f}{ray_s[stage]:>10.1f}{ray_s[stage] / max(local_s[stage], 1e-9):>11.2f}")
    print(f"{'wall':<10}{local_wall:>10.1f}{ray_wall:>10.1f}{ray_wall / local_wall:>11.2f}")
    same = {stage: parquet_digests(local_dir, stage) == parquet_digests(ray_dir, stage)
            for stage in ("profiles", "prompts", "render")}
    print("\nParquet outputs identical (local vs ray): " + ", ".join(f"{k}={v}" for k, v in same.items()))
    if args.json:
        args.json.write_text(json.dumps({"local": {"wall": local_wall, "stages": local_s},
                                         "ray": {"wall": ray_wall, "stages": ray_s}, "identical": same}, indent=2))


if __name__ == "__main__":
    main()
