"""Stage 5 (publish) against a local Hub: the real huggingface_hub client talks HTTP to HubServer.

Nothing of ours is patched: the tests point HF_ENDPOINT at the server, give HF_TOKEN, and turn off
the two huggingface_hub switches the test session sets (offline mode) or that need the real Hub
(Xet storage, which HubServer does not speak; the LFS protocol is what it checks).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.config import config_from_dict
from sage_builder.errors import ConfigError
from sage_builder.stages.base import run_stage
from sage_builder.stages.publish.stage import STAGE
from sage_builder.store import Manifest, RunDir
from sage_builder.testing.hub_server import HubServer, local_hub

# huggingface_hub's LFS upload passes a file object as `data=`, which httpx2 deprecates; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_sEcReT_publish_test_token_4242"
REPO = "sage-org/sage-test"
CARD = """---
license: cc-by-nc-4.0
configs:
- config_name: preferences
  default: true
  data_files:
  - split: train
    path: data/preferences/train-*.parquet
---
# Sage (test)

Content warning: harmful by design.
"""


def make_label_run(root: Path, version: int = 1, shards: int = 2) -> RunDir:
    """A finished label stage: RUN/label/dataset in the Hub layout plus its manifest."""
    run = RunDir(root)
    label = run.stage("label")
    dataset = label.path / "dataset"
    rels = ["dataset/README.md"]
    (dataset / "data" / "preferences").mkdir(parents=True, exist_ok=True)
    (dataset / "data" / "pairs").mkdir(parents=True, exist_ok=True)
    (dataset / "README.md").write_text(CARD + f"\nversion {version}\n")
    for i in range(shards):
        rel = f"dataset/data/preferences/train-{i:05d}-of-{shards:05d}.parquet"
        table = pa.table({"record_id": [f"r{version}-{i}-{j}" for j in range(50)], "idx": list(range(50))})
        pq.write_table(table, label.path / rel)
        rels.append(rel)
    rel = "dataset/data/pairs/all-00000-of-00001.parquet"
    image_bytes = [hashlib.sha256(f"{version}-{j}".encode()).digest() * 64 for j in range(20)]
    pq.write_table(pa.table({"pair_id": [f"p{j}" for j in range(20)], "image_unsafe": image_bytes}),
                   label.path / rel)
    rels.append(rel)
    manifest = Manifest(stage="label", fingerprint=f"fp{version}", config_hash="c",
                        outputs=label.describe_outputs(rels))
    label.write_manifest(manifest)
    return run


def config(**publish: object):
    return config_from_dict({"name": "publish-test", "llm": {"model": "none"}, "publish": publish})


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    with local_hub(monkeypatch, TOKEN) as server:
        yield server


def publish(run: RunDir, *args: str):
    return CliRunner().invoke(app, ["publish", "--repo-id", REPO, "--run-dir", str(run.root), *args])


def expected_files(run: RunDir) -> dict[str, tuple[str, int]]:
    manifest = run.stage("label").read_manifest()
    assert manifest is not None
    return {rel.removeprefix("dataset/"): (out.sha256, out.bytes) for rel, out in manifest.outputs.items()}


def remote_files(server: HubServer, revision: str = "main") -> dict[str, tuple[str, int]]:
    """path -> (sha256, size) of what the server holds, read back from its stored bytes."""
    out = {}
    for path, remote in server.files(REPO, revision).items():
        data = server.lfs_objects[remote.lfs_sha256] if remote.lfs_sha256 else remote.content
        out[path] = (hashlib.sha256(data).hexdigest(), remote.size)
    return out


def lfs_count(run: RunDir) -> int:
    return sum(1 for path in expected_files(run) if path.endswith(".parquet"))


def test_happy_path_private_by_default_one_commit_verified(hub: HubServer, tmp_path: Path) -> None:
    run = make_label_run(tmp_path / "run")
    result = publish(run)
    assert result.exit_code == 0, result.output
    assert "published sage-org/sage-test@main (private)" in result.output

    create = hub.matching("POST", r"^/api/repos/create$")
    assert len(create) == 1 and create[0].json()["visibility"] == "private"
    assert create[0].json()["type"] == "dataset"
    assert hub.repos[REPO].private is True
    commits = hub.matching("POST", r"/commit/main$")
    assert len(commits) == 1  # one commit: readers never see a half-pushed version
    assert hub.count("PUT", r"^/_lfs/") == lfs_count(run)

    remote = remote_files(hub)
    for path, (sha, size) in expected_files(run).items():
        assert remote[path] == (sha, size)
    assert "manifests/label.json" in remote and ".gitattributes" in remote
    verification = json.loads((run.root / "publish" / "verification.json").read_text())
    assert verification["differences"] == [] and verification["private"] is True
    assert run.stage("publish").read_manifest().stats["commit"] == verification["commit"]

    again = publish(run)  # nothing changed: no upload, no commit
    assert again.exit_code == 0, again.output
    assert len(hub.matching("POST", r"/commit/main$")) == 1
    assert hub.count("PUT", r"^/_lfs/") == lfs_count(run)


def test_new_version_replaces_old_files_in_the_same_commit(hub: HubServer, tmp_path: Path) -> None:
    run = make_label_run(tmp_path / "run", version=1, shards=3)
    assert publish(run).exit_code == 0
    hub.tamper(REPO, ".gitattributes", content=b"*.parquet filter=lfs diff=lfs merge=lfs -text\n# user edit\n")
    make_label_run(tmp_path / "run", version=2, shards=1)
    for stale in (tmp_path / "run" / "label" / "dataset" / "data" / "preferences").glob("*-of-00003.parquet"):
        stale.unlink()

    result = publish(run)
    assert result.exit_code == 0, result.output
    commit = hub.matching("POST", r"/commit/main$")[-1]
    lines = [json.loads(line) for line in commit.body.splitlines()]
    deleted = {line["value"]["path"] for line in lines if line["key"] == "deletedFile"}
    assert deleted == {f"data/preferences/train-{i:05d}-of-00003.parquet" for i in range(3)}
    assert {line["key"] for line in lines} == {"header", "file", "lfsFile", "deletedFile"}
    remote = remote_files(hub)
    assert set(remote) == set(expected_files(run)) | {".gitattributes", "manifests/label.json"}
    assert b"user edit" in hub.files(REPO)[".gitattributes"].content  # files we do not manage are kept


def test_interrupted_commit_leaves_repo_intact_and_rerun_sends_nothing_again(hub: HubServer, tmp_path: Path) -> None:
    run = make_label_run(tmp_path / "run")
    hub.fail("POST", r"/commit/", status=500)
    failed = publish(run)
    assert failed.exit_code == 2
    error = failed.output.strip().splitlines()[-1]
    assert error.startswith("error: publish sage-org/sage-test: the commit failed") and "nothing was committed" in error
    assert set(hub.files(REPO)) == {".gitattributes"}  # the repo shows its previous version, not half of this one
    sent = hub.count("PUT", r"^/_lfs/")
    assert sent == lfs_count(run)
    assert run.stage("publish").read_manifest() is None

    rerun = publish(run)
    assert rerun.exit_code == 0, rerun.output
    assert hub.count("PUT", r"^/_lfs/") == sent  # the Hub already held every LFS object
    assert remote_files(hub).items() >= expected_files(run).items()


def test_upload_interrupted_midway_resumes_with_the_missing_files_only(hub: HubServer, tmp_path: Path) -> None:
    run = make_label_run(tmp_path / "run", shards=4)
    hub.fail("PUT", r"^/_lfs/", status=400, after=1)  # the second upload breaks (not retried: 4xx)
    failed = publish(run)
    assert failed.exit_code == 2
    assert "uploading files failed" in failed.output
    held = len(hub.lfs_objects)
    assert 1 <= held < lfs_count(run)
    assert set(hub.files(REPO)) == {".gitattributes"}
    first_puts = hub.count("PUT", r"^/_lfs/", status=200)

    rerun = publish(run)
    assert rerun.exit_code == 0, rerun.output
    assert hub.count("PUT", r"^/_lfs/", status=200) - first_puts == lfs_count(run) - held
    assert remote_files(hub).items() >= expected_files(run).items()


def test_concurrent_push_is_refused_not_overwritten(hub: HubServer, tmp_path: Path) -> None:
    run = make_label_run(tmp_path / "run")
    hub.before_commit.append(lambda repo_id: hub.push_elsewhere(repo_id, "data/other/x.csv", b"a,b\n"))
    result = publish(run)
    assert result.exit_code == 2
    assert "someone pushed to the repo meanwhile" in result.output.strip().splitlines()[-1]
    assert set(hub.files(REPO)) == {".gitattributes", "data/other/x.csv"}  # their commit stands, ours was refused
    hub.before_commit.clear()
    rerun = publish(run)  # planned against the new head: their file is stale under data/ and goes in one commit
    assert rerun.exit_code == 0, rerun.output
    assert "data/other/x.csv" not in hub.files(REPO)


def test_rate_limited_preupload_is_retried_by_huggingface_hub(hub: HubServer, tmp_path: Path) -> None:
    run = make_label_run(tmp_path / "run")
    hub.fail("POST", r"/preupload/", status=429, headers={"Retry-After": "0"})
    result = publish(run)
    assert result.exit_code == 0, result.output
    assert [r.status for r in hub.matching("POST", r"/preupload/")][:2] == [429, 200]


def test_rate_limited_commit_is_retried_once_by_us(hub: HubServer, tmp_path: Path) -> None:
    run = make_label_run(tmp_path / "run")
    hub.fail("POST", r"/commit/", status=429, headers={"Retry-After": "0"})
    result = publish(run)
    assert result.exit_code == 0, result.output
    assert [r.status for r in hub.matching("POST", r"/commit/")] == [429, 200]
    assert len(hub.repos[REPO].commits) == 2  # the initial commit and ours, not a duplicate


def test_verification_reports_every_difference_and_fails(hub: HubServer, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    run = make_label_run(tmp_path / "run")
    corrupt, lost = "data/preferences/train-00000-of-00002.parquet", "data/pairs/all-00000-of-00001.parquet"

    def damage(repo_id: str) -> None:
        hub.tamper(repo_id, corrupt, content=b"PAR1 not the file we sent")
        hub.tamper(repo_id, lost, delete=True)

    hub.after_commit.append(damage)
    result = publish(run)
    assert result.exit_code == 3
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("error: publish sage-org/sage-test: the Hub does not match the label manifest, "
                            "2 difference(s)")
    assert f"{corrupt}: size (expected " in error and f"{lost}: missing" in error
    assert f"verification: {lost}: missing" in caplog.text
    verification = json.loads((run.root / "publish" / "verification.json").read_text())
    assert {(d["path"], d["problem"]) for d in verification["differences"]} == {(corrupt, "size"), (lost, "missing")}
    assert run.stage("publish").read_manifest() is None  # a failed verification is not a finished stage


def test_public_is_explicit_and_loud_and_gating_is_applied(hub: HubServer, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    run = make_label_run(tmp_path / "run")
    result = publish(run, "--public", "--gated", "manual")
    assert result.exit_code == 0, result.output
    assert hub.matching("POST", r"^/api/repos/create$")[0].json()["visibility"] == "public"
    assert "PUBLIC RELEASE of sage-org/sage-test" in caplog.text
    assert [r.json() for r in hub.matching("PUT", r"/settings$")] == [{"gated": "manual"}]
    assert hub.repos[REPO].gated == "manual"

    refused = publish(run)  # private is the default: pushing into a public repo needs --public
    assert refused.exit_code == 2
    assert "already exists and is PUBLIC" in refused.output


def test_revision_branch_is_created_and_main_left_alone(hub: HubServer, tmp_path: Path) -> None:
    run = make_label_run(tmp_path / "run")
    result = publish(run, "--revision", "v2-candidate")
    assert result.exit_code == 0, result.output
    assert len(hub.matching("POST", r"/branch/v2-candidate$")) == 1
    assert set(hub.files(REPO, "main")) == {".gitattributes"}
    assert remote_files(hub, "v2-candidate").items() >= expected_files(run).items()


@pytest.mark.parametrize("bad", ["sage", "a/b/c", "-org/name", "org/na me", "org/name.git", "org--x/name", ""])
def test_bad_repo_id_is_one_line_and_touches_nothing(hub: HubServer, tmp_path: Path, bad: str) -> None:
    run = make_label_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["publish", "--repo-id", bad, "--run-dir", str(run.root)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --repo-id '{bad}':"), result.output
    assert hub.requests == []
    with pytest.raises(ConfigError, match=r"publish\.repo_id: Value error, '"):
        config(repo_id=bad or "x")


def test_stage_without_repo_id_writes_a_plan_and_makes_no_network_call(hub: HubServer, tmp_path: Path) -> None:
    run = make_label_run(tmp_path / "run")
    manifest = run_stage(STAGE, config(), run)
    plan = json.loads((run.root / "publish" / "plan.json").read_text())
    local = expected_files(run)
    assert plan["remote_consulted"] is False and plan["repo_id"] is None
    assert plan["add"] == len(local) + 1  # + manifests/label.json
    assert plan["bytes_to_send"] >= sum(size for _, size in local.values())
    assert {op["path"] for op in plan["operations"]} >= set(local)
    assert manifest.stats["dry_run"] is True
    assert hub.requests == []


def test_cli_dry_run_lists_add_update_unchanged_delete_and_commits_nothing(hub: HubServer, tmp_path: Path) -> None:
    run = make_label_run(tmp_path / "run")
    assert publish(run).exit_code == 0
    make_label_run(tmp_path / "run", version=2, shards=1)
    for stale in (run.stage("label").path / "dataset" / "data" / "preferences").glob("*-of-00002.parquet"):
        stale.unlink()
    commits, puts = len(hub.matching("POST", r"/commit/")), hub.count("PUT", r"^/_lfs/")

    result = publish(run, "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "dry run: sage-org/sage-test@main (private)" in out
    assert "      add  data/preferences/train-00000-of-00001.parquet" in out
    assert "   delete  data/preferences/train-00001-of-00002.parquet" in out
    assert "   update  README.md" in out and "     keep  .gitattributes" in out
    assert "to send at most" in out
    assert len(hub.matching("POST", r"/commit/")) == commits and hub.count("PUT", r"^/_lfs/") == puts


def test_missing_token_is_one_line(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_label_run(tmp_path / "run")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    result = publish(run)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: no Hugging Face token: set HF_TOKEN")
    assert hub.requests == []


@pytest.mark.slow
def test_token_never_appears_in_output_logs_or_files(hub: HubServer, tmp_path: Path) -> None:
    """A real process with debug logging, a failed push and a successful one: the token is nowhere."""
    run = make_label_run(tmp_path / "run")
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_DEBUG": "1"}  # huggingface_hub then logs every request as a curl command
    command = [sys.executable, "-c", "from sage_builder.cli import main; main()", "publish", "--repo-id", REPO,
               "--run-dir", str(run.root), "--verbose"]
    hub.fail("POST", r"/commit/", status=500)
    outputs = [subprocess.run(command, env=env, capture_output=True, text=True, timeout=120) for _ in range(2)]
    assert [p.returncode for p in outputs] == [2, 0], outputs[-1].stderr[-2000:]
    assert hub.count("POST", r"/commit/", 200) == 1
    # The repo API carries the token (uploads go to pre-signed URLs; huggingface_hub's own
    # unauthenticated GET /api/agent-harnesses is not ours).
    api_calls = [r for r in hub.requests if r.path.startswith(("/api/repos/", "/api/datasets/", "/datasets/"))]
    assert api_calls and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api_calls)
    for p in outputs:
        assert TOKEN not in p.stdout and TOKEN not in p.stderr  # ...and never printed
    for path in run.root.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_offline_mode_is_a_one_line_error_and_keeps_the_last_publish(hub: HubServer, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_label_run(tmp_path / "run")
    assert publish(run).exit_code == 0
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = publish(run)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: HF_HUB_OFFLINE=1 is set")
    assert run.stage("publish").read_manifest() is not None
