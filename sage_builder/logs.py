"""Where log lines go: the console (sage's own lines; library chatter only with ``-v``) and one log file
per stage, ``RUN/<stage>/<stage>.log``. Prompt text never reaches either: Sage's prompts are harmful
by design and CI logs are widely readable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Read by transformers, diffusers and huggingface_hub when they are imported: warnings, advisories
# and their loading bars stay off the console unless -v (a value the user exported wins).
QUIET_LIBRARIES = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                   "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
QUIET_FLAG = "SAGE_QUIET_LIBRARIES"
# Library messages that quote the prompt they are about, and what is logged instead.
PROMPT_ECHOES = {"truncated because CLIP": "a prompt was cut at the text encoder's token limit (its text is "
                                           "not logged); stage 2 checks the 77-token limit with the real "
                                           "CLIP tokenizer"}


def _redacting_factory(previous: logging.LogRecordFactory) -> logging.LogRecordFactory:
    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if isinstance(record.msg, str):
            for needle, replacement in PROMPT_ECHOES.items():
                if needle in record.msg:
                    record.msg, record.args = replacement, ()
        return record

    factory._sage_redacts = True  # type: ignore[attr-defined]
    return factory


def install_redaction() -> None:
    """Every log record, whichever library's logger and handler it goes to, loses quoted prompt text."""
    current = logging.getLogRecordFactory()
    if not getattr(current, "_sage_redacts", False):
        logging.setLogRecordFactory(_redacting_factory(current))


class ConsoleFilter(logging.Filter):
    """Without -v: sage's lines from INFO, other loggers (libraries, Python warnings) from ERROR."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.name == "sage" or record.name.startswith("sage.") \
            or record.levelno >= logging.ERROR


def _reopen_library_handlers() -> None:
    """datasets, transformers and diffusers give their loggers a handler on the stderr of the moment they were
    first used; one whose stream was closed since (a finished in-process CLI call) is pointed at today's."""
    for name in ("datasets", "transformers", "diffusers", "huggingface_hub"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the closed stream first


def setup_console(verbose: bool = False) -> None:
    """The console handler of the ``sage`` command (idempotent: a second call replaces the first)."""
    os.environ[QUIET_FLAG] = "0" if verbose else "1"  # worker processes inherit it
    if not verbose:
        for key, value in QUIET_LIBRARIES.items():
            os.environ.setdefault(key, value)
        _quiet_loaded_libraries()
    install_redaction()
    _reopen_library_handlers()
    logging.captureWarnings(True)  # warnings.warn -> the py.warnings logger: the stage log, not the console
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_sage_console", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(ConsoleFilter(verbose))
    handler._sage_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "huggingface_hub", "datasets", "openai"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def quiet_libraries() -> None:
    """Called where diffusers/transformers are imported to load a model: their loading bars, which no
    environment variable turns off, go quiet too unless -v (set-up of this process or its parent)."""
    if os.environ.get(QUIET_FLAG) == "1":
        _quiet_loaded_libraries()


def _quiet_loaded_libraries() -> None:
    """Libraries imported before the console was set up (tests, notebooks) read no environment again."""
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


def stage_log_path(stage_dir: Path, stage: str) -> Path:
    return Path(stage_dir) / f"{stage}.log"


@contextlib.contextmanager
def stage_log(stage_dir: Path, stage: str) -> Iterator[Path]:
    """Append what is logged while the block runs (sage's lines from INFO, library warnings) to the
    stage's log file. Not an output: it is in no manifest, and a rerun appends to it."""
    install_redaction()
    path = stage_log_path(stage_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    sage = logging.getLogger("sage")
    level = sage.level
    if sage.getEffectiveLevel() > logging.INFO:
        sage.setLevel(logging.INFO)  # called from Python without the CLI's set-up: the file still gets INFO
    logging.getLogger().addHandler(handler)
    try:
        yield path
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        sage.setLevel(level)
