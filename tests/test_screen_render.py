"""Screening inside stage 3 on real renders: tiny SDXL images scored by the real NudeNet and by Q16
on the tiny CLIP of `make models`; then stage 4 on top. And bad screening input: one line, exit 2,
nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from sage_builder.config import config_from_dict
from sage_builder.errors import ConfigError, SageError
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.stages.label.dataset import shard_files
from sage_builder.testing.fake_run import make_fake_run

pytest.importorskip("nudenet")
pytestmark = pytest.mark.slow


def config_data(run_root, models_dir, **screen):
    run, config = make_fake_run(run_root, n_users=20, concepts_per_category=1, pairs_per_concept=2,
                                pairs_per_category=1)
    shutil.rmtree(run.stage("render").path)  # stage 3 runs for real below
    data = config.model_dump(mode="json", exclude={"source"})
    tiny_clip = models_dir / "tiny-clip"
    data["render"].update(model=str(models_dir / "tiny-sdxl"), height=64, width=64, steps=2, guidance=5.0,
                          batch_size=8, device="cpu", threads=1,
                          screen={"enabled": True, "scorers": ["nudenet", "q16"],
                                  "q16": {"clip_model": str(tiny_clip), "prompts": str(tiny_clip / "q16_prompts.npy")},
                                  **screen})
    return run, data


@pytest.fixture(scope="module")
def screened(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("screened")
    run, data = config_data(root / "run", models_dir)
    config = config_from_dict(data)
    manifest = run_stage(get_stage("render"), config, run)
    return run, config, manifest


def read(run, name):
    return pq.read_table(run.stage("render").file(name))


def test_no_kept_pair_has_a_flagged_safe_image(screened):
    from sage_builder.safety import make_scorers

    run, config, manifest = screened
    stats = manifest.stats["screen"]
    attempts = read(run, "screening.parquet").to_pylist()
    index = read(run, "index.parquet").to_pylist()
    rejects = read(run, "rejects.parquet").to_pylist()
    pairs = pq.read_table(run.stage("prompts").file("pairs.parquet")).num_rows
    assert stats["totals"]["pairs"] == pairs and len({r["pair_id"] for r in attempts}) == pairs
    assert stats["rendered_again"] > 0, "the tiny CLIP's toy prompts flag some safe images at these seeds"
    kept = {r["pair_id"] for r in index}
    assert kept.isdisjoint({r["pair_id"] for r in rejects}) and len(kept) + len(rejects) == pairs
    final = {r["pair_id"]: r for r in attempts if r["final"]}
    assert all(final[p]["outcome"] != "safe_flagged" for p in kept)
    # The stored images are the final attempt's: keys and seeds in the shards match the table.
    shards = pa.concat_tables([pq.read_table(run.stage("render").file(s)) for s in sorted({r["shard"] for r in index})])
    by_key = {k: (seed, data) for k, seed, data in zip(*(shards.column(c).to_pylist() for c in ("image_key", "seed", "image")))}
    for row in index:
        want = final[row["pair_id"]]
        assert row["image_key"] == want[f"image_key_{row['variant']}"]
        assert by_key[row["image_key"]][0] == want["seed"]
    # Scored again from the shards by freshly built scorers, no kept safe image is flagged.
    safe = [by_key[r["image_key"]][1] for r in index if r["variant"] == "s"]
    for scorer in make_scorers(config.render.screen, ["nudenet", "q16"], config.categories):
        assert not any(v.flagged for v in scorer.score(safe)), scorer.name
    assert manifest.models["screen_q16"]["weights_sha256"] and manifest.models["screen_nudenet"]["model"]
    assert "screening.parquet" in manifest.outputs and "rejects.parquet" in manifest.outputs


def test_rerun_and_resume_give_the_same_tables(screened):
    run, config, manifest = screened
    again = run_stage(get_stage("render"), config, run)
    assert again.finished_at == manifest.finished_at  # up to date: skipped
    before = {name: run.stage("render").file(name).read_bytes() for name in
              ("index.parquet", "screening.parquet", "rejects.parquet")}
    run.stage("render").manifest_path.unlink()  # as after a kill: items stay, the marker is gone
    resumed = run_stage(get_stage("render"), config, run)
    assert resumed.stats["rendered_now"] == 0 and resumed.stats["screen"]["scored_now"] == 0
    assert resumed.stats["screen"]["rendered_again"] == 0
    for name, data in before.items():
        assert run.stage("render").file(name).read_bytes() == data, name


def test_label_on_a_screened_render(screened):
    run, config, manifest = screened
    run_stage(get_stage("label"), config, run)
    dataset = run.stage("label").file("dataset")
    pairs = pa.concat_tables([pq.read_table(p) for p in shard_files(dataset, "pairs", "train")])
    assert pairs.column("screen_outcome").null_count == 0
    assert set(pairs.column("screen_outcome").to_pylist()) <= {"ok", "unsafe_clean"}
    assert all("q16" in json.loads(s) for s in pairs.column("screen_scores").to_pylist())
    card = (dataset / "README.md").read_text()
    assert "## Screening" in card and "Q16: not run" not in card


def render_fails(tmp_path, models_dir, **screen):
    run, data = config_data(tmp_path / "run", models_dir, **screen)
    config = config_from_dict(data)
    with pytest.raises(SageError) as err:
        run_stage(get_stage("render"), config, run)
    assert "\n" not in str(err.value) and err.value.exit_code == 2
    assert not run.stage("render").path.exists(), "nothing may be written on bad input"
    return str(err.value)


def test_missing_weights_and_a_silent_judge_stop_before_anything_is_written(tmp_path, models_dir):
    import socket

    message = render_fails(tmp_path / "a", models_dir, q16={"clip_model": str(tmp_path / "no-clip")})
    assert message.startswith("render.screen.q16.clip_model:") and "no CLIP model folder" in message
    message = render_fails(tmp_path / "b", models_dir, q16={"clip_model": str(models_dir / "tiny-clip"),
                                                            "prompts": str(tmp_path / "missing.npy")})
    assert message.startswith("render.screen.q16.prompts:") and "does not exist" in message
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    message = render_fails(tmp_path / "c", models_dir, scorers=["nudenet", "judge"],
                           judge={"base_url": f"http://127.0.0.1:{port}/v1", "request_timeout_s": 2})
    assert message.startswith("render.screen.judge.base_url: no OpenAI-compatible server answers")


@pytest.mark.parametrize("override, expect", [
    ("render.screen.scorers=[nudenet, q17]", "render.screen.scorers.1: Input should be 'nudenet'"),
    ("render.screen.nudenet.threshold=1.2", "render.screen.nudenet.threshold: Input should be less than or equal to 1"),
    ("render.screen.scorers=[]", "screening is enabled with no scorer"),
])
def test_cli_bad_screening_config_is_one_line_exit_2(tmp_path, models_dir, override, expect):
    run, data = config_data(tmp_path / "run", models_dir)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "sage_builder.cli", "stage", "render", "--config", str(path),
                             "--run-dir", str(run.root), "--set", override], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in result.stderr
    assert not run.stage("render").path.exists()


def test_screening_off_says_so(tmp_path, models_dir):
    run, data = config_data(tmp_path / "run", models_dir, enabled=False)
    manifest = run_stage(get_stage("render"), config_from_dict(data), run)
    assert "screen" not in manifest.stats and "screening.parquet" not in manifest.outputs
    with pytest.raises(ConfigError):
        config_from_dict({**data, "render": {**data["render"], "screen": {"enabled": True, "scorers": []}}})


def test_two_worker_processes_give_the_same_tables(screened, tmp_path, models_dir):
    """Scoring and rerenders on two spawned workers (as one per GPU): same screening, index and shards."""
    run1, _, manifest1 = screened
    run2, data = config_data(tmp_path / "run", models_dir)
    data["render"]["workers"] = 2
    manifest2 = run_stage(get_stage("render"), config_from_dict(data), run2)
    assert manifest2.stats["workers"] == 2
    for name in ("screening.parquet", "rejects.parquet", "index.parquet"):
        assert read(run2, name).equals(read(run1, name)), name
    assert manifest2.stats["screen"]["per_category"] == manifest1.stats["screen"]["per_category"]
    writers = {p.name.split("-")[3] for p in run2.stage("render").items("scores").parts()}
    # Parts are named by their writer. Which worker takes which unit depends on start-up timing (a worker that
    # starts late may get none); that both share the work is test_executors' rendezvous test.
    assert writers and writers <= {"w0", "w1"}, writers
