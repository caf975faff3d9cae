"""Stage 4 commands: ``sage validate DIR`` and ``sage export --format psalign|pickapic DIR --out OUT``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sage_builder.cli_util import handle_errors


def register(app: typer.Typer) -> None:
    @app.command("validate")
    @handle_errors
    def validate(
        directory: Annotated[Path, typer.Argument(help="a label dataset directory (RUN/label/dataset)")],
        images: Annotated[bool, typer.Option("--images/--no-images", help="decode and hash every image")] = True,
        limit: Annotated[int, typer.Option(help="problems shown per check (all are counted)")] = 50,
    ) -> None:
        """Check a dataset directory; list every problem and exit 1 if there is any."""
        from sage_builder.stages.label.validate import validate_dataset

        report = validate_dataset(directory, check_images=images)
        for line in report.lines(limit):
            typer.echo(line)
        if not report.ok:
            raise typer.Exit(1)

    @app.command("export")
    @handle_errors
    def export(
        directory: Annotated[Path, typer.Argument(help="a label dataset directory (RUN/label/dataset)")],
        out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
        fmt: Annotated[str, typer.Option("--format", "-f", help="psalign (the PSA authors' layout) or pickapic "
                                                                "(diffusers' Diffusion-DPO example)")] = "psalign",
        split: Annotated[Optional[list[str]], typer.Option(help="splits to export (default: all four)")] = None,
    ) -> None:
        """Write the dataset in another trainer's layout."""
        from sage_builder.stages.label.export import export_dataset

        counts = export_dataset(directory, out, fmt, split)
        typer.echo(f"{fmt} -> {out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
