"""Helpers every CLI command shares: one-line errors, logging setup (sage_builder/logs.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from sage_builder.errors import SageError

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    """Print a SageError as one line on stderr and exit with its code: no traceback for bad input."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SageError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished items are saved; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: bool = False) -> None:
    """Console logging for a command: sage's lines; library warnings and loading bars only with -v."""
    from sage_builder.logs import setup_console

    setup_console(verbose)
