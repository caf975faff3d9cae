"""The Ray executor on a real local Ray instance (2 CPUs): same rows as the local executor, resumable.

* stages 1-3 of the demo config (shrunk with --set) run once with ``executor: local`` and once with
  ``executor: ray`` (the driver starts its own local Ray instance), whose driver is killed in stage
  2 and rerun; every output table is compared row by row, and the Parquet files byte for byte.
* the render stage's driver is killed with SIGKILL mid-stage while a ``ray start`` cluster keeps
  running; the rerun renders only the missing images, and the output has every image once and
  equals a local render.
* a render actor killed mid-stage, and a unit running past ``ray.task_timeout_s``, each end the
  stage with exit 2 and a one-line message; the rerun finishes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sage_builder import PROJECT_ROOT
from sage_builder.config import dump_config, load_config
from sage_builder.testing.fake_run import make_fake_run

ray = pytest.importorskip("ray", reason="executor: ray needs the ray extra (make test installs it)")

pytestmark = pytest.mark.slow

DEMO = PROJECT_ROOT / "pipelines" / "demo.yaml"
# The demo config, smaller: 6 users, one seed concept per category, 2 pairs each, one attempt per pair.
SMALL = ["profiles.n_users=6", "profiles.tsne_perplexity=2", "prompts.seeds_per_category=1",
         "prompts.concepts_per_category=1", "prompts.max_pair_attempts=1"]
RAY = ["executor=ray", "ray.num_cpus=2", "ray.llm_replicas=2", "ray.llm_num_cpus=1", "ray.render_workers=2",
       "ray.render_batches_per_task=1", "render.batch_size=2",
       "ray.render_num_cpus=1", "render.threads=1"]
BIN = Path(sys.executable).parent
CLUSTER_ENV: dict[str, str] = {}  # how drivers join the test cluster (address, auth token)


def sage(*args: str, env: dict[str, str] | None = None, wait: bool = True, timeout: float = 900
         ) -> subprocess.CompletedProcess | subprocess.Popen:
    # Without RAY_ADDRESS in ``env`` the driver starts its own local Ray instance.
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update({"SAGE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", **(env or {})})
    cmd = [sys.executable, "-m", "sage_builder.cli", *args]
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def tail(out: str) -> str:
    return "\n".join(line for line in out.splitlines() if "CLIP can only" not in line)[-3000:]


def outputs(run: Path, stage: str) -> dict[str, Path]:
    root = run / stage
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*.parquet")) if "_items" not in p.parts}


def assert_same_tables(local: Path, other: Path, stage: str) -> None:
    mine, theirs = outputs(local, stage), outputs(other, stage)
    assert mine.keys() == theirs.keys(), stage
    for rel, path in mine.items():
        a, b = pq.read_table(path), pq.read_table(theirs[rel])
        assert a.schema == b.schema, f"{stage}/{rel}: schema"
        assert a.num_rows == b.num_rows and a.num_rows > 0 or rel.endswith(("rejects.parquet", "dropped.parquet")), rel
        for name in a.column_names:
            assert a.column(name).to_pylist() == b.column(name).to_pylist(), f"{stage}/{rel}: column {name}"
        assert path.read_bytes() == theirs[rel].read_bytes(), f"{stage}/{rel}: bytes"


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A `ray start --head` cluster with 2 CPUs that outlives the drivers of the tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    # Token authentication, as `ray start` uses by default; drivers join with the same token.
    CLUSTER_ENV.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **CLUSTER_ENV}
    start = subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        CLUSTER_ENV["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        yield CLUSTER_ENV["RAY_ADDRESS"]
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120)
        CLUSTER_ENV.clear()
        shutil.rmtree(temp, ignore_errors=True)


def test_stages_1_to_3_on_ray_equal_the_local_executor_row_by_row(tmp_path: Path) -> None:
    local = sage("run", "--config", str(DEMO), "--run-dir", str(tmp_path / "local"), "--until", "render",
                 *sets(SMALL + ["render.threads=1"]))
    assert local.returncode == 0, tail(local.stdout)
    # The Ray run's driver (and with it the Ray instance it started) is killed with SIGKILL in stage 2,
    # once its first finished items are on disk; the rerun resumes from them.
    args = ["run", "--config", str(DEMO), "--run-dir", str(tmp_path / "ray"), "--until", "render", *sets(SMALL + RAY)]
    victim = sage(*args, wait=False)
    prompt_items = tmp_path / "ray" / "prompts" / "_items"
    deadline = time.monotonic() + 600
    while not any(prompt_items.rglob("part-*.parquet")) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before stage 2 could be interrupted\n" + tail(victim.communicate()[0])
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert (tmp_path / "ray" / "profiles" / "manifest.json").exists()
    assert not (tmp_path / "ray" / "prompts" / "manifest.json").exists()

    on_ray = sage(*args)
    assert on_ray.returncode == 0, tail(on_ray.stdout)
    assert "stage profiles: up to date" in on_ray.stdout
    assert "ray: 2 LLM actor(s) ready" in on_ray.stdout and "ray: 2 render actor(s)" in on_ray.stdout

    for stage in ("profiles", "prompts", "render"):
        assert_same_tables(tmp_path / "local", tmp_path / "ray", stage)
    # The executor is scheduling only: same fingerprints, so either run dir resumes under the other.
    import json

    for stage in ("profiles", "prompts", "render"):
        a = json.loads((tmp_path / "local" / stage / "manifest.json").read_text())
        b = json.loads((tmp_path / "ray" / stage / "manifest.json").read_text())
        assert a["fingerprint"] == b["fingerprint"], stage
        # Every output but profiles' report.json (it records timings) has the same sha256, size and rows.
        drop = {"report.json"}
        content = lambda outputs: {k: (v["sha256"], v["bytes"], v["rows"]) for k, v in outputs.items()  # noqa: E731
                                   if k not in drop}
        assert content(a["outputs"]) == content(b["outputs"]), stage
        if stage == "prompts":
            # The resumed stage sent only what the killed run had not finished.
            assert 0 < b["stats"]["llm_usage"]["requests"] < a["stats"]["llm_usage"]["requests"]
            assert b["stats"]["llm_usage"]["engines"] == 2
    assert b["stats"]["executor"] == "ray" and b["stats"]["ray_workers"] == 2
    again = sage("run", "--config", str(DEMO), "--run-dir", str(tmp_path / "ray"), "--until", "render",
                 *sets(SMALL + ["render.threads=1"]))
    assert again.returncode == 0 and again.stdout.count("up to date") == 3, tail(again.stdout)


N_PAIRS = 7 * 4  # make_fake_run: 7 categories x 1 concept x 4 pairs


def render_run(tmp_path: Path, name: str, steps: int = 4) -> tuple[Path, Path]:
    """A run dir with fake stages 1-2 (28 pairs) and a pipeline rendering them with the tiny SDXL (not screened:
    these tests count every pair's two images; screening is tested in tests/test_screen*.py)."""
    run, config = make_fake_run(tmp_path / name, n_users=8, concepts_per_category=1)
    base = load_config(DEMO)
    config = config.model_copy(update={"render": base.render.model_copy(update={
        "steps": steps, "batch_size": 2, "threads": 1,
        "screen": base.render.screen.model_copy(update={"enabled": False})})})
    pipeline = tmp_path / f"{name}.yaml"
    pipeline.write_text(dump_config(config))
    return run.root, pipeline


def parts(run: Path) -> list[Path]:
    return sorted((run / "render" / "_items" / "images").glob("part-*.parquet"))


def wait_for_parts(proc: subprocess.Popen, run: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(parts(run)) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the stage ended before it could be interrupted; give it more work\n" + \
        tail(proc.communicate()[0])


RENDER_RAY = ["executor=ray", "ray.render_workers=2", "ray.render_num_cpus=1", "ray.render_batches_per_task=1"]


def test_killed_driver_then_rerun_renders_only_missing_images(tmp_path: Path, cluster: str) -> None:
    ref_run, pipeline = render_run(tmp_path, "reference")
    reference = sage("stage", "render", "--config", str(pipeline), "--run-dir", str(ref_run))
    assert reference.returncode == 0, tail(reference.stdout)

    run, pipeline = render_run(tmp_path, "killed")
    env = dict(CLUSTER_ENV)
    victim = sage("stage", "render", "--config", str(pipeline), "--run-dir", str(run), *sets(RENDER_RAY),
                  env=env, wait=False)
    wait_for_parts(victim, run, 4)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    time.sleep(2.0)  # actors of the dead driver are torn down by Ray; their finished parts stay
    kept = {k for p in parts(run) for k in pq.read_table(p, columns=["item_key"]).column(0).to_pylist()}
    assert kept and not (run / "render" / "manifest.json").exists()

    rerun = sage("stage", "render", "--config", str(pipeline), "--run-dir", str(run), *sets(RENDER_RAY), env=env)
    assert rerun.returncode == 0, tail(rerun.stdout)
    import json

    stats = json.loads((run / "render" / "manifest.json").read_text())["stats"]
    assert stats["reused"] == len(kept) and stats["rendered_now"] == stats["images"] - len(kept)
    index = pq.read_table(run / "render" / "index.parquet").to_pylist()
    assert len({(r["pair_id"], r["variant"]) for r in index}) == len(index) == 2 * N_PAIRS
    assert_same_tables(ref_run, run, "render")


def test_a_killed_render_actor_ends_the_stage_with_a_message_and_the_rerun_finishes(
        tmp_path: Path, cluster: str) -> None:
    run, pipeline = render_run(tmp_path, "actor")
    env = dict(CLUSTER_ENV)
    driver = sage("stage", "render", "--config", str(pipeline), "--run-dir", str(run), *sets(RENDER_RAY),
                  env=env, wait=False)
    wait_for_parts(driver, run, 2)
    pids = subprocess.run(["pgrep", "-f", "ray::UnitActor"], capture_output=True, text=True).stdout.split()
    assert pids, "no render actor process found"
    os.kill(int(pids[0]), signal.SIGKILL)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 2, tail(out)
    assert "died (its process was killed or its node was lost)" in out and "rerun the stage" in out, tail(out)
    assert "Traceback" not in out.split("error:")[-1]

    rerun = sage("stage", "render", "--config", str(pipeline), "--run-dir", str(run), *sets(RENDER_RAY), env=env)
    assert rerun.returncode == 0, tail(rerun.stdout)
    index = pq.read_table(run / "render" / "index.parquet")
    assert index.num_rows == 2 * N_PAIRS


def test_a_unit_past_the_timeout_ends_the_stage_with_a_message(tmp_path: Path, cluster: str) -> None:
    run, pipeline = render_run(tmp_path, "slow", steps=40)
    manifest = run / "render" / "manifest.json"
    before = manifest.read_bytes()  # the fake run's; a failed run puts it back (its outputs are intact)
    out = sage("stage", "render", "--config", str(pipeline), "--run-dir", str(run),
               *sets(RENDER_RAY + ["ray.task_timeout_s=0.5"]), env=dict(CLUSTER_ENV))
    assert out.returncode == 2, tail(out.stdout)
    line = [x for x in out.stdout.splitlines() if x.startswith("error:")][-1]
    assert "did not finish a unit of 2 image(s)" in line and "ray.task_timeout_s=0.5" in line, line
    assert not manifest.exists() or manifest.read_bytes() == before  # the failed run wrote no manifest
