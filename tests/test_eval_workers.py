"""Stage 7's rendering through the executor seam: 1 worker in this process and 2 spawned local worker
processes give byte-identical outputs, a rerun after lost parts renders only what is missing, and a
failing unit in a worker process ends the stage with the seam's one-line message; on Ray actors the
outputs equal the local executor's."""

from __future__ import annotations

import shutil

import pytest
from test_eval_stage import _config, _hashes, tiny_run  # noqa: F401 - tiny_run is a fixture

from sage_builder.errors import SageError
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.store import RunDir


def _eval(data, models_dir, workers, **more):
    # eval.threads fixed: CPU pixels may round differently with another torch thread count.
    return _config(data, models_dir, workers=workers, threads=1, fid={"enabled": False}, **more)


@pytest.mark.slow
def test_one_worker_and_two_spawned_workers_give_the_same_bytes_and_resume(tiny_run, models_dir, tmp_path):  # noqa: F811
    run, data = tiny_run
    work = RunDir(tmp_path / "run")
    shutil.copytree(run.root, work.root, ignore=shutil.ignore_patterns("eval"))
    stage = get_stage("eval")

    one = run_stage(stage, _eval(data, models_dir, 1), work)
    assert one.stats["executor"] == "local" and one.stats["workers"] == 1
    shutil.rmtree(work.stage("eval").path)  # nothing cached: every image and score is made again
    two = run_stage(stage, _eval(data, models_dir, 2), work)
    assert two.stats["workers"] == 2
    assert two.stats["rendered_now"] == one.stats["rendered_now"] == two.stats["images"]
    assert _hashes(work, two) == _hashes(work, one)  # shards, items, scores.parquet, summary.json, report, plots
    parts = sorted(work.stage("eval").items("images").parts())
    writers = {p.name.split("-")[3] for p in parts}  # who took which unit depends on start-up timing
    assert writers and writers <= {"w0", "w1"}, writers

    # A kill loses whole parts (batches): drop some, rerun with 2 workers, only those are rendered again.
    lost = parts[::3]
    missing = len(work.stage("eval").items("images").done_keys())
    for part in lost:
        part.unlink()
    missing -= len(work.stage("eval").items("images").done_keys())
    work.stage("eval").manifest_path.unlink()
    again = run_stage(stage, _eval(data, models_dir, 2), work)
    assert 0 < again.stats["rendered_now"] == missing
    assert _hashes(work, again) == _hashes(work, one)


@pytest.mark.slow
def test_a_failing_unit_in_a_worker_process_is_one_line(tiny_run, models_dir, tmp_path):  # noqa: F811
    import torch
    from diffusers import UNet2DConditionModel

    from sage_builder.adapter import UserAdapter

    run, data = tiny_run
    work = RunDir(tmp_path / "run")
    shutil.copytree(run.root, work.root, ignore=shutil.ignore_patterns("eval"))
    # An adapter for 4-d user embeddings: the dataset's are 8-d, which only a worker loading it finds out.
    unet = UNet2DConditionModel.from_pretrained(str(models_dir / "tiny-sdxl" / "unet"), local_files_only=True)
    torch.manual_seed(0)
    UserAdapter.for_unet(unet, 4, n_tokens=4, backbone="sdxl", base_model="tiny-sdxl").save(tmp_path / "other")
    config = _eval(data, models_dir, 2, methods=["base"], levels=[], adapters={"other": str(tmp_path / "other")})
    with pytest.raises(SageError) as info:
        run_stage(get_stage("eval"), config, work)
    message = str(info.value)
    assert "\n" not in message and message.startswith("eval#")
    assert "eval.adapters.other" in message and "expects 4-d user embeddings" in message
    assert "rerun the stage to resume" in message


@pytest.mark.slow
def test_on_ray_actors_the_outputs_equal_the_local_executor(tiny_run, models_dir, tmp_path):  # noqa: F811
    ray = pytest.importorskip("ray", reason="executor: ray needs the ray extra (make test installs it)")
    run, data = tiny_run
    local, on_ray = RunDir(tmp_path / "local"), RunDir(tmp_path / "ray")
    for work in (local, on_ray):
        shutil.copytree(run.root, work.root, ignore=shutil.ignore_patterns("eval"))
    stage = get_stage("eval")
    expected = run_stage(stage, _eval(data, models_dir, 1), local)
    ray_data = {**data, "executor": "ray", "ray": {**data.get("ray", {}), "num_cpus": 2, "render_workers": 2,
                                                   "render_num_cpus": 1, "render_batches_per_task": 1}}
    try:
        got = run_stage(stage, _eval(ray_data, models_dir, None), on_ray)
    finally:
        ray.shutdown()  # the driver started a local Ray instance in this process
    assert got.stats["executor"] == "ray" and got.stats["ray_workers"] == 2
    assert _hashes(on_ray, got) == _hashes(local, expected)
