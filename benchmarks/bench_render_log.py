"""How much `sage stage render` prints: bytes and lines of its console output, and whether any prompt
text leaks into it (the prompts are harmful by design and CI logs are widely readable).

The run has stages 1-2 from ``sage_builder.testing.fake_run`` with 39 real pairs (78 images, the demo's
count) taken from ``tests/data/published_pairs_sample.csv``: the published prompts are long (most
exceed 77 characters), which is what made the tiny SDXL's 77-character tokenizer warn on every batch.
Rendering is the demo's: the tiny SDXL at 64 px, 2 steps, on CPU, through the real CLI.

    python benchmarks/bench_render_log.py [--model .cache/models/tiny-sdxl] [--verbose]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_run(root: Path, model: Path, n_pairs: int) -> Path:
    from sage_builder.config import dump_config
    from sage_builder.store import stable_hash, write_parquet
    from sage_builder.testing.fake_run import _finish, make_fake_run

    run, config = make_fake_run(root, n_users=24, concepts_per_category=1, pairs_per_concept=2)
    with open(REPO / "tests" / "data" / "published_pairs_sample.csv", encoding="utf-8") as handle:
        published = list(csv.DictReader(handle))
    by_category: dict[str, list[dict[str, str]]] = {}
    for row in published:
        by_category.setdefault(row["category"], []).append(row)
    chosen = [rows[i] for i in range(max(map(len, by_category.values())))
              for rows in by_category.values() if i < len(rows)][:n_pairs]
    pairs = [{"pair_id": stable_hash(r["category"], r["concept"], r["idx"], length=16),
              "concept_id": stable_hash(r["category"], r["concept"], length=12), "category": r["category"],
              "concept": r["concept"], "idx": int(r["idx"]), "prompt_unsafe": r["prompt_unsafe"],
              "prompt_safe": r["prompt_safe"], "tokens_unsafe": 0, "tokens_safe": 0, "llm_model": "published",
              "llm_temperature": 0.0} for r in chosen]
    write_parquet(pa.Table.from_pylist(pairs), run.stage("prompts").file("pairs.parquet"))
    _finish(run, "prompts", ["concepts.parquet", "pairs.parquet"], {}, {"pairs": len(pairs)})
    shutil.rmtree(run.stage("render").path)
    data = config.model_dump(mode="json", exclude={"source"})
    data["render"].update(model=str(model), steps=2, guidance=5.0, height=64, width=64, dtype="float32",
                          encoding="jpeg", quality=90, batch_size=8, device="cpu", threads=2)
    from sage_builder.config import config_from_dict

    path = root / "pipeline.yaml"
    path.write_text(dump_config(config_from_dict(data)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / ".cache" / "models" / "tiny-sdxl"))
    parser.add_argument("--pairs", type=int, default=39)
    parser.add_argument("--verbose", action="store_true", help="pass -v (library messages back on)")
    parser.add_argument("--save-log", type=Path, help="also write the console output there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        pipeline = build_run(root, Path(args.model), args.pairs)
        import pyarrow.parquet as pq

        prompts = [p for row in pq.read_table(root / "prompts" / "pairs.parquet").to_pylist()
                   for p in (row["prompt_unsafe"], row["prompt_safe"])]
        cmd = [sys.executable, "-m", "sage_builder.cli", "stage", "render", "--config", str(pipeline),
               "--run-dir", str(root)] + (["-v"] if args.verbose else [])
        # This checkout's code (a worktree of another commit measures that commit).
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        log = done.stdout + done.stderr
        if args.save_log:
            args.save_log.write_text(log)
        leaked = sum(1 for p in prompts if any(p[i:i + 30] in log for i in range(0, max(1, len(p) - 30), 10)))
        stage_log = root / "render" / "render.log"
        print(json.dumps({
            "model": Path(args.model).name, "images": len(prompts), "exit_code": done.returncode,
            "console_bytes": len(log.encode()), "console_lines": log.count("\n"),
            "truncation_warning_lines": sum("truncated because CLIP" in line for line in log.splitlines()),
            "prompts_leaked_into_console": leaked,
            "stage_log_file_bytes": stage_log.stat().st_size if stage_log.exists() else None,
        }, indent=1))
        if done.returncode:
            print(log[-3000:], file=sys.stderr)


if __name__ == "__main__":
    main()
