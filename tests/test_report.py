"""``sage report RUN``: the page's sections, warnings, blurring and self-containment, the charts, the
labelled contact sheet; and the page rendered in a real headless Chromium (screenshot, DOM, console)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.public import local_paths_in
from sage_builder.report.drawing import wrap
from sage_builder.report.page import build_report
from sage_builder.report.plots import ban_rates_plot, rejects_plot, training_curves_plot
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.store import Manifest, write_parquet
from sage_builder.testing.fake_run import make_fake_run

SECTIONS = ["stages", "warnings", "stage-profiles", "stage-prompts", "stage-render", "stage-label", "stage-publish",
            "stage-train", "stage-eval", "lineage"]


def _png(colours: int = 1, size: int = 96) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8) if colours > 1 else \
        np.full((size, size, 3), 200, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _fake_train(run) -> None:
    """A finished train stage as files (metrics, eval at chance, a grid of 'generated' images)."""
    stage = run.stage("train")
    stage.path.mkdir(parents=True, exist_ok=True)
    write_parquet(pa.Table.from_pylist([{"step": i, "loss": 0.69 - 0.01 * i, "implicit_accuracy": 0.5 + 0.05 * i,
                                         "reward_margin": 0.0, "lr": 1e-3, "images_per_s": 1.0}
                                        for i in range(1, 6)]), stage.file("metrics.parquet"))
    stage.file("eval.json").write_text(json.dumps({
        "split": "validation", "records": 8, "implicit_accuracy": 0.5, "chance_level": 0.5, "ties": 8,
        "by_reason": {"allowed": {"records": 4, "implicit_accuracy": 0.5, "ties": 4, "reward_margin": 0.0},
                      "banned": {"records": 4, "implicit_accuracy": 0.5, "ties": 4, "reward_margin": 0.0}},
        "by_category": {}, "z": [0.0] * 8}))
    stage.file("grid.png").write_bytes(_png(colours=2))
    stage.write_manifest(Manifest(stage="train", fingerprint="f", config_hash="c", seconds=12.5,
                                  outputs=stage.describe_outputs(["metrics.parquet", "eval.json", "grid.png"]),
                                  inputs={"label": run.stage("label").read_manifest().content_hash()}))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run, config = make_fake_run(tmp_path_factory.mktemp("report") / "run", n_users=12, pairs_per_category=1)
    (run.root / "config.yaml").write_text("")  # an unreadable config is a warning, not a crash
    run_stage(get_stage("label"), config, run)
    run_stage(get_stage("publish"), config, run)
    profiles = run.stage("profiles")
    profiles.file("report.json").write_text(json.dumps({
        "warnings": ["labels look degenerate: 9 of 12 users ban the same categories"],
        "bans": {"users": 12, "ban_rate": {"Hate": 0.5, "Sexuality": 0.9}, "mean_banned": 1.4,
                 "published_ban_rate": {"Hate": 0.15, "Sexuality": 0.81}, "published_mean_banned": 3.54,
                 "ban_nothing": 1, "published_ban_nothing": 40}}))
    write_parquet(pa.Table.from_pylist([{"reason": r} for r in ["clip_tokens"] * 30 + ["json_invalid"] * 12]),
                  run.stage("prompts").file("rejects.parquet"))
    _fake_train(run)
    eval_stage = run.stage("eval")
    eval_stage.path.mkdir(parents=True, exist_ok=True)
    eval_stage.file("summary.json").write_text(json.dumps({"ip": {"base": 0.58, "level_5": 0.1},
                                                           "warnings": ["judge: 3 errors dropped"]}))
    eval_stage.file("ip_by_level.png").write_bytes(_png())
    eval_stage.write_manifest(Manifest(stage="eval", fingerprint="f", config_hash="c",
                                       outputs=eval_stage.describe_outputs(["summary.json", "ip_by_level.png"])))
    return run


@pytest.fixture(scope="module")
def page(small_run) -> tuple[Path, str]:
    path = build_report(small_run.root)
    return path, path.read_text()


def test_the_page_has_every_section_and_the_warnings(page, small_run):
    path, text = page
    assert path == small_run.root / "report.html"
    for section in SECTIONS:
        assert f'id="{section}"' in text, section
    for warning in ("labels look degenerate", "33% of attempts were rejected", "at chance (0.5)",
                    "judge: 3 errors dropped", "config.yaml cannot be read"):
        assert warning in text, warning
    assert ">dry run<" in text  # publish made no push
    assert "held-out implicit accuracy" in text.lower() and "Lineage and timings" in text


def test_the_page_is_self_contained_and_names_no_local_path(page, small_run):
    _, text = page
    assert "<script" not in text.lower()
    sources = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources), sources
    assert local_paths_in(text) == [] and str(small_run.root) not in text


def test_generated_images_are_blurred_unless_unblur(small_run, tmp_path):
    grid = small_run.stage("train").file("grid.png").read_bytes()
    build_report(small_run.root, out=tmp_path / "blurred.html")
    assert (small_run.root / "report" / "grid.png").read_bytes() != grid
    assert "blurred; sage report --unblur shows it" in (tmp_path / "blurred.html").read_text()
    build_report(small_run.root, unblur=True, out=tmp_path / "unblurred.html")
    assert (small_run.root / "report" / "grid.png").read_bytes() == grid
    build_report(small_run.root)  # the module's page again, blurred


def test_cli_writes_the_page_and_names_a_bad_run_dir(small_run, tmp_path):
    result = CliRunner().invoke(app, ["report", str(small_run.root), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0 and "wrote" in result.output, result.output
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such run directory" in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["report", "--run-dir", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no stage has finished" in result.output


def test_charts_are_pngs_of_a_readable_size():
    for data in (ban_rates_plot({"Hate": 0.2, "Sexuality": 0.8}, {"Hate": 0.15}),
                 rejects_plot({"prompts": {"clip_tokens": 3}, "profiles": {"json": 1}}),
                 training_curves_plot([{"step": 1, "loss": 0.69, "implicit_accuracy": 0.5}], 0.5)):
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.width >= 700 and image.height >= 190


def test_cut_text_ends_with_an_ellipsis():
    lines = wrap("a very long prompt " * 20, 150, 13, max_lines=2)
    assert len(lines) == 2 and lines[-1].endswith("…")
    assert wrap("short", 150, 13, max_lines=2) == ["short"]


def test_contact_sheet_rows_are_labelled(small_run):
    from sage_builder.stages.render.contact_sheet import _pair_labels, contact_sheet

    sheet = contact_sheet(small_run.stage("render").path, 3, tile=128, blur=4)
    assert sheet.width == 2 * 128 + 30 and sheet.height > 3 * 128
    index = small_run.stage("render").file("index.parquet")
    import pyarrow.parquet as pq

    first = pq.read_table(index).column("pair_id")[0].as_py()
    label = _pair_labels(small_run.stage("render").path, [first])[first]
    assert label["category"] and label["concept"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium; "
                                                "`make test` installs it when run as root)")
def test_the_page_renders_in_headless_chromium_without_console_errors(page, tmp_path):
    path, _ = page
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    done = subprocess.run(browser + ["--window-size=1280,2000", f"--screenshot={shot}", path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists(), done.stderr[-2000:]
    dom = subprocess.run(browser + ["--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    console = [line for line in done.stderr.splitlines() + dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    for section in SECTIONS:
        assert f'id="{section}"' in dom.stdout, section
    assert dom.stdout.count("<img") >= 6 and "Data-quality warnings" in dom.stdout
    image = Image.open(shot)
    assert image.size == (1280, 2000)
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # a rendered page, not a blank one
    header = image.convert("RGB").getpixel((640, 20))
    assert header == (26, 54, 93)  # the page's own header colour (#1a365d): CSS applied
    shutil.copy(shot, path.parent / "report" / "chromium-screenshot.png")


def test_public_text_names_models_and_run_files_without_paths(tmp_path, models_dir):
    from sage_builder.public import public_text

    run = tmp_path / "run"
    (run / "label").mkdir(parents=True)
    text = (f"model={models_dir / 'tiny-sdxl'}, revision=None; dataset {run / 'label' / 'dataset'}; "
            f"render/shards and 50/50 stay; data:image/png;base64,AB+/tmpCD==")
    public = public_text(text, run)
    assert public.startswith("model=tiny-sdxl (local-model:") and "dataset label/dataset;" in public
    assert "render/shards and 50/50 stay" in public and "AB+/tmpCD==" in public
    assert local_paths_in(public) == []
