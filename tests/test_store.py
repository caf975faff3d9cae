"""Run store: atomic writes, crash-safe item cache, stable hashes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sage_builder.config import LLMConfig
from sage_builder.store import ItemCache, RunDir, atomic_path, atomic_write_text, stable_hash, write_parquet


def test_atomic_write_leaves_no_partial_file_on_error(tmp_path):
    target = tmp_path / "out" / "table.parquet"
    write_parquet(pa.table({"a": [1, 2]}), target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a parq")
            raise RuntimeError("killed mid-write")
    assert pq.read_table(target).column("a").to_pylist() == [1, 2]  # the old file is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.parquet"]  # no temp file left


def test_atomic_write_replaces(tmp_path):
    target = tmp_path / "note.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two" and len(list(tmp_path.iterdir())) == 1


def test_item_cache_resume_and_dedupe(tmp_path):
    cache = RunDir(tmp_path).stage("prompts").items("pairs")
    assert cache.done_keys() == set() and cache.read() is None
    with cache.writer(flush_rows=2) as writer:
        for key in ["a", "b", "c"]:
            writer.add({"item_key": key, "value": key.upper()})
        assert len(cache.parts()) == 1  # flushed after two rows; "c" still buffered
    assert cache.done_keys() == {"a", "b", "c"}  # the exit flushed the rest

    # A crashed loop still keeps what it finished.
    with pytest.raises(KeyError):
        with cache.writer(flush_rows=100) as writer:
            writer.add({"item_key": "d", "value": "D"})
            raise KeyError("boom")
    assert "d" in cache.done_keys()

    # The same key written twice (parallel writers): the earlier part wins, no duplicate row.
    cache.write([{"item_key": "a", "value": "late"}])
    table = cache.read()
    assert table.num_rows == 4
    assert dict(zip(table.column("item_key").to_pylist(), table.column("value").to_pylist()))["a"] == "A"
    assert cache.read(keys=["b", "d", "zzz"]).column("item_key").to_pylist() == ["b", "d"]


def test_item_parts_with_different_columns_read_as_one_table(tmp_path):
    """A part written before a column existed (or with it all null) still reads, in part order."""
    cache = ItemCache(tmp_path / "items")
    cache.write([{"item_key": "a", "value": None}], writer_id="0")
    cache.write([{"item_key": "b", "value": "B", "extra": 1}], writer_id="1")
    cache.write([{"item_key": "a", "value": "dup", "extra": 2}], writer_id="2")
    table = cache.read()
    assert table.column("item_key").to_pylist() == ["a", "b"]
    assert table.column("value").to_pylist() == [None, "B"] and table.column("extra").to_pylist() == [None, 1]
    assert table.schema.field("value").type == pa.string()
    assert cache.read(columns=["item_key", "extra"]).column_names == ["item_key", "extra"]
    assert cache.done_keys() == {"a", "b"}


@pytest.mark.parametrize("damage", ["truncate", "flip-a-data-byte"])
def test_a_corrupt_item_part_is_named(tmp_path, damage):
    from sage_builder.errors import StageInputError

    cache = ItemCache(tmp_path / "items")
    cache.write([{"item_key": "a", "value": "x" * 200}], writer_id="0")
    bad = cache.write([{"item_key": f"k{i}", "value": str(i) * 50} for i in range(50)], writer_id="1")
    data = bytearray(bad.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[8:200] = bytes(192)  # the column chunks, not the footer
    bad.write_bytes(bytes(data))
    with pytest.raises(StageInputError, match=f"{bad.name}: a corrupt item part"):
        cache.read()
    with pytest.raises(StageInputError, match=f"{bad.name}: a corrupt item part"):
        cache.done_keys()


def test_item_rows_need_a_key(tmp_path):
    with pytest.raises(ValueError, match="item_key"):
        ItemCache(tmp_path).write([{"value": 1}])


def test_stable_hash_ignores_dict_order_and_number_spelling():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"steps": 20}) == stable_hash({"steps": 20.0})
    assert stable_hash({"steps": 20}) != stable_hash({"steps": 21})
    assert stable_hash([1, 2]) != stable_hash([2, 1])
    assert len(stable_hash("x", length=16)) == 16


def test_stable_hash_of_config_ignores_execution_fields():
    base = LLMConfig(model="m", temperature=0.5)
    assert stable_hash(base) == stable_hash(LLMConfig(model="m", temperature=0.5, concurrency=64, batch_size=2))
    assert stable_hash(base) != stable_hash(LLMConfig(model="m", temperature=0.6))


def test_temp_files_of_dead_writers_are_removed_and_a_live_writers_kept(tmp_path):
    import os
    import subprocess
    import sys

    from sage_builder.store import remove_stale_temp_files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    (tmp_path / "cache" / "2b").mkdir(parents=True)
    stale = tmp_path / "cache" / "2b" / f".2bkey.safetensors.tmp-{dead_pid}-0123abcd"
    live = tmp_path / "cache" / f".other.parquet.tmp-{os.getpid()}-89abcdef"
    kept = tmp_path / "cache" / ".notes.tmp-x"  # not an atomic_path name
    for path in (stale, live, kept):
        path.write_bytes(b"partial")
    assert remove_stale_temp_files(tmp_path) == 1
    assert not stale.exists() and live.exists() and kept.exists()
    assert remove_stale_temp_files(tmp_path / "missing") == 0


def test_a_stage_rerun_sweeps_what_a_killed_run_left_mid_write(tmp_path):
    """A SIGKILL between an atomic write and its rename leaves a temp file; the next run removes it."""
    import subprocess
    import sys

    from sage_builder.stages import get_stage
    from sage_builder.stages.base import run_stage
    from sage_builder.testing.fake_run import make_fake_run

    run, config = make_fake_run(tmp_path / "run", n_users=8, pairs_per_category=1)
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True).stdout)
    leftover = run.stage("label").path / "_items" / f".part-0.parquet.tmp-{dead_pid}-0123abcd"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"PAR1 half a part")
    run_stage(get_stage("label"), config, run)
    assert not leftover.exists()
    assert not list(run.stage("label").path.rglob(".*.tmp-*"))
