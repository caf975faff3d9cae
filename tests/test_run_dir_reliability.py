"""The run store under misuse: two runs at once, a killed holder, edited outputs, a full disk, failed runs.

The lock tests use real processes (the OS lock is per open file, so a thread would not show it).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.config import dump_config
from sage_builder.store import RunDir
from sage_builder.testing.fake_run import make_fake_run

runner = CliRunner()
HOLD = ("import sys, time\n"
        "from sage_builder.store import RunDir\n"
        "with RunDir(sys.argv[1]).lock():\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n")


def fake_run(tmp_path: Path) -> tuple[Path, Path]:
    run, config = make_fake_run(tmp_path / "run", n_users=8, pairs_per_category=1)
    pipeline = tmp_path / "fake.yaml"
    pipeline.write_text(dump_config(config))
    return run.root, pipeline


def sage(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAGE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sage_builder.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def error_lines(output: str) -> list[str]:
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture()
def holder(tmp_path: Path):
    """A separate process holding the fake run's lock; yields (run dir, pipeline, process)."""
    root, pipeline = fake_run(tmp_path)
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    yield root, pipeline, process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_second_run_on_a_run_dir_in_use_stops_at_once_naming_the_holder(holder) -> None:
    root, pipeline, process = holder
    started = time.monotonic()
    result = sage("stage", "label", "--config", str(pipeline), "--run-dir", str(root))
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert f"{root}: in use by another run (host " in lines[0] and f"pid {process.pid}, since " in lines[0]
    assert time.monotonic() - started < 60  # it did not wait for the holder
    assert not (root / "label").exists()


def test_a_killed_holder_does_not_block_the_next_run(holder) -> None:
    root, pipeline, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (root / ".sage.lock").exists()  # a stale lock file: the kernel released the lock itself
    result = sage("stage", "label", "--config", str(pipeline), "--run-dir", str(root))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (root / "label" / "manifest.json").exists() and not (root / ".sage.lock").exists()


def test_two_label_runs_started_together_one_runs_one_stops(tmp_path: Path) -> None:
    root, pipeline = fake_run(tmp_path)
    env = {**os.environ, "SAGE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "sage_builder.cli", "stage", "label", "--config", str(pipeline),
               "--run-dir", str(root), "--force"]
    first = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    outcomes = sorted([(first.wait(timeout=300), first.stderr.read()), (second.wait(timeout=300),
                                                                       second.stderr.read())])
    codes = [code for code, _ in outcomes]
    assert codes in ([0, 0], [0, 2]), outcomes  # both fine one after the other, or the later one refused
    if codes == [0, 2]:
        assert "in use by another run" in outcomes[1][1]
    check = sage("validate", str(root / "label" / "dataset"))
    assert check.returncode == 0, check.stdout + check.stderr


def test_an_edited_input_is_named_with_the_stage_to_rerun_and_status_says_modified(tmp_path: Path) -> None:
    root, pipeline = fake_run(tmp_path)
    pairs = root / "prompts" / "pairs.parquet"
    table = pq.read_table(pairs)
    pq.write_table(table.slice(1), pairs)  # one row deleted
    result = runner.invoke(app, ["stage", "label", "--config", str(pipeline), "--run-dir", str(root)])
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert str(pairs) in line and "sage stage prompts" in line
    status = runner.invoke(app, ["status", "--json", str(root)])
    states = {row["name"]: row["state"] for row in json.loads(status.stdout)["stages"]}
    assert states["prompts"] == "modified" and states["profiles"] == "done"


def test_status_verify_hashes_files_whose_size_and_mtime_were_kept(tmp_path: Path) -> None:
    root, _ = fake_run(tmp_path)
    path = root / "profiles" / "profiles.parquet"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # a copy that kept the timestamp

    def state(*extra: str) -> str:
        out = runner.invoke(app, ["status", "--json", str(root), *extra])
        return {row["name"]: row["state"] for row in json.loads(out.stdout)["stages"]}["profiles"]

    assert state() == "done"  # the cheap check trusts size and mtime
    assert state("--verify") == "modified"


def test_a_touched_but_identical_output_is_still_done(tmp_path: Path) -> None:
    root, _ = fake_run(tmp_path)
    os.utime(root / "prompts" / "pairs.parquet")  # e.g. copied without keeping times
    out = runner.invoke(app, ["status", "--json", str(root)])
    assert {row["name"]: row["state"] for row in json.loads(out.stdout)["stages"]}["prompts"] == "done"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def test_a_full_disk_is_one_line_saying_where_and_how_much_and_changes_nothing(tmp_path: Path,
                                                                               monkeypatch) -> None:
    import pyarrow.parquet

    root, pipeline = fake_run(tmp_path)
    before = snapshot(root)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pyarrow.parquet, "write_table", no_space)
    monkeypatch.setattr(pyarrow.parquet, "ParquetWriter", no_space)
    result = runner.invoke(app, ["stage", "label", "--config", str(pipeline), "--run-dir", str(root)])
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert line.startswith("error: disk full (no space left on device) writing ") and " free there" in line
    assert "the stage needs at least " in line and "then rerun" in line
    assert snapshot(root) == before


