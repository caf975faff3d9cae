"""The bad-input corpus: what a data engineer gets wrong, across the CLI and every stage.

Every case must end with exit 2, exactly one ``error:`` line that names the file or key at fault
(the case's ``needle``), no traceback, and every file under the test's folder (the run directory
included) byte-identical before and after. A run directory is copied from a small template built
once: a fake run with stages 1-3 done (``sage_builder.testing.fake_run``), or that run with label
and publish done too.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.config import dump_config
from sage_builder.testing.fake_run import make_fake_run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pipelines" / "demo.yaml"
TINY_SDXL = REPO / ".cache" / "models" / "tiny-sdxl"
TINY_SD15 = REPO / ".cache" / "models" / "tiny-sd15"
runner = CliRunner()


@dataclass
class Ctx:
    """What a case works with: ``tmp`` (everything under it is compared), ``run`` (a copied run dir),
    ``pipeline`` (its YAML) and ``monkeypatch``."""

    tmp: Path
    run: Path
    pipeline: Path
    monkeypatch: pytest.MonkeyPatch

    def yaml(self, name: str, data: object) -> Path:
        path = self.tmp / name
        path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
        return path

    def pipeline_with(self, **sections: dict) -> Path:
        data = yaml.safe_load(self.pipeline.read_text())
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key].update(value)
            else:
                data[key] = value
        return self.yaml("edited.yaml", data)

    def stage(self, name: str, *extra: str, pipeline: Path | None = None) -> list[str]:
        return ["stage", name, "--config", str(pipeline or self.pipeline), "--run-dir", str(self.run), *extra]


@dataclass
class Case:
    id: str
    template: str  # "none" (no run dir yet), "fake" (stages 1-3 done), "labelled" (1-5 done)
    prepare: Callable[[Ctx], list[str]]  # changes files under ctx.tmp, returns the CLI arguments
    needle: str | Callable[[Ctx], str]  # what the one error line must name
    xfail: str | None = None


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where) if where >= 0 else len(data) + int(where)] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(max(64, path.stat().st_size)))


def drop_row(path: Path) -> None:
    pq.write_table(pq.read_table(path).slice(1), path)


def first_shard(run: Path) -> Path:
    return sorted((run / "render" / "shards").glob("*.parquet"))[0]


def first_dataset_file(run: Path, config: str) -> Path:
    return sorted((run / "label" / "dataset" / "data" / config).glob("*.parquet"))[0]


def half_downloaded(model: Path, to: Path, component: str) -> None:
    """A model folder whose download stopped: one component's weights are cut short."""
    shutil.copytree(model, to)
    weights = next((to / component).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])


def render_pipeline(ctx: Ctx, model: Path = TINY_SDXL, **render: object) -> Path:
    return ctx.pipeline_with(render={"model": str(model), "backbone": "sdxl", **render})


def no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def enospc_on_parquet_writes(ctx: Ctx) -> None:
    ctx.monkeypatch.setattr(pq, "write_table", no_space)
    ctx.monkeypatch.setattr(pq, "ParquetWriter", no_space)


def c(id: str, template: str, prepare: Callable[[Ctx], list[str]], needle: str | Callable[[Ctx], str],
      xfail: str | None = None) -> Case:
    return Case(id, template, prepare, needle, xfail)


