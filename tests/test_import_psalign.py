"""`sage import --format psalign`: a psalign export read back equals the original; bad input is one line."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.stages.label.dataset import hub_split
from sage_builder.stages.label.export import export_dataset
from sage_builder.stages.label.import_psalign import import_psalign, pair_key_ids
from sage_builder.stages.label.validate import validate_dataset
from sage_builder.testing.fake_run import make_fake_run

SPLITS = ("train", "val", "test_seen", "test_unseen")


def rows(root: Path, config: str, split: str) -> list[dict]:
    return [r for f in sorted((root / "data" / config).glob(f"{hub_split(split)}-*.parquet")) for r in pq.read_table(f).to_pylist()]


def write_users_csv(users: list[dict], path: Path) -> None:
    """The published users.csv format: no id column (row i is user i), list columns as Python literals."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Age", "Age_Group", "Gender", "Religion", "Physical_Condition", "Mental_Condition",
                         "Banned_Categories", "Allowed_Categories"])
        for u in users:
            writer.writerow([u["age"], u["age_group"], u["gender"], u["religion"], u["physical_condition"],
                             u["mental_condition"], str(list(u["banned"])), str(list(u["allowed"]))])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(original dataset, psalign folder, users.csv) from a labelled fake run."""
    base = tmp_path_factory.mktemp("import")
    run, config = make_fake_run(base / "run", n_users=12, pairs_per_category=2)
    run_stage(get_stage("label"), config, run)
    dataset = run.stage("label").file("dataset")
    export_dataset(dataset, base / "psalign", "psalign")
    users = rows(dataset, "users", "train")
    assert [u["user_id"] for u in users] == [f"{i:07d}" for i in range(1, len(users) + 1)]
    write_users_csv(users, base / "users.csv")
    return dataset, base / "psalign", base / "users.csv"


def copy_source(exported, tmp_path: Path) -> tuple[Path, Path, Path]:
    _, src, users = exported
    shutil.copytree(src, tmp_path / "src")
    shutil.copy(users, tmp_path / "users.csv")
    return tmp_path / "src", tmp_path / "src" / "embeddings", tmp_path / "users.csv"


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    _, src, users = exported
    run_dir = tmp_path_factory.mktemp("imported") / "run"
    result = import_psalign(src, src / "embeddings", users, run_dir)
    return result, run_dir


def test_round_trip_equals_the_original(exported, imported):
    original, _, _ = exported
    result, _ = imported
    assert result.report.ok, result.report.lines()
    back = result.dataset
    # Ids are rebuilt: a pair is (category, concept, idx); record_id = user-pair-variant as in stage 4.
    new_id = {p["pair_id"]: pair_key_ids(p["category"], p["concept"], p["idx"])[0]
              for p in rows(original, "pairs", "train")}
    for split in SPLITS:
        before, after = rows(original, "preferences", split), rows(back, "preferences", split)
        assert len(before) == len(after) > 0
        for a, b in zip(before, after):
            assert b["pair_id"] == new_id[a["pair_id"]]
            assert b["record_id"] == f"{a['user_id']}-{b['pair_id']}-{a['caption_variant']}"
            ignore = {"record_id", "pair_id", "concept_id"}
            assert {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}
    # A psalign export holds only pairs dealt to some user: those are the pairs that come back.
    dealt = {r["pair_id"] for split in SPLITS for r in rows(original, "preferences", split)}
    before_pairs = {new_id[p["pair_id"]]: p for p in rows(original, "pairs", "train") if p["pair_id"] in dealt}
    after_pairs = {p["pair_id"]: p for p in rows(back, "pairs", "train")}
    assert set(before_pairs) == set(after_pairs)
    for pid, a in before_pairs.items():
        b = after_pairs[pid]
        for key in ("category", "concept", "idx", "prompt_unsafe", "prompt_safe", "sha256_unsafe", "sha256_safe"):
            assert a[key] == b[key], key
        assert a["image_unsafe"]["bytes"] == b["image_unsafe"]["bytes"]
        assert a["image_safe"]["bytes"] == b["image_safe"]["bytes"]
    keep = ("user_id", "age", "age_group", "gender", "religion", "physical_condition", "mental_condition", "banned",
            "allowed", "split", "test_seen")
    before_users, after_users = rows(original, "users", "train"), rows(back, "users", "train")
    assert [{k: u[k] for k in keep} for u in before_users] == [{k: u[k] for k in keep} for u in after_users]
    for a, b in zip(before_users, after_users):
        np.testing.assert_array_equal(np.float32(a["embedding"]), np.float32(b["embedding"]))
        if a["split"] != "reference":  # the reference user has no records, so no Cluster_ID to read
            assert a["cluster_id"] == b["cluster_id"]


def test_imported_dataset_validates_and_has_a_stage_4_manifest(imported):
    result, run_dir = imported
    report = validate_dataset(result.dataset)
    assert report.ok, report.lines()
    manifest = json.loads((run_dir / "label" / "manifest.json").read_text())
    assert manifest["stage"] == "label" and manifest["stats"]["imported"]["format"] == "psalign"
    listed = {rel for rel in manifest["outputs"]}
    on_disk = {f"dataset/{p.relative_to(result.dataset).as_posix()}" for p in result.dataset.rglob("*") if p.is_file()}
    assert listed == on_disk
    assert manifest["stats"]["repeated_concepts"] == {s: 0 for s in SPLITS}
    assert str(run_dir) not in (result.dataset / "README.md").read_text()  # no local paths in the card
    result2 = CliRunner().invoke(app, ["validate", str(result.dataset)])
    assert result2.exit_code == 0, result2.output


def test_cli_import_and_reimport(exported, tmp_path):
    _, src, users = exported
    args = ["import", str(src), "--format", "psalign", "--embeddings", str(src / "embeddings"),
            "--users", str(users), "--run-dir", str(tmp_path / "run")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.output.strip().splitlines()[-1].endswith("no problems")
    again = CliRunner().invoke(app, args)  # an earlier import is replaced
    assert again.exit_code == 0, again.output


def _fails(args_or_call, run_dir: Path, expect: str) -> None:
    result = CliRunner().invoke(app, args_or_call)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and expect in lines[-1], lines[-1]
    assert not (run_dir / "label" / "dataset").exists() and not (run_dir / "label" / "manifest.json").exists()
    assert not (run_dir / "label" / "dataset.tmp").exists()


def _args(src: Path, emb: Path, users: Path, run_dir: Path) -> list[str]:
    return ["import", str(src), "--embeddings", str(emb), "--users", str(users), "--run-dir", str(run_dir)]


def test_split_folder_without_metadata(exported, tmp_path):
    src, emb, users = copy_source(exported, tmp_path)
    (src / "val" / "metadata.jsonl").unlink()
    _fails(_args(src, emb, users, tmp_path / "run"), tmp_path / "run", "val: no metadata.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(_args(empty, emb, users, tmp_path / "run"), tmp_path / "run", "no metadata.jsonl in any of")


def test_record_whose_image_is_missing(exported, tmp_path):
    src, emb, users = copy_source(exported, tmp_path)
    meta = json.loads((src / "val" / "metadata.jsonl").read_text().splitlines()[0])
    (src / "val" / meta["rejected"]).unlink()
    _fails(_args(src, emb, users, tmp_path / "run"), tmp_path / "run",
           f"val/metadata.jsonl line 1: image {meta['rejected']} is missing")


def test_malformed_json_line_is_named(exported, tmp_path):
    src, emb, users = copy_source(exported, tmp_path)
    path = src / "test_seen" / "metadata.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n")
    _fails(_args(src, emb, users, tmp_path / "run"), tmp_path / "run", "test_seen/metadata.jsonl line 3: not valid JSON")


def test_user_not_in_the_users_file(exported, tmp_path):
    src, emb, users = copy_source(exported, tmp_path)
    text = users.read_text().splitlines()
    users.write_text("\n".join(text[:6]) + "\n")  # users 1-5 only
    _fails(_args(src, emb, users, tmp_path / "run"), tmp_path / "run", "user 0000006 is not in")


def test_embeddings_of_mixed_sizes(exported, tmp_path):
    src, emb, users = copy_source(exported, tmp_path)
    np.save(emb / "0000003.npy", np.zeros(12, dtype=np.float32))
    _fails(_args(src, emb, users, tmp_path / "run"), tmp_path / "run", "(embeddings of mixed sizes)")


def test_user_with_records_but_no_embedding(exported, tmp_path):
    src, emb, users = copy_source(exported, tmp_path)
    (emb / "0000002.npy").unlink()
    _fails(_args(src, emb, users, tmp_path / "run"), tmp_path / "run",
           "user 0000002 has no ")


def test_users_file_with_a_bad_list(exported, tmp_path):
    src, emb, users = copy_source(exported, tmp_path)
    text = users.read_text().replace("['", "[", 1)
    users.write_text(text)
    _fails(_args(src, emb, users, tmp_path / "run"), tmp_path / "run", "is not a Python list literal")


def test_another_embedding_size_is_kept_and_a_model_mismatch_is_one_line(exported, tmp_path):
    src, emb, users = copy_source(exported, tmp_path)
    rng = np.random.default_rng(0)
    for path in emb.glob("*.npy"):
        np.save(path, rng.standard_normal(3584).astype(np.float32))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 576}))
    _fails(_args(src, emb, users, tmp_path / "run") + ["--embedding-model", str(model)], tmp_path / "run",
           "the embeddings are 3584-d, but --embedding-model")
    (model / "config.json").write_text(json.dumps({"hidden_size": 3584}))
    result = import_psalign(src, emb, users, tmp_path / "run", embedding_model=str(model))
    assert result.report.ok
    user = rows(result.dataset, "users", "train")[0]
    assert len(user["embedding"]) == 3584
    np.testing.assert_array_equal(np.float32(user["embedding"]), np.load(emb / f"{user['user_id']}.npy"))


def test_configured_embedding_model_of_another_size_is_one_line(exported, tmp_path):
    src, emb, users = copy_source(exported, tmp_path)
    model = tmp_path / "llm"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 576}))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"name: t\nllm:\n  model: {model}\n")
    _fails(_args(src, emb, users, tmp_path / "run") + ["--config", str(pipeline)], tmp_path / "run",
           f"the embeddings are 8-d, but llm.model (profiles.embedding_model) {model} has hidden size 576")


def test_problems_are_one_line_each_and_strict_writes_nothing(exported, tmp_path):
    src, emb, users = copy_source(exported, tmp_path)
    path = src / "train" / "metadata.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[0]["chosen"], records[0]["rejected"] = records[0]["rejected"], records[0]["chosen"]

    def pair_of(rec: dict) -> str:
        return rec["chosen"].split("_", 2)[2].rsplit("_", 1)[0]  # category_concept_idx

    # Another record of the same pair and caption variant (another user) gets a different caption.
    other = next(i for i, r in enumerate(records) if i > 3 and pair_of(r) == pair_of(records[3])
                 and r["file_name"][-5:] == records[3]["file_name"][-5:])
    records[other]["caption"] = "a different caption"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    # Line 1's images are the first copies of their pair: a broken one is an image problem, and every
    # other user's (good) copy of it a copy problem.
    first = src / "train" / records[0]["rejected"]
    first.unlink()  # copies are hard links: replace this name only
    first.write_bytes(b"not a jpeg")
    # Each user's copy is reported once, at the first record that names it.
    copies: dict[tuple[str, str], str] = {}
    val = [json.loads(line) for line in (src / "val" / "metadata.jsonl").read_text().splitlines()]
    for split, recs in (("train", records), ("val", val)):
        for i, r in enumerate(recs):
            uid = r["user_data"]["User_ID"]
            if pair_of(r) == pair_of(records[0]) and uid != records[0]["user_data"]["User_ID"]:
                copies.setdefault((split, uid), f"{split}/metadata.jsonl line {i + 1}")
    assert copies
    strict = CliRunner().invoke(app, _args(src, emb, users, tmp_path / "strict") + ["--strict"])
    assert strict.exit_code == 2 and "nothing written (--strict)" in strict.output
    assert not (tmp_path / "strict" / "label").exists() or not any((tmp_path / "strict" / "label").iterdir())
    result = CliRunner().invoke(app, _args(src, emb, users, tmp_path / "run") + ["--limit", "100"])
    assert result.exit_code == 0, result.output
    out = result.output.splitlines()
    assert any(line.startswith("label: train/metadata.jsonl line 1: chosen ") for line in out), out
    assert any(line.startswith(f"caption: train/metadata.jsonl line {other + 1}: the ") for line in out), out
    assert any(line.startswith("image: train/metadata.jsonl line 1: ") and "does not decode" in line for line in out)
    for where in copies.values():
        assert any(line.startswith(f"copy: {where}: ") for line in out), out
    problems = (tmp_path / "run" / "label" / "import_problems.txt").read_text().splitlines()
    assert problems[-1].startswith(f"{2 + len(copies) + 1} problem(s)"), problems[-1]
    assert "import_problems.txt" in out[-1]


@pytest.mark.slow
def test_train_stage_trains_on_an_imported_dataset(imported, models_dir, tmp_path):
    from sage_builder.config import config_from_dict

    result, run_dir = imported
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = config_from_dict({"name": "t", "llm": {"model": "x"}, "train": {
        "model": str(models_dir / "tiny-sdxl"), "resolution": 16, "max_steps": 2, "batch_size": 2,
        "gradient_accumulation": 1, "optimizer": "adamw", "learning_rate": 1e-3, "warmup_steps": 0,
        "mixed_precision": "no", "device": "cpu", "eval_noise_draws": 1, "eval_records": 4,
        "grid": {"enabled": False}}})
    from sage_builder.store import RunDir

    manifest = run_stage(get_stage("train"), config, RunDir(run))
    assert manifest.stats["steps"] == 2 and manifest.stats["records"] == 10 * 7 * 2 * 2
    adapter = json.loads((run / "train" / "adapter" / "adapter_config.json").read_text())
    assert adapter["embedding_dim"] == 8  # the adapter's input size comes from the imported embeddings


def test_publish_takes_an_imported_dataset(imported, tmp_path):
    from sage_builder.config import config_from_dict
    from sage_builder.store import RunDir

    _, run_dir = imported
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = config_from_dict({"name": "t", "llm": {"model": "x"}})  # no repo_id: a dry-run plan, no network
    manifest = run_stage(get_stage("publish"), config, RunDir(run))
    files = {p.relative_to(run / "label").as_posix() for p in (run / "label" / "dataset").rglob("*") if p.is_file()}
    assert manifest.stats["dry_run"] and manifest.stats["add"] == len(files) + 1  # + manifests/label.json


def test_status_of_an_imported_dataset_is_done_not_stale(imported, tmp_path):
    """Stages 1-3 never ran in an import's run dir: label is 'done' (nothing to compare with), not 'stale'."""
    from sage_builder.config import config_from_dict
    from sage_builder.stages.base import stage_status
    from sage_builder.store import RunDir

    _, run_dir = imported
    config = config_from_dict({"name": "t", "llm": {"model": "x"}})
    status = stage_status(get_stage("label"), config, RunDir(run_dir))
    assert status.state == "done", status.reason
    assert "made outside this run" in status.reason
