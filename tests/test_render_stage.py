"""Stage 3 (render) on the tiny random SDXL: determinism, resume, workers, shards, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sage_builder.config import config_from_dict
from sage_builder.errors import ConfigError, SageError, StageInputError
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.store import Manifest, RunDir, stable_hash, write_parquet

STAGE = get_stage("render")
SHARD_CONTRACT = {"image_key", "pair_id", "variant", "prompt", "seed", "model", "revision", "scheduler", "steps",
                  "guidance", "height", "width", "encoding", "quality", "image", "sha256"}
INDEX_CONTRACT = ["pair_id", "variant", "image_key", "shard", "row", "sha256"]


def make_config(models_dir: Path, **render):
    section = {"model": str(models_dir / "tiny-sdxl"), "steps": 2, "guidance": 5.0, "height": 64, "width": 64,
               "batch_size": 4, "device": "cpu", "workers": 1, **render}
    return config_from_dict({"name": "t", "seed": 7, "llm": {"model": "unused/model"}, "render": section})


def make_prompts(root: Path, n_pairs: int, blank: str | None = None) -> RunDir:
    """A prompts stage that run_stage accepts as done: pairs.parquet + manifest."""
    run = RunDir(root)
    rows = []
    for i in range(n_pairs):
        pair_id = stable_hash("pair", i, length=16)
        rows.append({"pair_id": pair_id, "concept_id": f"c{i // 2}", "category": "Violence", "concept": f"concept {i}",
                     "idx": i % 2 + 1, "prompt_unsafe": f"a violent scene number {i}",
                     "prompt_safe": "" if pair_id == blank else f"a calm meadow number {i}",
                     "tokens_unsafe": 8, "tokens_safe": 8})
    stage_dir = run.stage("prompts")
    write_parquet(pa.Table.from_pylist(rows), stage_dir.file("pairs.parquet"))
    stage_dir.write_manifest(Manifest(stage="prompts", fingerprint=stable_hash(rows), config_hash="x",
                                      outputs=stage_dir.describe_outputs(["pairs.parquet"])))
    return run


def output_hashes(manifest: Manifest) -> dict[str, str]:
    return {rel: f.sha256 for rel, f in manifest.outputs.items()}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, models_dir):
    """6 pairs rendered in one go with 1 worker: the reference the other runs must match."""
    root = tmp_path_factory.mktemp("clean")
    run = make_prompts(root, 6)
    manifest = run_stage(STAGE, make_config(models_dir), run)
    return run, manifest


@pytest.mark.slow
@pytest.mark.parametrize("backbone,folder", [("sdxl", "tiny-sdxl"), ("sd15", "tiny-sd15")])
def test_pair_alone_matches_pair_inside_batch_of_4(models_dir, backbone, folder):
    import numpy as np

    from sage_builder.diffusion import (ImageJob, RenderSettings, generate_batch, load_pipeline,
                                                   make_batch_invariant, pair_seed)

    config = make_config(models_dir, backbone=backbone, model=str(models_dir / folder)).render
    pipe = load_pipeline(config, "cpu")
    make_batch_invariant(pipe)
    settings = RenderSettings.from_config(config, "cpu")
    prompts = ["a knife fight in an alley", "two friends cooking", "riot police at night", "a quiet library"]
    jobs = [ImageJob(f"k{i}", p, pair_seed(7, f"pair{i // 2}")) for i, p in enumerate(prompts)]
    batch = generate_batch(pipe, jobs, settings)
    alone = generate_batch(pipe, jobs[2:4], settings)
    for i in (2, 3):
        assert np.abs(batch[i].astype(int) - alone[i - 2].astype(int)).max() == 0
    single = generate_batch(pipe, [jobs[1]], settings)
    assert np.array_equal(single[0], batch[1])
    reordered = generate_batch(pipe, jobs[::-1], settings)
    assert np.array_equal(reordered[::-1], batch)
    # Both images of a pair share the seed, yet the prompts differ, so the pixels differ.
    assert not np.array_equal(batch[0], batch[1])


@pytest.mark.slow
def test_stage_writes_contract_shards_and_index(clean_run):
    run, manifest = clean_run
    stage_dir = run.stage("render")
    index = pq.read_table(stage_dir.file("index.parquet"))
    assert index.column_names == INDEX_CONTRACT
    assert index.num_rows == 12
    assert index.column("variant").to_pylist() == ["u", "s"] * 6
    shards = [rel for rel in manifest.outputs if rel.startswith("shards/")]
    assert sorted(manifest.outputs) == sorted(shards + ["index.parquet"])
    assert sorted(p.name for p in stage_dir.file("shards").glob("*.parquet")) == sorted(Path(s).name for s in shards)
    rows = {}
    for shard in shards:
        table = pq.read_table(stage_dir.file(shard))
        assert SHARD_CONTRACT <= set(table.column_names)
        for r, row in enumerate(table.to_pylist()):
            rows[(shard, r)] = row
    import hashlib
    import io

    from PIL import Image

    for entry in index.to_pylist():
        row = rows[(entry["shard"], entry["row"])]
        assert row["image_key"] == entry["image_key"] and row["pair_id"] == entry["pair_id"]
        assert hashlib.sha256(row["image"]).hexdigest() == row["sha256"] == entry["sha256"]
        assert Image.open(io.BytesIO(row["image"])).size == (64, 64)
        assert (row["encoding"], row["quality"], row["steps"], row["dtype"]) == ("jpeg", 95, 2, "float32")
    by_pair = {}
    for row in rows.values():
        by_pair.setdefault(row["pair_id"], set()).add(row["seed"])
    assert all(len(seeds) == 1 for seeds in by_pair.values())
    assert len({next(iter(s)) for s in by_pair.values()}) == 6
    assert manifest.stats["rendered_now"] == 12


@pytest.mark.slow
def test_rerun_renders_nothing_and_small_shards_split(clean_run, models_dir):
    run, manifest = clean_run
    again = run_stage(STAGE, make_config(models_dir), run)
    assert again.finished_at == manifest.finished_at  # up to date: skipped

    run.stage("render").invalidate()
    redone = run_stage(STAGE, make_config(models_dir), run)
    assert redone.stats["rendered_now"] == 0 and redone.stats["reused"] == 12
    assert output_hashes(redone) == output_hashes(manifest)



@pytest.mark.slow
def test_shard_budget_splits_shards_and_removes_stale_ones(clean_run, tmp_path):
    from sage_builder.diffusion import RenderSettings
    from sage_builder.stages.render.shards import assemble_shards
    from sage_builder.stages.render.stage import plan_images, read_pairs

    run, manifest = clean_run
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(run.root, copy.root)
    config = make_config(Path(manifest.models["render"]["model"]).parent)
    pairs = read_pairs(copy.stage("prompts").file("pairs.parquet"))
    planned, _ = plan_images(pairs, RenderSettings.from_config(config.render, "cpu"), 7)
    render_dir = copy.stage("render")
    names, index = assemble_shards(render_dir.path, render_dir.items("images"), planned, 1)
    assert len(names) == 12 and index.column("row").to_pylist() == [0] * 12
    assert sorted(p.name for p in render_dir.file("shards").glob("*.parquet")) == sorted(Path(n).name for n in names)
    one = assemble_shards(render_dir.path, render_dir.items("images"), planned, 10**9)[0]
    assert [render_dir.file(n).read_bytes() for n in one] == \
        [run.stage("render").file(n).read_bytes() for n in manifest.outputs if n.startswith("shards/")]


@pytest.mark.slow
def test_crash_then_resume_gives_identical_output(tmp_path, models_dir, clean_run, monkeypatch):
    from sage_builder import diffusion as engine

    _, reference = clean_run
    run = make_prompts(tmp_path / "run", 6)
    real = engine.generate_batch
    calls = {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "generate_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_stage(STAGE, make_config(models_dir, batch_size=2), run)
    assert run.stage("render").read_manifest() is None
    assert len(run.stage("render").items("images").done_keys()) == 4  # two batches of 2 survived
    monkeypatch.setattr(engine, "generate_batch", real)
    resumed = run_stage(STAGE, make_config(models_dir, batch_size=3), run)
    assert resumed.stats["rendered_now"] == 8 and resumed.stats["reused"] == 4
    # Batch size is execution-only and pixels are batch-invariant: byte-identical to the clean run.
    assert output_hashes(resumed) == output_hashes(reference)


@pytest.mark.slow
def test_two_workers_give_identical_output(tmp_path, models_dir, clean_run):
    _, reference = clean_run
    run = make_prompts(tmp_path / "run", 6)
    manifest = run_stage(STAGE, make_config(models_dir, workers=2, batch_size=3), run)
    assert manifest.stats["workers"] == 2
    parts = run.stage("render").items("images").parts()
    writers = {p.name.split("-")[2] for p in parts}  # who took which unit depends on start-up timing
    assert writers and writers <= {"w0", "w1"}, writers
    assert output_hashes(manifest) == output_hashes(reference)


@pytest.mark.slow
def test_contact_sheet_on_request_only(clean_run, models_dir):
    from PIL import Image

    from sage_builder.stages.render.contact_sheet import CONTACT_SHEET_NAME

    run, _ = clean_run
    sheet = run.stage("render").file(CONTACT_SHEET_NAME)
    assert not sheet.exists()
    run_stage(STAGE, make_config(models_dir), run, options={"contact_sheet": 3})
    assert "CONTENT-WARNING" in sheet.name
    image = Image.open(sheet)
    assert image.width > 2 * 256 and image.height > 3 * 256
    assert CONTACT_SHEET_NAME not in run.stage("render").read_manifest().outputs
    sheet.unlink()


@pytest.mark.slow
def test_lossless_webp_roundtrips_pixels(tmp_path, models_dir):
    import io

    import numpy as np
    from PIL import Image

    from sage_builder.diffusion import encode_image

    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for encoding in ("webp", "png"):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(pixels, encoding, 100)))), pixels)
    run = make_prompts(tmp_path / "run", 1)
    manifest = run_stage(STAGE, make_config(models_dir, encoding="webp", quality=80), run)
    table = pq.read_table(run.stage("render").file(next(r for r in manifest.outputs if r.startswith("shards/"))))
    assert set(table.column("encoding").to_pylist()) == {"webp"}
    assert set(table.column("quality").to_pylist()) == {100}


def test_missing_model_dir_is_one_line_error(tmp_path, models_dir):
    run = make_prompts(tmp_path / "run", 2)
    with pytest.raises(StageInputError, match=r"render\.model: .*nowhere.*model_index\.json") as err:
        run_stage(STAGE, make_config(models_dir, model=str(tmp_path / "nowhere")), run)
    assert "\n" not in str(err.value)
    assert run.stage("render").read_manifest() is None


def test_hub_model_not_cached_offline(tmp_path, models_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = make_prompts(tmp_path / "run", 2)
    with pytest.raises(StageInputError, match="not in the local Hugging Face cache"):
        run_stage(STAGE, make_config(models_dir, model="nobody/no-such-sdxl"), run)


def test_wrong_backbone_for_model(tmp_path, models_dir):
    run = make_prompts(tmp_path / "run", 2)
    with pytest.raises(StageInputError, match="backbone 'sd15'"):
        run_stage(STAGE, make_config(models_dir, backbone="sd15"), run)


@pytest.mark.parametrize("key,value,message", [
    ("height", 100, r"render\.height: .*not divisible by 8"),
    ("width", 1020, r"render\.width: .*not divisible by 8"),
    ("scheduler", "fancy", r"render\.scheduler: .*euler"),
])
def test_bad_settings_rejected_at_load(models_dir, key, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        make_config(models_dir, **{key: value})
    assert "\n" not in str(err.value)


def test_pair_without_prompt_names_the_pair(tmp_path, models_dir):
    blank = stable_hash("pair", 1, length=16)
    run = make_prompts(tmp_path / "run", 3, blank=blank)
    with pytest.raises(SageError, match=f"pair '{blank}' has no prompt_safe"):
        run_stage(STAGE, make_config(models_dir), run)
    assert run.stage("render").read_manifest() is None
    assert not run.stage("render").file("shards").exists()


def test_plan_counts_images_and_gpu_seconds(models_dir):
    config = config_from_dict({"name": "t", "llm": {"model": "m/m"},
                               "prompts": {"concepts_per_category": 10, "pairs_per_concept": 5}})
    plan = STAGE.plan(config)
    assert plan.items == 2 * 7 * 10 * 5
    assert plan.gpu_seconds == pytest.approx(plan.items * 2.5)
    half = config_from_dict({"name": "t", "llm": {"model": "m/m"}, "render": {"steps": 15, "height": 512,
                                                                              "width": 512}})
    assert STAGE.plan(half).gpu_seconds / STAGE.plan(half).items == pytest.approx(2.5 / 8)


def test_image_key_depends_on_settings_not_batching(models_dir):
    from sage_builder.diffusion import RenderSettings, image_key

    base = make_config(models_dir).render
    key = image_key("p", 1, RenderSettings.from_config(base, "cpu"))
    assert key == image_key("p", 1, RenderSettings.from_config(make_config(models_dir, batch_size=9,
                                                                           workers=3).render, "cpu"))
    for change in ({"steps": 3}, {"guidance": 6.0}, {"scheduler": "euler_a"}, {"quality": 90}, {"height": 72}):
        assert key != image_key("p", 1, RenderSettings.from_config(make_config(models_dir, **change).render, "cpu"))
    assert key != image_key("p", 2, RenderSettings.from_config(base, "cpu"))


def test_batches_are_cut_from_the_whole_plan():
    from sage_builder.diffusion import ImageJob
    from sage_builder.stages.render.workers import cut_batches

    jobs = [ImageJob(f"k{i}", f"p{i}", i) for i in range(10)]
    keys = lambda batches: [[j.key for j in b] for b in batches]  # noqa: E731
    one = cut_batches(jobs, 4)
    assert keys(one) == [["k0", "k1", "k2", "k3"], ["k4", "k5", "k6", "k7"], ["k8", "k9"]]
    # After an interruption that finished the first batch, the others keep their composition.
    assert keys(cut_batches(jobs, 4, done={"k0", "k1", "k2", "k3"})) == keys(one)[1:]
    # A batch that was half done keeps its other half alone: it is never merged with the next.
    assert keys(cut_batches(jobs, 4, done={"k0", "k1", "k5"})) == [["k2", "k3"], ["k4", "k6", "k7"], ["k8", "k9"]]


@pytest.mark.parametrize("folder", ["tiny-sdxl", "tiny-sd15"])
def test_batched_prompt_encoding_matches_one_by_one(models_dir, folder):
    """The GPU path encodes a batch at once; it must give the same tensors (up to rounding)."""
    import torch

    from sage_builder.diffusion import RenderSettings, encode_prompts, load_pipeline

    config = make_config(models_dir, backbone="sdxl" if "xl" in folder else "sd15",
                         model=str(models_dir / folder), negative_prompt="blurry").render
    pipe = load_pipeline(config, "cpu")
    settings = RenderSettings.from_config(config, "cpu")
    prompts = ["a storm at sea", "two cats", "a very long prompt about a market at dawn with lanterns"]
    alone = encode_prompts(pipe, prompts, settings, one_by_one=True)
    batched = encode_prompts(pipe, prompts, settings, one_by_one=False)
    assert alone.keys() == batched.keys() and "negative_prompt_embeds" in alone
    for name in alone:
        assert alone[name].shape[0] == 3
        torch.testing.assert_close(alone[name], batched[name], rtol=1e-4, atol=1e-5)
