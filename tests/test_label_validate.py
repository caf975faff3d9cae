"""`sage validate`: clean on a fresh dataset, and each deliberate corruption is found and named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.stages.label.dataset import hub_split
from sage_builder.stages.label.validate import validate_dataset
from sage_builder.testing.fake_run import make_fake_run


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    run, config = make_fake_run(tmp_path_factory.mktemp("validate") / "run", n_users=12, pairs_per_category=1)
    run_stage(get_stage("label"), config, run)
    return run.stage("label").file("dataset")


def shard(root: Path, config: str, split: str) -> Path:
    return sorted((root / "data" / config).glob(f"{hub_split(split)}-*.parquet"))[0]


def rewrite(path: Path, edit) -> None:
    """Apply ``edit(rows)`` to a shard's rows and write it back with the same schema and metadata."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    schema = edit(rows) or table.schema
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def corrupt_missing_pair(root):
    rewrite(shard(root, "pairs", "train"), lambda rows: rows.pop(0) and None)


def corrupt_image_bytes(root):
    def edit(rows):
        rows[1]["image_safe"] = {"bytes": b"not a jpeg", "path": rows[1]["image_safe"]["path"]}
    rewrite(shard(root, "pairs", "train"), edit)


def corrupt_image_sha(root):
    def edit(rows):
        rows[2]["sha256_unsafe"] = "0" * 64
    rewrite(shard(root, "pairs", "train"), edit)


def corrupt_embedding_missing(root):
    def edit(rows):
        rows[0]["embedding"] = None
    rewrite(shard(root, "users", "train"), edit)


def corrupt_embedding_dim(root):
    path = shard(root, "users", "train")
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[1]["embedding"] = rows[1]["embedding"][:5]
    index = table.schema.get_field_index("embedding")
    schema = table.schema.set(index, pa.field("embedding", pa.list_(pa.float32()))).remove_metadata()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def corrupt_label(root):
    def edit(rows):
        rec = rows[0]
        rec["chosen_variant"], rec["rejected_variant"] = rec["rejected_variant"], rec["chosen_variant"]
    rewrite(shard(root, "preferences", "train"), edit)


def corrupt_leak(root):
    val_row = pq.read_table(shard(root, "preferences", "val")).to_pylist()[0]

    def edit(rows):
        rows.append(dict(val_row, record_id=val_row["record_id"] + "-copy", caption_variant="u",
                         pair_id=rows[0]["pair_id"], idx=rows[0]["idx"]))
    rewrite(shard(root, "preferences", "train"), edit)


def corrupt_duplicate(root):
    rewrite(shard(root, "preferences", "train"), lambda rows: rows.append(dict(rows[5])))


def corrupt_category(root):
    def edit(rows):
        rows[3]["category"] = "Illegal Activity"
    rewrite(shard(root, "preferences", "test_unseen"), edit)


CORRUPTIONS = {
    "missing-pair": corrupt_missing_pair,
    "image": corrupt_image_bytes,
    "image-sha": corrupt_image_sha,
    "embedding": corrupt_embedding_missing,
    "embedding-dim": corrupt_embedding_dim,
    "label": corrupt_label,
    "leak": corrupt_leak,
    "duplicate": corrupt_duplicate,
    "category": corrupt_category,
}
EXPECTED = {"missing-pair": "pair .* is not in the pairs config",
            "image": r"image_safe does not decode", "image-sha": "image_unsafe sha256 does not match",
            "embedding": "has no embedding", "embedding-dim": "embedding has dimension 5, expected 8",
            "label": "chosen/rejected/reason", "leak": "has val records and train records",
            "duplicate": "also at data/preferences/train-00000-of-00001.parquet row 5",
            "category": "category 'Illegal Activity' is not in the vocabulary"}


def test_clean_dataset_has_no_problems(clean):
    report = validate_dataset(clean)
    assert report.ok, report.lines()
    result = CliRunner().invoke(app, ["validate", str(clean)])
    assert result.exit_code == 0 and result.output.startswith("ok: train=")


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_is_found(clean, tmp_path, name):
    import re

    copy = tmp_path / "copy"
    shutil.copytree(clean, copy)
    CORRUPTIONS[name](copy)
    report = validate_dataset(copy)
    kind = name.split("-sha")[0].split("-dim")[0]
    found = report.problems.get(kind, [])
    assert any(re.search(EXPECTED[name], p) for p in found), report.lines()
    result = CliRunner().invoke(app, ["validate", str(copy)])
    assert result.exit_code == 1
    assert "problem(s)" in result.output.splitlines()[-1]


def test_every_problem_is_listed_at_once(clean, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(clean, copy)
    for corrupt in CORRUPTIONS.values():
        corrupt(copy)
    report = validate_dataset(copy)
    assert {k for k, v in report.problems.items() if v} >= {
        "missing-pair", "image", "embedding", "label", "leak", "duplicate", "category"}
