"""Client-side cost of `sage publish`: hash + check against the manifest, push + verify, no-op rerun.

The Hub is the local test server (sage_builder.testing.hub_server) on 127.0.0.1, so the figures are
what our code and huggingface_hub's LFS client cost on this machine, not network throughput.

    python benchmarks/bench_publish.py [--mib-per-file 16] [--files 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib-per-file", type=int, default=16)
    parser.add_argument("--files", type=int, default=8)
    args = parser.parse_args()

    import huggingface_hub.constants as constants

    constants.HF_HUB_OFFLINE = False  # the Makefile sets HF_HUB_OFFLINE=1; this talks to localhost only
    constants.HF_HUB_DISABLE_XET = True  # the local server speaks LFS, not Xet
    os.environ["SAGE_NO_PROGRESS"] = "1"

    from sage_builder.stages.publish import hub
    from sage_builder.stages.publish.stage import local_files
    from sage_builder.store import Manifest, RunDir
    from sage_builder.testing.hub_server import HubServer

    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "run")
        label = run.stage("label")
        shards = label.path / "dataset" / "data" / "pairs"
        shards.mkdir(parents=True)
        (label.path / "dataset" / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# bench\n")
        rels = ["dataset/README.md"]
        for i in range(args.files):
            rel = f"dataset/data/pairs/train-{i:05d}-of-{args.files:05d}.parquet"
            rows = [os.urandom(1 << 20) for _ in range(args.mib_per_file)]
            pq.write_table(pa.table({"image": rows}), label.path / rel, compression="none")
            rels.append(rel)
        label.write_manifest(Manifest(stage="label", fingerprint="bench", config_hash="bench",
                                      outputs=label.describe_outputs(rels)))
        mib = sum((label.path / rel).stat().st_size for rel in rels) / 2**20

        with HubServer(token="bench") as server:
            os.environ["HF_ENDPOINT"] = server.endpoint
            api = hub.hub_api("bench")
            start = time.perf_counter()
            files = local_files(run, include_manifests=True)
            hashed = time.perf_counter() - start
            start = time.perf_counter()
            first = hub.push(api, files, "bench/sage")
            pushed = time.perf_counter() - start
            start = time.perf_counter()
            second = hub.push(api, local_files(run, include_manifests=True), "bench/sage")
            rerun = time.perf_counter() - start
    assert not first.differences and not second.differences and second.plan.count("unchanged") == len(files)
    print(f"{mib:.0f} MiB in {len(files)} files: hash + manifest check {hashed:.2f} s ({mib / hashed:.0f} MiB/s); "
          f"push + verify {pushed:.2f} s ({mib / pushed:.0f} MiB/s); no-op rerun incl. hashing {rerun:.2f} s")


if __name__ == "__main__":
    main()
