"""Exports: the PSA authors' layout (exact names and keys) and Pick-a-Pic columns for Diffusion-DPO."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.testing.fake_run import make_fake_run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    run, config = make_fake_run(tmp_path_factory.mktemp("export") / "run", n_users=10, pairs_per_category=1)
    run_stage(get_stage("label"), config, run)
    return run.stage("label").file("dataset")


def rows(root: Path, config: str, split: str) -> list[dict]:
    on_disk = {"val": "validation"}.get(split, split)  # the Hub name of the held-out split
    return [r for f in sorted((root / "data" / config).glob(f"{on_disk}-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_psalign_layout(dataset, tmp_path):
    out = tmp_path / "psalign"
    result = CliRunner().invoke(app, ["export", str(dataset), "--format", "psalign", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["embeddings", "test_seen", "test_unseen", "train", "val"]
    pairs = {p["pair_id"]: p for p in rows(dataset, "pairs", "train")}
    for split in ("train", "val", "test_seen", "test_unseen"):
        records = rows(dataset, "preferences", split)
        lines = [json.loads(line) for line in (out / split / "metadata.jsonl").read_text().splitlines()]
        assert len(lines) == len(records)
        for rec, meta in zip(records, lines):
            assert list(meta) == ["file_name", "chosen", "rejected", "caption", "user_data"]
            assert list(meta["user_data"]) == ["User_ID", "Cluster_ID", "Age", "Age_Group", "Gender", "Religion",
                                               "Physical_Condition", "Mental_Condition"]
            assert meta["user_data"]["User_ID"] == rec["user_id"] and re.fullmatch(r"\d{7}", rec["user_id"])
            assert meta["user_data"]["Cluster_ID"] == str(rec["cluster_id"])
            assert isinstance(meta["user_data"]["Age"], int)
            stem = (f"user_{rec['user_id']}_{rec['category'].lower()}_{rec['concept'].replace(' ', '_')}"
                    f"_{rec['idx']:05d}")
            assert meta["file_name"] == f"{stem}.jpg_{rec['caption_variant']}.jpg"
            assert meta["chosen"] == f"{stem}_{rec['chosen_variant']}.jpg"
            assert meta["rejected"] == f"{stem}_{rec['rejected_variant']}.jpg"
            assert meta["caption"] == rec["caption"]
            for name, variant in ((meta["chosen"], rec["chosen_variant"]), (meta["rejected"], rec["rejected_variant"])):
                data = (out / split / name).read_bytes()
                image_column = "image_unsafe" if variant == "u" else "image_safe"
                assert data == pairs[rec["pair_id"]][image_column]["bytes"]
                assert Image.open(io.BytesIO(data)).format == "JPEG"
    example = next((out / "train").glob("user_*_hate_hate_concept_*_s.jpg"))
    assert re.fullmatch(r"user_\d{7}_hate_hate_concept_\d_0000[1-3]_s\.jpg", example.name)
    users = rows(dataset, "users", "train")
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == sorted(f"{u['user_id']}.npy" for u in users)
    emb = np.load(out / "embeddings" / f"{users[0]['user_id']}.npy")
    assert emb.dtype == np.float32 and emb.shape == (8,)
    np.testing.assert_array_equal(emb, np.asarray(users[0]["embedding"], dtype=np.float32))


def test_pickapic_columns(dataset, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "pickapic"
    result = CliRunner().invoke(app, ["export", str(dataset), "-f", "pickapic", "--out", str(out),
                                      "--split", "train", "--split", "val"])
    assert result.exit_code == 0, result.output
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train", "validation"}
    pairs = {p["pair_id"]: p for p in rows(dataset, "pairs", "train")}
    records = rows(dataset, "preferences", "train")
    train = loaded["train"]
    assert {"jpg_0", "jpg_1", "label_0", "caption", "user_id"} <= set(train.column_names)
    for rec, row in zip(records, train):
        assert row["jpg_0"] == pairs[rec["pair_id"]]["image_unsafe"]["bytes"]
        assert row["jpg_1"] == pairs[rec["pair_id"]]["image_safe"]["bytes"]
        # diffusers' example keeps (jpg_0, jpg_1) when label_0 == 1, so jpg_0 must then be the chosen one.
        assert row["label_0"] == (1.0 if rec["chosen_variant"] == "u" else 0.0)
        assert row["caption"] == rec["caption"] and row["user_id"] == rec["user_id"]
        Image.open(io.BytesIO(row["jpg_0"])).convert("RGB")


def test_export_rejects_unknown_format(dataset, tmp_path):
    result = CliRunner().invoke(app, ["export", str(dataset), "-f", "webdataset", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "choose one of psalign, pickapic" in result.output


def test_psalign_rerun_replaces_an_earlier_export(dataset, tmp_path):
    out = tmp_path / "psalign"
    runner = CliRunner()
    assert runner.invoke(app, ["export", str(dataset), "--out", str(out), "--split", "val"]).exit_code == 0
    stale = out / "val" / "user_9999999_hate_x_00001_s.jpg"
    stale.write_bytes(b"old")
    result = runner.invoke(app, ["export", str(dataset), "--out", str(out), "--split", "val"])
    assert result.exit_code == 2 and "not empty" in result.output and "--overwrite" in result.output
    assert stale.exists()
    assert runner.invoke(app, ["export", str(dataset), "--out", str(out), "--split", "val", "--overwrite"]).exit_code == 0
    assert not stale.exists() and (out / "val" / "metadata.jsonl").exists()
    (tmp_path / "other" / "val").mkdir(parents=True)
    (tmp_path / "other" / "val" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(dataset), "--out", str(tmp_path / "other"), "--split", "val",
                                 "--overwrite"])
    assert result.exit_code == 2 and "not empty" in result.output  # psalign never deletes what it did not write



def test_export_refuses_to_write_into_a_dataset_without_overwrite(dataset, tmp_path):
    import shutil

    from sage_builder.stages.label.validate import validate_dataset

    run = tmp_path / "run"
    shutil.copytree(dataset.parent, run / "label")  # another run's label stage: dataset + manifest
    target = run / "label" / "dataset"
    card = (target / "README.md").read_bytes()
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(dataset), "-f", "pickapic", "--out", str(target)])
    assert result.exit_code == 2 and "holds a dataset" in result.output and "--overwrite" in result.output
    assert (target / "README.md").read_bytes() == card and validate_dataset(target, check_images=False).ok
    for out in (dataset, dataset / "data", dataset.parent):
        result = runner.invoke(app, ["export", str(dataset), "-f", "pickapic", "--out", str(out), "--overwrite"])
        assert result.exit_code == 2 and "the dataset being exported" in result.output, out
    result = runner.invoke(app, ["export", str(dataset), "-f", "pickapic", "--out", str(target), "--overwrite",
                                 "--split", "validation"])
    assert result.exit_code == 0, result.output
    # The overwritten card is what `sage validate` now reports, against the label manifest.
    report = validate_dataset(target, check_images=False)
    assert not report.ok
    assert any(line.startswith("manifest: README.md: differs") and "overwritten" in line for line in report.lines())


def test_validate_checks_the_card_against_the_shards(dataset, tmp_path):
    import shutil

    import yaml

    from sage_builder.stages.label.card import split_card
    from sage_builder.stages.label.validate import validate_dataset

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)  # no manifest beside it: only the card is checked
    assert validate_dataset(copy, check_images=False).ok
    meta, body = split_card((copy / "README.md").read_text())
    meta["sage_builder"]["records"]["train"] += 1
    meta["dataset_info"][0]["splits"][0]["num_examples"] += 5
    (copy / "README.md").write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body)
    lines = validate_dataset(copy, check_images=False).lines()
    assert any("card: README.md: dataset_info says preferences/train has" in line for line in lines), lines
    assert any("card: README.md: sage_builder.records says train has" in line for line in lines), lines


def test_the_card_and_layout_are_ready_for_the_hub(dataset):
    from sage_builder.public import local_paths_in
    from sage_builder.stages.label.card import split_card

    text = (dataset / "README.md").read_text()
    assert local_paths_in(text) == []
    meta, body = split_card(text)
    assert meta["extra_gated_prompt"] and "checkbox" in meta["extra_gated_fields"].values()
    splits = {f["split"] for c in meta["configs"] if c["config_name"] == "preferences" for f in c["data_files"]}
    assert splits == {"train", "validation", "test_seen", "test_unseen"}
    assert list((dataset / "data" / "preferences").glob("validation-*.parquet"))
    assert not list((dataset / "data" / "preferences").glob("val-*.parquet"))
    for needle in ("## Banned categories", "## Loading and joining", "join on pair_id", "join on user_id",
                   "## Citation", "arXiv:2508.01151"):
        assert needle in body, needle
    manifest = (dataset.parent / "manifest.json").read_text()
    assert local_paths_in(manifest) == [], local_paths_in(manifest)