def _then(action: Callable[[Ctx], object], args: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
    def prepare(ctx: Ctx) -> list[str]:
        action(ctx)
        return args(ctx)
    return prepare


CLI = [
    c("config-is-a-directory", "none", lambda x: ["stage", "label", "--config", str(x.tmp), "--run-dir", str(x.run)],
      lambda x: f"{x.tmp}: is a directory"),
    c("config-is-binary", "none", _then(lambda x: (x.tmp / "b.yaml").write_bytes(bytes(range(256)) * 4),
                                        lambda x: ["plan", "--config", str(x.tmp / "b.yaml")]), "b.yaml: not a text file"),
    c("config-missing", "none", lambda x: ["plan", "--config", str(x.tmp / "nope.yaml")], "nope.yaml: no such"),
    c("config-not-yaml", "none", lambda x: ["plan", "--config", str(x.yaml("bad.yaml", "name: [x\n"))],
      "bad.yaml: not valid YAML"),
    c("config-top-level-list", "none", lambda x: ["plan", "--config", str(x.yaml("list.yaml", "- a\n- b\n"))],
      "list.yaml: the top level must be a mapping"),
    c("config-empty-file", "none", lambda x: ["plan", "--config", str(x.yaml("empty.yaml", ""))], "name"),
    c("config-typo-section", "fake", lambda x: ["plan", "--config", str(x.pipeline_with(promts={"a": 1}))],
      "promts: unknown key"),
    c("config-typo-key", "fake", lambda x: ["plan", "--config", str(x.pipeline_with(render={"stpes": 3}))],
      "render.stpes: unknown key"),
    c("config-wrong-type", "fake", lambda x: ["plan", "--config", str(x.pipeline_with(profiles={"n_users": "many"}))],
      "profiles.n_users"),
    c("config-out-of-range", "fake", lambda x: ["plan", "--config", str(x.pipeline_with(llm={"temperature": 5}))],
      "llm.temperature"),
    c("config-unknown-backend", "fake", lambda x: ["plan", "--config", str(x.pipeline_with(llm={"backend": "gpt"}))],
      "llm.backend"),
    c("config-duplicate-category", "fake", lambda x: ["plan", "--config", str(x.pipeline_with(
        categories=["Hate", "hate"]))], "categories"),
    c("config-empty-category", "fake", lambda x: ["plan", "--config", str(x.pipeline_with(categories=["Hate", " "]))],
      "categories"),
    c("config-unknown-executor", "fake", lambda x: ["plan", "--config", str(x.pipeline_with(executor="slurm"))],
      "executor"),
    c("set-value-not-yaml", "fake", lambda x: x.stage("label", "--set", "render.steps=[1,"), "--set render.steps=[1,"),
    c("set-without-equals", "fake", lambda x: x.stage("label", "--set", "render.steps"), "--set render.steps"),
    c("set-into-a-value", "fake", lambda x: x.stage("label", "--set", "seed.x=1"), "--set seed.x"),
    c("set-unknown-key", "fake", lambda x: x.stage("label", "--set", "render.nope=1"), "render.nope"),
    c("set-wrong-type", "fake", lambda x: x.stage("label", "--set", "label.pairs_per_category=lots"),
      "label.pairs_per_category"),
    c("run-dir-is-a-file", "none", _then(lambda x: x.run.write_text("not a folder"), lambda x: x.stage("label")),
      lambda x: f"--run-dir {x.run}: is a file"),
    c("run-dir-under-a-file", "none", _then(lambda x: x.run.write_text("not a folder"), lambda x: [
        "stage", "label", "--config", str(DEMO), "--run-dir", str(x.run / "sub")]), lambda x: f"{x.run} is a file"),
    c("run-dir-dangling-symlink", "none", _then(lambda x: x.run.symlink_to(x.tmp / "gone"), lambda x: x.stage("label")),
      lambda x: f"--run-dir {x.run}: a symlink to"),
    c("run-until-typo", "none", lambda x: ["run", "--run-dir", str(x.run), "--until", "labl"], "unknown stage 'labl'"),
    c("run-first-stage-fails", "none", lambda x: ["run", "--config", str(x.pipeline_with(
        profiles={"demographics": str(x.tmp / "gone.yaml")})), "--run-dir", str(x.run)], "gone.yaml"),
    c("run-skip-typo", "none", lambda x: ["run", "--run-dir", str(x.run), "--skip", "rendr"], "unknown stage 'rendr'"),
    c("stage-unknown-name", "none", lambda x: ["stage", "nine", "--run-dir", str(x.run)], "unknown stage 'nine'"),
    c("stage-number-out-of-range", "none", lambda x: ["stage", "9", "--run-dir", str(x.run)], "unknown stage '9'"),
    c("stage-option-not-its-own", "fake", lambda x: x.stage("label", "--contact-sheet", "2"),
      "stage 'label' has no option 'contact_sheet'"),
    c("status-of-a-file", "none", _then(lambda x: x.run.write_text("x"), lambda x: ["status", str(x.run)]),
      "is a file, not a run directory"),
    c("status-of-nothing", "none", lambda x: ["status", str(x.run)], "no such run directory"),
    c("plan-measured-not-a-run", "none", lambda x: ["plan", "--measured", str(x.tmp)], "no config.yaml there"),
    c("users-sample-out-is-a-directory", "none", lambda x: ["users", "sample", "-n", "5", "-o", str(x.tmp)],
      lambda x: str(x.tmp)),
    c("users-sample-missing-demographics", "none", lambda x: [
        "users", "sample", "-n", "5", "-o", str(x.tmp / "u.csv"), "--demographics", str(x.tmp / "none.yaml")],
      "none.yaml"),
]

PROFILES = [
    c("profiles-demographics-missing", "none", lambda x: x.stage("profiles", pipeline=x.pipeline_with(
        profiles={"demographics": str(x.tmp / "gone.yaml")})), "gone.yaml"),
    c("profiles-demographics-not-yaml", "none", lambda x: x.stage("profiles", pipeline=x.pipeline_with(
        profiles={"demographics": str(x.yaml("d.yaml", "age: [\n"))})), "d.yaml"),
    c("profiles-template-missing", "none", lambda x: x.stage("profiles", pipeline=x.pipeline_with(
        profiles={"statement_template": str(x.tmp / "gone.txt")})), "gone.txt"),
    c("profiles-template-unknown-placeholder", "none", lambda x: x.stage("profiles", pipeline=x.pipeline_with(
        profiles={"statement_template": str(x.yaml("t.txt", "### user\nA {{height}} user\n"))})), "height"),
    c("profiles-llm-folder-missing", "none", lambda x: x.stage("profiles", pipeline=x.pipeline_with(
        llm={"model": str(x.tmp / "no-model")})), "no-model"),
    c("profiles-llm-endpoint-unreachable", "none", lambda x: x.stage("profiles", pipeline=x.pipeline_with(
        llm={"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "max_retries": 0},
        profiles={"embedding_model": str(REPO / ".cache" / "models" / "smollm2-135m-instruct")})), "llm.base_url"),
]

PROMPTS = [
    c("prompts-seeds-missing", "none", lambda x: x.stage("prompts", pipeline=x.pipeline_with(
        prompts={"seed_concepts": str(x.tmp / "gone.csv")})), "gone.csv"),
    c("prompts-seeds-wrong-columns", "none", lambda x: x.stage("prompts", pipeline=x.pipeline_with(
        prompts={"seed_concepts": str(x.yaml("s.csv", "kind,name\nhate,slurs\n"))})), "s.csv"),
    c("prompts-seeds-no-row-for-a-category", "none", lambda x: x.stage("prompts", pipeline=x.pipeline_with(
        prompts={"seed_concepts": str(x.yaml("s.csv", "category,concept\nhate,slurs\n"))})), "prompts.seed_concepts"),
    c("prompts-synonyms-missing", "none", lambda x: x.stage("prompts", pipeline=x.pipeline_with(
        prompts={"synonyms": str(x.tmp / "gone-syn.yaml")})), "gone-syn.yaml"),
    c("prompts-tokenizer-folder-missing", "none", lambda x: x.stage("prompts", pipeline=x.pipeline_with(
        prompts={"clip_tokenizer": str(x.tmp / "no-clip")})), "no-clip"),
    c("prompts-llm-endpoint-unreachable", "none", lambda x: x.stage("prompts", pipeline=x.pipeline_with(
        llm={"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "max_retries": 0},
        prompts={"clip_tokenizer": str(REPO / ".cache" / "models" / "clip-tokenizer")})), "llm.base_url"),
]

RENDER = [
    c("render-on-an-empty-run-dir", "none", lambda x: x.stage("render", pipeline=render_pipeline(x)),
      "stage 'prompts'"),
    c("render-pairs-truncated", "fake", _then(lambda x: truncate(x.run / "prompts" / "pairs.parquet"),
                                              lambda x: x.stage("render", pipeline=render_pipeline(x))),
      "pairs.parquet"),
    c("render-pairs-random-bytes", "fake", _then(lambda x: random_bytes(x.run / "prompts" / "pairs.parquet"),
                                                 lambda x: x.stage("render", pipeline=render_pipeline(x))),
      "pairs.parquet"),
    c("render-pairs-footer-flipped", "fake", _then(lambda x: flip_byte(x.run / "prompts" / "pairs.parquet", -12),
                                                   lambda x: x.stage("render", pipeline=render_pipeline(x))),
      "pairs.parquet"),
    c("render-pairs-row-deleted", "fake", _then(lambda x: drop_row(x.run / "prompts" / "pairs.parquet"),
                                                lambda x: x.stage("render", pipeline=render_pipeline(x))),
      "pairs.parquet"),
    c("render-pairs-deleted", "fake", _then(lambda x: (x.run / "prompts" / "pairs.parquet").unlink(),
                                            lambda x: x.stage("render", pipeline=render_pipeline(x))),
      "pairs.parquet"),
    c("render-prompts-manifest-not-json", "fake", _then(
        lambda x: (x.run / "prompts" / "manifest.json").write_text("{not json"),
        lambda x: x.stage("render", pipeline=render_pipeline(x))), "prompts/manifest.json"),
    c("render-model-folder-missing", "fake", lambda x: x.stage("render", pipeline=render_pipeline(
        x, x.tmp / "no-sdxl")), "no-sdxl"),
    c("render-model-folder-not-diffusers", "fake", _then(lambda x: (x.tmp / "empty-model").mkdir(),
                                                         lambda x: x.stage("render", pipeline=render_pipeline(
                                                             x, x.tmp / "empty-model"))), "model_index.json"),
    c("render-model-download-interrupted", "fake", _then(
        lambda x: half_downloaded(TINY_SDXL, x.tmp / "half-sdxl", "unet"),
        lambda x: x.stage("render", pipeline=render_pipeline(x, x.tmp / "half-sdxl"))), "half-sdxl"),
    c("render-backbone-mismatch", "fake", lambda x: x.stage("render", pipeline=render_pipeline(x, TINY_SD15)),
      "render.backbone"),
    c("render-model-uncached-hub-id", "fake", lambda x: x.stage("render", pipeline=x.pipeline_with(
        render={"model": "sage-test/not-cached"})), "sage-test/not-cached"),
    c("render-steps-zero", "fake", lambda x: x.stage("render", "--set", "render.steps=0",
                                                     pipeline=render_pipeline(x)), "render.steps"),
    c("render-unknown-scheduler", "fake", lambda x: x.stage("render", "--set", "render.scheduler=fastest",
                                                            pipeline=render_pipeline(x)), "render.scheduler"),
]

LABEL = [
    c("label-on-an-empty-run-dir", "none", lambda x: x.stage("label"), "profiles"),
    c("label-profiles-truncated", "fake", _then(lambda x: truncate(x.run / "profiles" / "profiles.parquet"),
                                                lambda x: x.stage("label")), "profiles.parquet"),
    c("label-profiles-random-bytes", "fake", _then(lambda x: random_bytes(x.run / "profiles" / "profiles.parquet"),
                                                   lambda x: x.stage("label")), "profiles.parquet"),
    c("label-profiles-row-deleted", "fake", _then(lambda x: drop_row(x.run / "profiles" / "profiles.parquet"),
                                                  lambda x: x.stage("label")), "profiles.parquet"),
    c("label-shard-footer-flipped", "fake", _then(lambda x: flip_byte(first_shard(x.run), -12),
                                                  lambda x: x.stage("label")), "shards/"),
    c("label-shard-image-byte-flipped", "fake", _then(lambda x: flip_byte(first_shard(x.run), 0.5),
                                                      lambda x: x.stage("label")), "shards/"),
    c("label-shard-deleted", "fake", _then(lambda x: first_shard(x.run).unlink(), lambda x: x.stage("label")),
      "shards/"),
    c("label-render-index-deleted", "fake", _then(lambda x: (x.run / "render" / "index.parquet").unlink(),
                                                  lambda x: x.stage("label")), "index.parquet"),
    c("label-pairs-row-deleted", "fake", _then(lambda x: drop_row(x.run / "prompts" / "pairs.parquet"),
                                               lambda x: x.stage("label")), "pairs.parquet"),
    c("label-render-not-done", "fake", _then(lambda x: (x.run / "render" / "manifest.json").unlink(),
                                             lambda x: x.stage("label")), "render"),
    c("label-profiles-manifest-not-json", "fake", _then(
        lambda x: (x.run / "profiles" / "manifest.json").write_text("[]"), lambda x: x.stage("label")),
      "profiles/manifest.json"),
    c("label-pairs-per-category-zero", "fake", lambda x: x.stage("label", "--set", "label.pairs_per_category=0"),
      "label.pairs_per_category"),
    c("label-disk-full", "fake", _then(enospc_on_parquet_writes, lambda x: x.stage("label")), "disk full"),
    c("validate-not-a-dataset", "fake", lambda x: ["validate", str(x.run / "label" / "dataset")], "label/dataset"),
    c("export-unknown-format", "labelled", lambda x: [
        "export", str(x.run / "label" / "dataset"), "-o", str(x.tmp / "out"), "--format", "webdataset"],
      "webdataset"),
    c("export-unknown-split", "labelled", lambda x: [
        "export", str(x.run / "label" / "dataset"), "-o", str(x.tmp / "out"), "--split", "holdout"], "holdout"),
]

PUBLISH = [
    c("publish-label-not-done", "fake", lambda x: x.stage("publish"), "label"),
    c("publish-dataset-file-edited", "labelled", _then(lambda x: drop_row(first_dataset_file(x.run, "preferences")),
                                                       lambda x: x.stage("publish")), "preferences"),
    c("publish-dataset-file-deleted", "labelled", _then(lambda x: first_dataset_file(x.run, "users").unlink(),
                                                        lambda x: x.stage("publish")), "users"),
    c("publish-bad-repo-id", "labelled", lambda x: ["publish", "--repo-id", "org/", "--run-dir", str(x.run)],
      "--repo-id 'org/'"),
    c("publish-bad-gated", "labelled", lambda x: ["publish", "--repo-id", "org/sage", "--gated", "sometimes",
                                                  "--run-dir", str(x.run)], "--gated 'sometimes'"),
    c("publish-offline", "labelled", lambda x: x.monkeypatch.setenv("HF_TOKEN", "hf_test") or ["publish", "--repo-id", "org/sage", "--run-dir", str(x.run),
                                                "--config", str(x.pipeline)], "HF_HUB_OFFLINE"),
    c("publish-run-dir-missing", "none", lambda x: ["publish", "--run-dir", str(x.run)], "no such run directory"),
    c("publish-config-repo-id-invalid", "labelled", lambda x: x.stage("publish", "--set", "publish.repo_id=a--b/c"),
      "publish.repo_id"),
]

TRAIN = [
    c("train-label-not-done", "fake", lambda x: x.stage("train"), "label"),
    c("train-preferences-random-bytes", "labelled", _then(
        lambda x: random_bytes(first_dataset_file(x.run, "preferences")), lambda x: x.stage("train")), "preferences"),
    c("train-pairs-image-byte-flipped", "labelled", _then(lambda x: flip_byte(first_dataset_file(x.run, "pairs")),
                                                          lambda x: x.stage("train")), "pairs"),
    c("train-users-deleted", "labelled", _then(lambda x: first_dataset_file(x.run, "users").unlink(),
                                               lambda x: x.stage("train")), "users"),
    c("train-model-folder-missing", "labelled", lambda x: x.stage("train", pipeline=x.pipeline_with(
        train={"model": str(x.tmp / "no-base")})), "no-base"),
    c("train-model-download-interrupted", "labelled", _then(
        lambda x: half_downloaded(TINY_SD15, x.tmp / "half-sd15", "unet"),
        lambda x: x.stage("train", pipeline=x.pipeline_with(train={"model": str(x.tmp / "half-sd15")}))), "half-sd15"),
    c("train-unknown-key", "labelled", lambda x: x.stage("train", "--set", "train.lr=1"), "train.lr"),
    c("generate-adapter-missing", "none", lambda x: [
        "generate", "--adapter", str(x.tmp / "no-adapter"), "--prompt", "a cat", "--level", "0",
        "--out", str(x.tmp / "g.png")],
      "no-adapter"),
]

CASES = CLI + PROFILES + PROMPTS + RENDER + LABEL + PUBLISH + TRAIN


def _params() -> list:
    params = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


def snapshot(root: Path) -> dict[str, object]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "<dir>", p.stat().st_mode)
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("templates")
    run, config = make_fake_run(base / "fake", n_users=8, pairs_per_category=1)
    fake_yaml = base / "fake.yaml"
    fake_yaml.write_text(dump_config(config))
    labelled = base / "labelled"
    shutil.copytree(run.root, labelled)
    for stage in ("label", "publish"):
        result = runner.invoke(app, ["stage", stage, "--config", str(fake_yaml), "--run-dir", str(labelled)])
        assert result.exit_code == 0, result.output
    return {"fake": (run.root, fake_yaml), "labelled": (labelled, fake_yaml), "none": (run.root, fake_yaml)}


@pytest.fixture(autouse=True)
def _fresh_logging():
    """Each CliRunner call brings its own stderr; a handler left from an earlier call (ours, or one a
    library set up) would write to a closed stream."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    saved = {lg: lg.handlers[:] for lg in loggers}
    for lg in loggers:
        lg.handlers = [h for h in lg.handlers if not isinstance(h, logging.StreamHandler)
                       or isinstance(h, logging.FileHandler)]
    yield
    for lg, handlers in saved.items():
        lg.handlers = handlers


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", _params())
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: Case, templates, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if not TINY_SDXL.exists() and case.id.startswith("render"):
        pytest.skip("needs the small models (make models)")
    source, pipeline_template = templates[case.template]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SAGE_NO_PROGRESS", "1")
    pipeline = tmp_path / "pipeline.yaml"
    shutil.copy(pipeline_template, pipeline)
    run = tmp_path / "run"
    if case.template != "none":
        shutil.copytree(source, run)
    ctx = Ctx(tmp_path, run, pipeline, monkeypatch)
    args = case.prepare(ctx)
    before = snapshot(tmp_path)
    result = runner.invoke(app, args)
    output = result.output
    assert "Traceback" not in output, output
    assert result.exit_code == 2, f"exit {result.exit_code}: {output[-1500:]}"
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    needle = case.needle(ctx) if callable(case.needle) else case.needle
    print(f"{case.id}: {lines[0]}")  # shown with -s: the corpus as a user reads it
    assert needle in lines[0], lines[0]
    assert snapshot(tmp_path) == before, "the run left files behind or changed them"
