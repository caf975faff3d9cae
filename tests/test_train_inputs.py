"""Corrupt input never reaches training.

Three layers, each ending in exit 2 with one line naming the file or record and the stage to rerun,
and no train stage left behind:
- the run store checks that label's listed outputs are as written (size and mtime; the hash when
  the mtime moved) before the stage starts;
- train refuses a stray file in `RUN/label/dataset` that label's manifest does not list (the
  dataset loader would read it);
- train checks each image against its pair's `sha256_*` column as it reads it, which catches a
  changed byte even when size and mtime were kept, and covers `train.dataset` folders (no
  manifest); a shard pyarrow cannot read is named.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import diffusers.utils.logging
import pyarrow.parquet as pq
import transformers.utils.logging
import pytest
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.config import config_from_dict, dump_config
from sage_builder.stages.train.synthetic import write_synthetic_dataset, write_synthetic_label_stage
from sage_builder.store import Manifest, RunDir

# diffusers and transformers bind their log handler to the stderr of their first use; if that was a
# CliRunner invocation's (closed when it returns), later warnings print a logging traceback.
for _library in (diffusers.utils.logging.get_logger("diffusers"), transformers.utils.logging.get_logger("transformers")):
    for _handler in _library.handlers:
        if isinstance(_handler, logging.StreamHandler):
            _handler.setStream(sys.stderr)


def _pipeline(tmp_path: Path, models_dir: Path, **train) -> Path:
    section = {"model": str(models_dir / "tiny-sdxl"), "resolution": 64, "max_steps": 1, "batch_size": 2,
               "gradient_accumulation": 1, "optimizer": "adamw", "warmup_steps": 0, "mixed_precision": "no",
               "device": "cpu", "eval_split": None, "grid": {"enabled": False}, **train}
    path = tmp_path / "pipeline.yaml"
    path.write_text(dump_config(config_from_dict({"name": "t", "llm": {"model": "x"}, "train": section})))
    return path


def _train(pipeline: Path, run: Path):
    root, before = logging.getLogger(), list(logging.getLogger().handlers)
    try:
        return CliRunner().invoke(app, ["stage", "train", "--config", str(pipeline), "--run-dir", str(run)])
    finally:  # the CLI's log handler writes to this invocation's captured stderr, closed afterwards
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    message = lines[-1]
    for needle in needles:
        assert needle in message, message
    return message


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _image_offset(path: Path, image: bytes) -> int:
    """Where a stretch of the image's own bytes sits in the (uncompressed-literal) Parquet file."""
    data = path.read_bytes()
    window = image[len(image) // 2: len(image) // 2 + 64]
    offset = data.find(window)
    assert offset > 0 and data.find(window, offset + 1) < 0
    return offset + 32


@pytest.fixture()
def run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    write_synthetic_label_stage(run, n_train_pairs=2, n_val_pairs=0)
    return run


def _pairs_shard(root: Path) -> Path:
    return root / "data" / "pairs" / "train-00000-of-00001.parquet"


def test_a_flipped_byte_inside_an_image_of_the_run_dataset_stops_train(tmp_path, models_dir, run):
    shard = _pairs_shard(run.stage("label").file("dataset"))
    image = pq.read_table(shard).column("image_unsafe")[0].as_py()["bytes"]
    _flip_byte(shard, _image_offset(shard, image))
    result = _train(_pipeline(tmp_path, models_dir), run.root)
    _one_line_error(result, str(shard), "sage stage label")
    assert not run.stage("train").path.exists()


@pytest.mark.slow
def test_a_flipped_image_byte_with_size_and_mtime_kept_is_caught_by_the_image_hash(tmp_path, models_dir, run):
    shard = _pairs_shard(run.stage("label").file("dataset"))
    pairs = pq.read_table(shard)
    stat = shard.stat()
    _flip_byte(shard, _image_offset(shard, pairs.column("image_unsafe")[0].as_py()["bytes"]))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # what the run store's cheap check trusts
    result = _train(_pipeline(tmp_path, models_dir), run.root)
    _one_line_error(result, f"pair {pairs.column('pair_id')[0].as_py()}", "image_unsafe does not match its "
                    "sha256_unsafe", "sage stage label --force")
    assert not (run.stage("train").path / "manifest.json").exists()


def test_a_preferences_shard_of_random_bytes_stops_train(tmp_path, models_dir, run):
    shard = run.stage("label").file("dataset") / "data" / "preferences" / "train-00000-of-00001.parquet"
    size = shard.stat().st_size
    shard.write_bytes(os.urandom(size))  # same size: only the hash can tell
    _one_line_error(_train(_pipeline(tmp_path, models_dir), run.root), str(shard), "sha256", "sage stage label")
    shard.write_bytes(os.urandom(size // 2))
    _one_line_error(_train(_pipeline(tmp_path, models_dir), run.root), str(shard), "sage stage label")
    assert not run.stage("train").path.exists()


def test_missing_and_stray_dataset_files_stop_train(tmp_path, models_dir, run):
    root = run.stage("label").file("dataset")
    stray = root / "data" / "pairs" / "train-extra.parquet"
    stray.write_bytes(_pairs_shard(root).read_bytes())
    _one_line_error(_train(_pipeline(tmp_path, models_dir), run.root), str(stray), "not listed in")
    stray.unlink()
    _pairs_shard(root).unlink()
    _one_line_error(_train(_pipeline(tmp_path, models_dir), run.root), str(_pairs_shard(root)), "missing",
                    "sage stage label")
    assert not run.stage("train").path.exists()


@pytest.mark.slow
def test_an_external_dataset_is_checked_by_its_sha256_columns_and_readable_shards(tmp_path, models_dir):
    """`train.dataset` pointing at a folder: no manifest, so the image hashes and the readers decide."""
    root = write_synthetic_dataset(tmp_path / "external", n_train_pairs=2, n_val_pairs=0)
    shard = _pairs_shard(root)
    pairs = pq.read_table(shard)
    image = pairs.column("image_safe")[1].as_py()["bytes"]
    _flip_byte(shard, _image_offset(shard, image))
    run = tmp_path / "run"
    # The stage still needs a label manifest in its run dir (it records it as its input).
    RunDir(run).stage("label").write_manifest(Manifest(stage="label", fingerprint="x", config_hash="x"))
    result = _train(_pipeline(tmp_path, models_dir, dataset=str(root)), run)
    pair = pairs.column("pair_id")[1].as_py()
    _one_line_error(result, f"pair {pair}", "image_safe does not match its sha256_safe", "sage stage label")
    assert not (run / "train" / "manifest.json").exists()

    preferences = root / "data" / "preferences" / "train-00000-of-00001.parquet"
    preferences.write_bytes(os.urandom(preferences.stat().st_size))
    result = _train(_pipeline(tmp_path, models_dir, dataset=str(root)), run)
    _one_line_error(result, str(preferences), "not a readable Parquet file")
