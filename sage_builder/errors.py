"""User-facing errors: one line that names the record, key or file and says what to do next."""


class SageError(Exception):
    """An error the CLI prints as one line (no traceback) before exiting non-zero."""

    exit_code = 2


class ConfigError(SageError):
    """A pipeline configuration that cannot be used as written."""


class StageInputError(SageError):
    """A stage's inputs (upstream outputs, files, models) are missing or inconsistent."""


class RunDirBusy(SageError):
    """Another process holds the run directory's lock (one run per run directory)."""


class DiskFullError(SageError):
    """A write failed because the file system is full (ENOSPC)."""