def test_a_failed_publish_keeps_the_previous_publish_manifest(tmp_path: Path) -> None:
    root, pipeline = fake_run(tmp_path)
    assert runner.invoke(app, ["stage", "label", "-c", str(pipeline), "-r", str(root)]).exit_code == 0
    assert runner.invoke(app, ["stage", "publish", "-c", str(pipeline), "-r", str(root)]).exit_code == 0
    before = snapshot(root)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9",
           "SAGE_NO_PROGRESS": "1"}
    result = subprocess.run([sys.executable, "-m", "sage_builder.cli", "publish", "--repo-id", "org/sage",
                             "--run-dir", str(root), "--config", str(pipeline)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert len(error_lines(result.stderr)) == 1
    assert snapshot(root) == before  # publish/manifest.json and plan.json as they were


def test_run_until_a_typo_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "run"
    result = runner.invoke(app, ["run", "--run-dir", str(root), "--until", "labl"])
    assert result.exit_code == 2 and "unknown stage 'labl'" in result.output
    assert not root.exists()


def test_rerunning_the_named_stage_rebuilds_an_edited_output_from_its_item_cache(tmp_path: Path) -> None:
    """The fix an error suggests must repair: prompts rebuilds pairs.parquet, no LLM request is resent."""
    from sage_builder.config import config_from_dict
    from sage_builder.stages.prompts.fixtures import chat_script, save_word_clip_tokenizer
    from sage_builder.testing.chat_server import ChatServer

    (tmp_path / "seeds.csv").write_text("category,concept\nhate,slurs\nhate,hate symbols\n")
    tokenizer = save_word_clip_tokenizer(tmp_path / "clip", ["hate", "symbol", "slur"])
    with ChatServer(script=chat_script()) as server:
        config = config_from_dict({
            "name": "rebuild", "categories": ["Hate"],
            "llm": {"backend": "openai", "model": "scripted", "base_url": server.base_url, "concurrency": 1,
                    "max_attempts": 2, "max_retries": 0, "request_timeout_s": 5.0},
            "render": {"model": str(tokenizer)},
            "prompts": {"seed_concepts": str(tmp_path / "seeds.csv"), "seeds_per_category": 2,
                        "concepts_per_category": 2, "pairs_per_concept": 2, "max_pair_attempts": 2}})
        pipeline = tmp_path / "pipeline.yaml"
        pipeline.write_text(dump_config(config))
        root = tmp_path / "run"
        args = ["stage", "prompts", "--config", str(pipeline), "--run-dir", str(root)]
        assert runner.invoke(app, args).exit_code == 0
        pairs = root / "prompts" / "pairs.parquet"
        reference = pairs.read_bytes()
        sent = len(server.requests)
        pq.write_table(pq.read_table(pairs).slice(1), pairs)

        status = json.loads(runner.invoke(app, ["status", "--json", str(root)]).stdout)
        assert {row["name"]: row["state"] for row in status["stages"]}["prompts"] == "modified"
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert pairs.read_bytes() == reference
        assert len(server.requests) == sent  # rebuilt from the item cache, not asked again


def test_sage_run_holds_the_lock_across_stages_and_releases_it(tmp_path: Path) -> None:
    root, pipeline = fake_run(tmp_path)
    result = runner.invoke(app, ["run", "--config", str(pipeline), "--run-dir", str(root), "--skip", "1",
                                 "--skip", "2", "--skip", "3", "--until", "publish"])
    assert result.exit_code == 0, result.output
    assert (root / "label" / "manifest.json").exists() and (root / "publish" / "manifest.json").exists()
    assert not (root / ".sage.lock").exists()


def test_a_manifest_without_mtimes_is_trusted_on_size_until_verify(tmp_path: Path) -> None:
    root, _ = fake_run(tmp_path)
    stage = RunDir(root).stage("profiles")
    manifest = stage.read_manifest()
    for output in manifest.outputs.values():
        output.mtime_ns = None  # as written before mtimes were recorded
    stage.write_manifest(manifest)
    path = root / "profiles" / "profiles.parquet"
    flip = bytearray(path.read_bytes())
    flip[len(flip) // 2] ^= 0xFF
    path.write_bytes(bytes(flip))
    assert stage.output_problem(manifest) is None
    assert "modified" in (stage.output_problem(manifest, full=True) or "")
