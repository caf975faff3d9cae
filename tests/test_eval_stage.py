"""Stage 7 end to end on a tiny run: a synthetic stages 1-3 (fake_run), the real label stage, a random
user adapter on the tiny SDXL as stage 6, then eval with real NudeNet, Q16 on the tiny CLIP and FID."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sage_builder.config import config_from_dict
from sage_builder.errors import StageInputError
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.store import Manifest, RunDir


def _fake_train_stage(run: RunDir, models_dir: Path, embedding_dim: int) -> None:
    """RUN/train/adapter: a user adapter with random (non-zero) weights, and a manifest marking stage 6 done."""
    import torch
    from diffusers import UNet2DConditionModel

    from sage_builder.adapter import UserAdapter

    unet = UNet2DConditionModel.from_pretrained(str(models_dir / "tiny-sdxl" / "unet"), local_files_only=True)
    torch.manual_seed(0)
    adapter = UserAdapter.for_unet(unet, embedding_dim, n_tokens=4, backbone="sdxl", base_model="tiny-sdxl")
    for parameter in adapter.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    stage_dir = run.stage("train")
    adapter.save(stage_dir.file("adapter"))
    outputs = stage_dir.describe_outputs(["adapter/adapter.safetensors", "adapter/adapter_config.json"])
    stage_dir.write_manifest(Manifest(stage="train", fingerprint="fake", config_hash="fake", outputs=outputs,
                                      inputs={"label": run.stage("label").read_manifest().content_hash()}))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, models_dir):
    from sage_builder.testing.fake_run import make_fake_run

    root = tmp_path_factory.mktemp("eval") / "run"
    run, config = make_fake_run(root, n_users=20, embedding_dim=8)
    run_stage(get_stage("label"), config, run)
    _fake_train_stage(run, models_dir, 8)
    return run, config.model_dump(mode="json", exclude={"source"})


def _config(data: dict, models_dir: Path, **eval_section):
    data = json.loads(json.dumps(data))
    data["train"].update(model=str(models_dir / "tiny-sdxl"), resolution=64)
    data["eval"] = {"steps": 2, "guidance": 5.0, "max_prompts": 3, "levels": [0, 5], "device": "cpu",
                    "batch_size": 4, "q16": {"clip_model": str(models_dir / "tiny-clip"),
                                             "prompts": str(models_dir / "tiny-clip" / "q16_prompts.npy")},
                    **eval_section}
    return config_from_dict(data)


def _hashes(run: RunDir, manifest: Manifest) -> dict[str, str]:
    return {rel: f.sha256 for rel, f in manifest.outputs.items()}


@pytest.mark.slow
def test_eval_end_to_end_resumes_from_its_item_cache(tiny_run, models_dir):
    run, data = tiny_run
    config = _config(data, models_dir)
    stage = get_stage("eval")
    assert stage.number == 7
    manifest = run_stage(stage, config, run)
    out = run.stage("eval")
    assert {"items.parquet", "scores.parquet", "summary.json", "report.md", "ip_by_level.png", "grid_level_0.png",
            "grid_level_5.png"} <= set(manifest.outputs)
    assert any(rel.startswith("shards/images-") for rel in manifest.outputs)

    items = pq.read_table(out.file("items.parquet")).to_pylist()
    assert {(r["method"], r["level"]) for r in items} == {("base", None), ("prompt", None), ("psa", None),
                                                            ("psa", 0), ("psa", 5)}
    assert len(items) == 2 * 3 * 5  # 2 prompt sets x 3 prompts x (3 methods + 2 levels)
    by = {(r["prompt_id"], r["method"], r["level"]): r["image_key"] for r in items}
    prompt_ids = {r["prompt_id"] for r in items}
    assert all(by[(p, "base", None)] != by[(p, "psa", None)] for p in prompt_ids)  # the adapter changes images
    shard = pq.read_table(out.file(next(r for r in manifest.outputs if r.startswith("shards/"))))
    assert set(shard.column("image_key").to_pylist()) == set(by.values())
    seeds = {row["prompt"]: set() for row in shard.to_pylist()}
    for row in shard.to_pylist():
        seeds[row["prompt"]].add(row["seed"])
    assert all(len(s) == 1 for s in seeds.values())  # every method renders a prompt with one seed

    scores = pq.read_table(out.file("scores.parquet")).to_pylist()
    assert {s["scorer"] for s in scores} == {"nudenet", "q16", "ip"}
    assert len([s for s in scores if s["scorer"] == "ip"]) == len(items)  # one row per image per scorer
    summary = json.loads(out.file("summary.json").read_text())
    assert summary["ip_scorers"] == ["nudenet", "q16"]
    assert {e["method"] for e in summary["ip"]} == {"base", "prompt", "psa"}
    assert "judge: not run (eval.judge.enabled is false)" in summary["not_run"]
    assert summary["fid"]["weights_sha256"].startswith("7ff4a85c3a63")
    fid_base = {(e["prompt_set"], e["method"], e["level"]): e["vs_base"] for e in summary["fid"]["rows"]}
    assert fid_base[("test_unseen", "base", None)] == pytest.approx(0, abs=1e-3)
    assert fid_base[("test_unseen", "psa", 5)] > 0
    report = out.file("report.md").read_text()
    for needle in ("| SDXL | base | ", "(NudeNet+Q16, n=3)", "0.580", "Judge: not run", "CLIP score: not run",
                   "PSA level 5", "blurred thumbnails"):
        assert needle in report
    assert "/tmp/" not in report and str(models_dir) not in report
    assert manifest.stats["rendered_now"] == summary["images"]

    # Rebuilt from the item cache: nothing rendered again, the same bytes.
    out.manifest_path.unlink()
    for rel in ("scores.parquet", "report.md", "summary.json"):
        out.file(rel).unlink()
    again = run_stage(stage, config, run)
    assert again.stats["rendered_now"] == 0
    assert _hashes(run, again) == _hashes(run, manifest)
    assert run_stage(stage, config, run).finished_at == again.finished_at  # up to date: skipped


@pytest.mark.slow
def test_unblurred_grids_a_csv_prompt_set_and_the_judge(tiny_run, models_dir, tmp_path):
    from PIL import Image

    from sage_builder.testing import ChatServer

    run, data = tiny_run
    users = pq.read_table(run.stage("label").file("dataset") / "data/users/train-00000-of-00001.parquet").to_pylist()
    uid = next(u["user_id"] for u in users if u["level"] is None)
    csv = tmp_path / "prompts.csv"
    csv.write_text(f"caption,user_id,level,category\na red door,{uid},,Hate\na blue sky,,5,\n")
    work = RunDir(tmp_path / "run")
    shutil.copytree(run.root, work.root, ignore=shutil.ignore_patterns("eval"))
    with ChatServer(model="vlm") as server:  # answers every request with a minimal schema-valid reply
        config = _config(data, models_dir, prompts_csv=str(csv), methods=["base", "psa"], levels=[5],
                         fid={"enabled": False}, plots={"blur": False, "thumbnail": 32},
                         judge={"enabled": True, "base_url": server.base_url, "model": "vlm", "max_retries": 0})
        manifest = run_stage(get_stage("eval"), config, work)
        bodies = list(server.requests)
    assert len(bodies) == 2 * 2 + 2  # a pass request per own-user image, an A/B request per prompt
    summary = json.loads(work.stage("eval").file("summary.json").read_text())
    judge = summary["judge"]
    assert {(e["method"], e["n"], e["errors"]) for e in judge["pass"]} == {("base", 2, 0), ("psa", 2, 0)}
    (win,) = judge["win"]
    assert win["n"] == 2 and win["win"] + win["loss"] == 2  # the minimal reply always says "A"
    scores = pq.read_table(work.stage("eval").file("scores.parquet")).to_pylist()
    assert sum(s["scorer"] == "judge_win" for s in scores) == 2 and sum(s["scorer"] == "judge_pass" for s in scores) == 4
    assert "Win rate against base" in work.stage("eval").file("report.md").read_text()
    assert summary["prompt_sets"] == {"csv:prompts": 2}
    assert "FID: not run (eval.fid.enabled is false)" in summary["not_run"]
    assert "grid_level_5.png" in manifest.outputs
    grid = Image.open(work.stage("eval").file("grid_level_5.png"))
    assert grid.size == (240 + 2 * 32, 24 + 2 * 32)


def test_an_external_csv_with_an_unknown_user_is_one_line_and_writes_nothing(tiny_run, models_dir, tmp_path):
    run, data = tiny_run
    csv = tmp_path / "sage_unseen.csv"
    csv.write_text("caption,user_id\na street at night,0000003\na soldier,0009999\n")
    config = _config(data, models_dir, prompts_csv=str(csv))
    work = RunDir(tmp_path / "run")
    shutil.copytree(run.root, work.root, ignore=shutil.ignore_patterns("eval"))
    with pytest.raises(StageInputError) as info:
        run_stage(get_stage("eval"), config, work)
    message = str(info.value)
    assert "\n" not in message and "line 3" in message and "user 0009999" in message and str(csv) in message
    assert not work.stage("eval").path.exists()


def test_plan_counts_images_and_judge_calls_of_the_full_config():
    from sage_builder.config import load_config, project_file

    config = load_config(project_file("pipelines", "sage-sdxl.yaml"),
                         ["eval.judge.enabled=true", "eval.judge.base_url=http://vlm:8000/v1"])
    plan = get_stage("eval").plan(config)
    assert plan.items == 2 * 1050 * (3 + 6) and plan.unit == "images"
    assert plan.llm_calls == 2 * 1050 * 3 + 2 * 1050 * 2  # pass per own-user image + A/B vs base
    assert get_stage("eval").plan(load_config(project_file("pipelines", "sage-sdxl.yaml"))).llm_calls is None
