"""Stage 5 on the real output of stage 4 (fake stages 1-3 -> label -> publish to a local Hub)."""

from __future__ import annotations

import hashlib
import json

import pytest

from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.testing.fake_run import make_fake_run
from sage_builder.testing.hub_server import HubServer, local_hub

# huggingface_hub's LFS upload passes a file object as `data=`, which httpx2 deprecates; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_label_dataset_token"
REPO = "sage-org/sage-from-label"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    with local_hub(monkeypatch, TOKEN) as server:
        yield server


@pytest.mark.slow
def test_label_dataset_dry_run_then_push_then_rerun_is_a_no_op(hub: HubServer, tmp_path) -> None:
    run, config = make_fake_run(tmp_path / "run", n_users=12)
    label = run_stage(get_stage("label"), config, run)
    dataset_files = {rel.removeprefix("dataset/"): out for rel, out in label.outputs.items()
                     if rel.startswith("dataset/")}
    assert "README.md" in dataset_files and any(p.startswith("data/pairs/") for p in dataset_files)

    dry = run_stage(get_stage("publish"), config, run)  # no repo_id: plan only, no network
    assert dry.stats["dry_run"] is True and dry.stats["add"] >= len(dataset_files)
    assert hub.requests == []

    config.publish.repo_id = REPO
    pushed = run_stage(get_stage("publish"), config, run)
    assert pushed.stats["differences"] == 0 and pushed.stats["private"] is True
    remote = hub.files(REPO)
    for path, out in dataset_files.items():
        data = hub.lfs_objects[remote[path].lfs_sha256] if remote[path].lfs_sha256 else remote[path].content
        assert hashlib.sha256(data).hexdigest() == out.sha256, path
    assert {f"manifests/{s}.json" for s in ("profiles", "prompts", "render", "label")} <= set(remote)
    verification = json.loads((run.root / "publish" / "verification.json").read_text())
    assert verification["commit"] == hub.repos[REPO].branches["main"]

    commits = len(hub.repos[REPO].commits)
    again = run_stage(get_stage("publish"), config, run, force=True)
    assert again.stats["add"] == again.stats["update"] == again.stats["delete"] == 0
    assert len(hub.repos[REPO].commits) == commits


def test_a_stale_label_dataset_is_refused_and_manifests_are_pushed_without_local_paths(hub: HubServer, tmp_path,
                                                                                         models_dir) -> None:
    from sage_builder.errors import StageInputError
    from sage_builder.public import local_paths_in
    from sage_builder.store import Manifest

    run, config = make_fake_run(tmp_path / "run", n_users=12)
    # A render manifest naming a local model folder, as a real run's does.
    render = run.stage("render")
    manifest = render.read_manifest()
    render.write_manifest(Manifest(**{**manifest.model_dump(), "models": {
        "render": {"model": str(models_dir / "tiny-sdxl"), "revision": None}},
        "stats": {**manifest.stats, "note": f"read from {render.path}/shards"}}))
    run_stage(get_stage("label"), config, run)
    config.publish.repo_id = REPO
    pushed = run_stage(get_stage("publish"), config, run)
    assert pushed.stats["differences"] == 0
    remote = hub.files(REPO)
    for stage in ("profiles", "prompts", "render", "label"):
        text = remote[f"manifests/{stage}.json"].content.decode()
        assert local_paths_in(text) == [] and str(tmp_path) not in text, stage
    render_public = json.loads(remote["manifests/render.json"].content)
    assert render_public["models"]["render"]["model"].startswith("tiny-sdxl (local-model:")
    assert render_public["stats"]["note"] == "read from render/shards"
    card = remote["README.md"]
    text = (hub.lfs_objects[card.lfs_sha256] if card.lfs_sha256 else card.content).decode()
    assert local_paths_in(text) == [] and "tiny-sdxl (local-model:" in text  # the render model, by name

    config.label.pairs_per_category = 1  # the label stage is now stale against its config
    with pytest.raises(StageInputError, match="is stale .*--allow-stale"):
        run_stage(get_stage("publish"), config, run, force=True)
    config.publish.allow_stale = True
    again = run_stage(get_stage("publish"), config, run, force=True)
    assert again.stats["differences"] == 0
