"""Stage 4 (label) throughput and peak memory at 1,000 / 10,000 / 100,000 users.

Each size gets a synthetic run (sage_builder.testing.fake_run: profiles, 120 concepts x 10 pairs per
category, a render index without image bytes) and the label stage runs in a fresh process with the
`pairs` config skipped, so the figures are labelling and the preferences/users shards only. Peak
RSS is the child's VmHWM; "over baseline" subtracts the RSS after imports, before labelling.

    python benchmarks/bench_label.py [--users 1000 10000 100000] [--embedding-dim 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, sys, time
os.environ["SAGE_NO_PROGRESS"] = "1"
import datasets  # imported before the baseline: the stage uses it for the features
from pathlib import Path
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.store import RunDir
from sage_builder.testing.fake_run import fake_config

def rss_mib(field="VmRSS:"):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
root, n_users, k = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
config = fake_config(n_users, pairs_per_concept=10, pairs_per_category=k, include_pairs=False)
run = RunDir(root)
stage = get_stage("label")
import threading
samples = []
def sample():
    while True:
        samples.append(rss_mib())
        time.sleep(0.5)
base = rss_mib()
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
manifest = run_stage(stage, config, run)
seconds = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries the parent's high-water mark across fork + exec into ru_maxrss.
peak = rss_mib("VmHWM:")
print(json.dumps({"users": n_users, "records": sum(manifest.stats["records"].values()), "seconds": seconds,
                  "baseline_mib": base, "peak_mib": peak,
                  "rss_timeline_mib": [round(x) for x in samples[::max(1, len(samples) // 20)]], "pair_uses": manifest.stats["pair_uses"],
                  "split_records": manifest.stats["records"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--embedding-dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sage_builder.testing.fake_run import make_fake_run

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-label-") as tmp:
        for n in args.users:
            root = Path(tmp) / f"run-{n}"
            t0 = time.perf_counter()
            make_fake_run(root, n_users=n, concepts_per_category=120, pairs_per_concept=10, pairs_per_category=args.k,
                          embedding_dim=args.embedding_dim, image_bytes=False, include_pairs=False)
            made = time.perf_counter() - t0
            out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(n), str(args.k)], check=True,
                                 capture_output=True, text=True, env={**os.environ, "SAGE_NO_PROGRESS": "1"})
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["fixture_seconds"] = made
            result["profiles_mib"] = (root / "profiles" / "profiles.parquet").stat().st_size / 2**20
            results.append(result)
            print(json.dumps(result), flush=True)
    base = results[0]
    print(f"\nlabel stage, {os.cpu_count()} CPU(s), embedding dim {args.embedding_dim}, K={args.k}, no image bytes")
    print(f"{'users':>8} {'records':>10} {'seconds':>8} {'records/s':>10} {'peak MiB':>9} {'over base':>9} "
          f"{'x users':>8} {'x peak':>7}")
    for r in results:
        rate = r["records"] / r["seconds"]
        over = r["peak_mib"] - r["baseline_mib"]
        print(f"{r['users']:>8} {r['records']:>10} {r['seconds']:>8.1f} {rate:>10.0f} {r['peak_mib']:>9.0f} "
              f"{over:>9.0f} {r['users'] / base['users']:>8.0f} {r['peak_mib'] / base['peak_mib']:>7.2f}")


if __name__ == "__main__":
    main()
