"""`sage import --format psalign` throughput and peak memory on synthetic psalign folders.

Each size gets a folder generated at run time under /tmp (``--tmp``): users of the published shape
(7 categories x 3 pairs x 2 records = 42 records each; 90% train, 5% val, 5% test_unseen, 5% of
train also test_seen), 120 concepts x 10 prompt indices per category, tiny 16 px JPEGs written as
every user's own copy (as the authors' layout has them), 3,584-d float32 embeddings, a users.csv.
The import runs in a fresh process; peak = its VmHWM, baseline = its RSS after imports. In the same
process, a floor is timed first: parse every JSON line and read both image files of every record
(what any import must do), so ``import / floor`` is the import's own cost.

    python benchmarks/bench_import.py [--records 4000 40000] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ["Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking", "Propaganda"]

CHILD = r"""
import json, os, sys, time
os.environ["SAGE_NO_PROGRESS"] = "1"
from pathlib import Path
import datasets  # imported before the baseline: the import uses it for the features
from sage_builder.stages.label.import_psalign import import_psalign
from sage_builder.stages.label.psalign_input import iter_records

def rss_mib(field="VmRSS:"):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
src, run_dir, check = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
base = rss_mib()
t0 = time.perf_counter()
n = 0
for split in ("train", "val", "test_seen", "test_unseen"):
    for _, meta in iter_records(src / split / "metadata.jsonl", split):
        (src / split / meta["chosen"]).read_bytes(); (src / split / meta["rejected"]).read_bytes()
        n += 1
floor = time.perf_counter() - t0
t0 = time.perf_counter()
result = import_psalign(src, src / "embeddings", src / "users.csv", run_dir, check_copies=check)
seconds = time.perf_counter() - t0
print(json.dumps({"records": n, "floor_seconds": floor, "seconds": seconds, "baseline_mib": base,
                  "peak_mib": rss_mib("VmHWM:"), "counts": result.counts, "problems": not result.report.ok}))
"""


def tiny_jpeg(key: str) -> bytes:
    from PIL import Image

    h = hashlib.sha256(key.encode()).digest()
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (h[0], h[1], h[2])).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_psalign(root: Path, n_records: int, dim: int = 3584, seed: int = 0) -> int:
    """A psalign folder of about ``n_records`` records; returns the exact count."""
    import numpy as np

    rng = random.Random(seed)
    n_users = max(20, round(n_records / 42 / 1.05))
    n_val = n_unseen = max(1, n_users // 20)
    n_train = n_users - n_val - n_unseen
    seen = set(rng.sample(range(n_train), max(1, n_users // 20)))
    roles = [["train", "test_seen"] if i in seen else ["train"] for i in range(n_train)]
    roles += [["val"]] * n_val + [["test_unseen"]] * n_unseen
    jpegs: dict[str, bytes] = {}
    files = {s: open(root / s / "metadata.jsonl", "w") for s in ("train", "val", "test_seen", "test_unseen")
             if (root / s).mkdir(parents=True, exist_ok=True) is None}
    total = 0
    users = []
    for i, splits in enumerate(roles):
        uid = f"{i + 1:07d}"
        banned = [c for c in CATEGORIES if rng.random() < 0.5]
        users.append([rng.randint(20, 60), "young adults", "male", "None", "healthy", "healthy",
                      str(banned), str([c for c in CATEGORIES if c not in banned])])
        for split in splits:
            for category in CATEGORIES:
                for c in rng.sample(range(120), 3):
                    idx = 10 if split.startswith("test") else rng.randint(1, 9)
                    stem = f"user_{uid}_{category.lower()}_concept_{c}_{idx:05d}"
                    for v in ("u", "s"):
                        key = f"{category}{c}{idx}{v}"
                        data = jpegs.setdefault(key, tiny_jpeg(key))
                        (root / split / f"{stem}_{v}.jpg").write_bytes(data)
                    for cap in ("u", "s"):
                        chosen = "s" if category in banned else cap
                        files[split].write(json.dumps({
                            "file_name": f"{stem}.jpg_{cap}.jpg", "chosen": f"{stem}_{chosen}.jpg",
                            "rejected": f"{stem}_{'u' if chosen == 's' else 's'}.jpg",
                            "caption": f"{'unsafe' if cap == 'u' else 'safe'} scene {idx} of {category} concept {c}",
                            "user_data": {"User_ID": uid, "Cluster_ID": str(i % 5), "Age": users[-1][0],
                                          "Age_Group": "young adults", "Gender": "male", "Religion": "None",
                                          "Physical_Condition": "healthy", "Mental_Condition": "healthy"}}) + "\n")
                        total += 1
    for handle in files.values():
        handle.close()
    with open(root / "users.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Age", "Age_Group", "Gender", "Religion", "Physical_Condition", "Mental_Condition",
                         "Banned_Categories", "Allowed_Categories"])
        writer.writerows(users)
    (root / "embeddings").mkdir()
    vectors = np.random.default_rng(seed).standard_normal((len(users), dim)).astype(np.float32)
    for i, vector in enumerate(vectors):
        np.save(root / "embeddings" / f"{i + 1:07d}.npy", vector)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[4_000, 40_000])
    parser.add_argument("--tmp", default="/tmp")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-import-", dir=args.tmp) as tmp:
        for n in args.records:
            src = Path(tmp) / f"psalign-{n}"
            t0 = time.perf_counter()
            exact = make_psalign(src, n)
            made = time.perf_counter() - t0
            for check in (True, False):
                out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(tmp) / f"run-{n}-{check}"),
                                      "1" if check else "0"], check=True, capture_output=True, text=True,
                                     cwd=ROOT, env={**os.environ, "SAGE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"})
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r.update(check_copies=check, fixture_seconds=round(made, 1), generated=exact)
                results.append(r)
                print(json.dumps(r), flush=True)
    small = results[0]
    print(f"\n| records | check copies | import s | records/s | floor s | import / floor | peak MiB | "
          f"over baseline MiB | records x | peak x |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['records']:,} | {'yes' if r['check_copies'] else 'no'} | {r['seconds']:.1f} | "
              f"{r['records'] / r['seconds']:,.0f} | {r['floor_seconds']:.1f} | {r['seconds'] / r['floor_seconds']:.2f} | "
              f"{r['peak_mib']:.0f} | {r['peak_mib'] - r['baseline_mib']:.0f} | "
              f"{r['records'] / small['records']:.0f} | {r['peak_mib'] / small['peak_mib']:.2f} |")
    print(f"\nload average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
