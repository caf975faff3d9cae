"""Stage 4 commands: ``sage validate DIR``, ``sage export --format psalign|pickapic DIR --out OUT`` and
``sage import --format psalign SRC --embeddings DIR --users FILE --run-dir RUN``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sage_builder.cli_util import handle_errors


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


@handle_errors
def export(
    directory: Annotated[Path, typer.Argument(help="a label dataset directory (RUN/label/dataset)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="psalign (the PSA authors' layout) or pickapic "
                                                            "(diffusers' Diffusion-DPO example)")] = "psalign",
    split: Annotated[Optional[list[str]], typer.Option(help="splits to export (default: all four)")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="write into an existing dataset or a non-empty --out folder")] = False,
) -> None:
    """Write the dataset in another trainer's layout (never into a non-empty folder without --overwrite)."""
    from sage_builder.stages.label.export import export_dataset

    counts = export_dataset(directory, out, fmt, split, overwrite=overwrite)
    typer.echo(f"{fmt} -> {out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


@handle_errors
def import_(
    source: Annotated[Path, typer.Argument(help="a psalign folder: <split>/metadata.jsonl + JPEGs")],
    embeddings: Annotated[Path, typer.Option(help="folder of {User_ID}.npy user embeddings")],
    users: Annotated[Path, typer.Option(help="users file in the published users.csv format")],
    run_dir: Annotated[Path, typer.Option("--run-dir", "-r", help="run directory to import into "
                                                                "(RUN/label/dataset + manifest)")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="layout of SOURCE (psalign)")] = "psalign",
    config_path: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="pipeline YAML: categories, test index, embedding model, shard sizes")] = None,
    embedding_model: Annotated[Optional[str], typer.Option(
        help="the LLM that made the embeddings (its hidden size must match them)")] = None,
    test_index: Annotated[Optional[int], typer.Option(help="prompt index of the test splits "
                                                           "(default: read from the test records)")] = None,
    check_copies: Annotated[bool, typer.Option(
        "--check-copies/--no-check-copies", help="hash every user's copy of a pair image")] = True,
    strict: Annotated[bool, typer.Option(help="any problem fails the import (nothing written)")] = False,
    limit: Annotated[int, typer.Option(help="problems shown per check (all are written)")] = 20,
) -> None:
    """Read a dataset in another layout (the PSA authors') into this project's label dataset."""
    from sage_builder.config import load_config
    from sage_builder.errors import ConfigError
    from sage_builder.stages.label.import_psalign import import_psalign

    if fmt != "psalign":
        raise ConfigError(f"--format {fmt}: sage import reads psalign only")
    config = load_config(config_path) if config_path else None
    result = import_psalign(source, embeddings, users, run_dir, config, embedding_model, test_index,
                            check_copies, strict)
    if not result.report.ok:
        for line in result.report.lines(limit)[:-1]:
            typer.echo(line)
    summary = ", ".join(f"{k}={v}" for k, v in result.counts.items())
    problems = (f"; {result.report.lines(0)[-1]} (all in {result.problems_file})" if result.problems_file
                else "; no problems")
    typer.echo(f"psalign -> {result.dataset}: {summary}{problems}")


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
    app.command("export")(export)
    app.command("import")(import_)
