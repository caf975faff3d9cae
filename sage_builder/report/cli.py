"""``sage report RUN``: write ``RUN/report.html``, one static page of the run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sage_builder.cli_util import handle_errors, setup_logging


@handle_errors
def report(
    run: Annotated[Optional[Path], typer.Argument(help="run directory (or --run-dir)")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-r", help="run directory")] = None,
    unblur: Annotated[bool, typer.Option(
        "--unblur", help="show images of generated content unblurred (they are harmful by design)")] = False,
    out: Annotated[Optional[Path], typer.Option(help="page to write (default: RUN/report.html)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Write RUN/report.html: each stage's summary, charts, data-quality warnings, lineage and timings.

    The page is static and self-contained (inline CSS, images as data URIs): open it in any browser,
    or send it; it names no local path. Generated images are blurred unless --unblur."""
    from sage_builder.errors import SageError
    from sage_builder.report.page import build_report

    setup_logging(verbose)
    if run is not None and run_dir is not None and run != run_dir:
        raise SageError(f"two run directories given ({run} and --run-dir {run_dir}); give one")
    path = build_report(run or run_dir or Path("runs/demo"), unblur=unblur, out=out)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
