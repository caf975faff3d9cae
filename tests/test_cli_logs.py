"""Logs: a file per stage (not an output), library noise off the console unless -v, no prompt text."""

from __future__ import annotations

import logging

from sage_builder.logs import ConsoleFilter, install_redaction, setup_console
from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.testing.fake_run import make_fake_run

PROMPT = "a harmful prompt that must not reach a CI log"


def test_a_stage_appends_to_its_log_file_which_is_no_output(tmp_path):
    run, config = make_fake_run(tmp_path / "run", n_users=20)
    manifest = run_stage(get_stage("label"), config, run)
    log = run.stage("label").file("label.log")
    assert "stage label: done" in log.read_text()
    assert "label.log" not in manifest.outputs
    run_stage(get_stage("label"), config, run)  # up to date: skipped, and said so in the same file
    text = log.read_text()
    assert "stage label: done" in text and "up to date" in text


def test_a_run_that_is_put_back_leaves_no_log(tmp_path):
    run, config = make_fake_run(tmp_path / "run", n_users=20)
    run.stage("render").file("index.parquet").write_bytes(b"not parquet")  # an edited input
    try:
        run_stage(get_stage("label"), config, run)
    except Exception:  # noqa: BLE001 - the one-line error is another test's subject
        pass
    assert not run.stage("label").path.exists()


def test_library_lines_quoting_a_prompt_are_redacted(caplog):
    install_redaction()
    with caplog.at_level(logging.WARNING, logger="diffusers.pipelines"):
        logging.getLogger("diffusers.pipelines").warning(
            "The following part of your input was truncated because CLIP can only handle sequences up to 77 "
            "tokens: %s", [PROMPT])
    assert PROMPT not in caplog.text and "not logged" in caplog.text


def test_console_shows_library_warnings_only_with_verbose(monkeypatch):
    record = logging.LogRecord("py.warnings", logging.WARNING, __file__, 1, "FutureWarning: torch_dtype", (), None)
    ours = logging.LogRecord("sage.render", logging.INFO, __file__, 1, "render: 78 images", (), None)
    assert not ConsoleFilter(verbose=False).filter(record) and ConsoleFilter(verbose=False).filter(ours)
    assert ConsoleFilter(verbose=True).filter(record)
    for key in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
                "SAGE_QUIET_LIBRARIES"):
        monkeypatch.delenv(key, raising=False)
    setup_console(verbose=True)
    import os

    assert "DIFFUSERS_VERBOSITY" not in os.environ and os.environ["SAGE_QUIET_LIBRARIES"] == "0"
    setup_console(verbose=False)
    assert os.environ["DIFFUSERS_VERBOSITY"] == "error" and os.environ["SAGE_QUIET_LIBRARIES"] == "1"
    root = logging.getLogger()
    assert sum(getattr(h, "_sage_console", False) for h in root.handlers) == 1
    for handler in [h for h in root.handlers if getattr(h, "_sage_console", False)]:
        root.removeHandler(handler)


def test_a_library_handler_left_on_a_closed_stream_is_pointed_at_the_current_stderr():
    """datasets binds its handler to the stderr of its first use; a later in-process CLI call must not fail
    to log ("--- Logging error ---", a traceback) because that stream was closed since."""
    import io

    stale = io.StringIO()
    handler = logging.StreamHandler(stale)
    library = logging.getLogger("datasets")
    library.addHandler(handler)
    try:
        stale.close()
        setup_console(False)
        assert handler.stream is not stale and not handler.stream.closed
    finally:
        library.removeHandler(handler)
