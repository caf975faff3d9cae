"""Stage 4 with screened renders: the pairs config carries each pair's outcome and scores, and the
dataset card shows screening rates per category (or says that screening did not run)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.stages.label.dataset import shard_files
from sage_builder.store import write_parquet
from sage_builder.testing.fake_run import make_fake_run


def screen_run(tmp_path):
    run, config = make_fake_run(tmp_path / "run", n_users=20)
    pairs = pq.read_table(run.stage("prompts").file("pairs.parquet")).to_pylist()
    rows, per_category = [], {}
    for i, pair in enumerate(pairs):
        outcome = ["ok", "unsafe_clean", "ok", "ok"][i % 4]
        scores = json.dumps({"nudenet": {"u": {"flagged": outcome == "ok"}, "s": {"flagged": False}}})
        if i % 5 == 0:  # rerendered once: attempt 1 was safe_flagged
            rows.append({"pair_id": pair["pair_id"], "category": pair["category"], "attempt": 1, "outcome":
                         "safe_flagged", "scores": "{}", "final": False})
        rows.append({"pair_id": pair["pair_id"], "category": pair["category"], "attempt": 2 if i % 5 == 0 else 1,
                     "outcome": outcome, "scores": scores, "final": True})
        c = per_category.setdefault(pair["category"], {"pairs": 0, "ok": 0, "safe_flagged": 0, "unsafe_clean": 0,
                                                       "error": 0, "rerendered": 0, "dropped": 0, "kept": 0})
        c["pairs"] += 1
        c["safe_flagged" if i % 5 == 0 else outcome] += 1
        c["rerendered"] += int(i % 5 == 0)
        c["kept"] += 1
    write_parquet(pa.Table.from_pylist(rows), run.stage("render").file("screening.parquet"))
    render = run.stage("render")
    manifest = render.read_manifest()
    totals = {k: sum(c[k] for c in per_category.values()) for k in next(iter(per_category.values()))}
    manifest.stats["screen"] = {
        "enabled": True, "scorer_names": ["nudenet"], "not_run": ["Q16: not run"],
        "scorers": {"nudenet": {"model": "nudenet==3.0.8/best.onnx"}},
        "actions": {"safe_flagged": "rerender", "unsafe_clean": "record", "error": "drop", "max_attempts": 3},
        "per_category": per_category, "totals": totals}
    manifest.outputs.update(render.describe_outputs(["screening.parquet"]))
    render.write_manifest(manifest)
    return run, config, rows


def test_pairs_config_and_card_carry_the_screening(tmp_path):
    run, config, rows = screen_run(tmp_path)
    run_stage(get_stage("label"), config, run)
    dataset = run.stage("label").file("dataset")
    table = pa.concat_tables([pq.read_table(p) for p in shard_files(dataset, "pairs", "train")])
    final = {r["pair_id"]: r for r in rows if r["final"]}
    got = table.select(["pair_id", "screen_outcome", "screen_attempts", "screen_scores"]).to_pylist()
    assert len(got) == len(final)
    for row in got:
        want = final[row["pair_id"]]
        assert (row["screen_outcome"], row["screen_attempts"], row["screen_scores"]) == \
            (want["outcome"], want["attempt"], want["scores"])
    card = (dataset / "README.md").read_text()
    assert "## Screening" in card and "- Q16: not run" in card and "nudenet (`nudenet==3.0.8/best.onnx`)" in card
    section = card.split("## Screening", 1)[1].split("\n## ", 1)[0]
    hate = next(line for line in section.splitlines() if line.startswith("| Hate |"))
    stats = run.stage("render").read_manifest().stats["screen"]["per_category"]["Hate"]
    ok = f"{stats['ok'] / stats['pairs']:.0%} ({stats['ok']})"
    assert hate.split(" | ")[1:3] == [str(stats["pairs"]), ok] and stats["ok"] > 0, hate
    assert hate.split(" | ")[-1] == f"{stats['kept']} |"


def test_card_says_screening_did_not_run(tmp_path):
    run, config = make_fake_run(tmp_path / "run", n_users=20)
    # A screening table an earlier run left behind, not in this render's manifest, is ignored.
    write_parquet(pa.table({"pair_id": ["x"], "attempt": [1], "outcome": ["ok"], "scores": ["{}"], "final": [True]}),
                  run.stage("render").file("screening.parquet"))
    run_stage(get_stage("label"), config, run)
    dataset = run.stage("label").file("dataset")
    card = (dataset / "README.md").read_text()
    assert "Screening: not run (`render.screen.enabled` was false)" in card
    table = pq.read_table(shard_files(dataset, "pairs", "train")[0], columns=["screen_outcome"])
    assert table.column("screen_outcome").null_count == table.num_rows
