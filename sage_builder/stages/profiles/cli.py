"""``sage users ...``: demographics without an LLM (a contract scripts and CI rely on)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sage_builder.cli_util import handle_errors
from sage_builder.config import project_file

users_app = typer.Typer(no_args_is_help=True, help="Simulated users' demographics (stage 1, no LLM).")


def write_users_csv(path: Path, sampler: str, seed: int, n: int, demographics: Path) -> int:
    """Sample ``n`` users and write them with the published column names, one per row in id order."""
    import pandas as pd

    from sage_builder.stages.profiles.demographics import PUBLISHED_COLUMNS, load_demographics, sample_users
    from sage_builder.store import atomic_path

    users = sample_users(load_demographics(demographics), sampler, n, seed)
    frame = pd.DataFrame([u.as_dict() for u in users]).rename(columns=PUBLISHED_COLUMNS)
    frame = frame[list(PUBLISHED_COLUMNS.values())]
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return len(frame)


@users_app.command("sample")
@handle_errors
def sample(
    sampler: Annotated[str, typer.Option(help="psalign (the authors' procedure and NumPy legacy stream; seed "
                                              "2025 gives the published users) or config (np.random.default_rng)")
                       ] = "psalign",
    seed: Annotated[int, typer.Option(help="random seed")] = 2025,
    n: Annotated[int, typer.Option("-n", "--n-users", help="number of users")] = 1000,
    out: Annotated[Path, typer.Option("-o", "--out", help="CSV file to write")] = Path("users.csv"),
    demographics: Annotated[Path, typer.Option(help="distributions and realism rules")] = project_file(
        "profiles", "demographics.yaml"),
) -> None:
    """Write sampled demographics as CSV: Age, Age_Group, Gender, Religion, Physical_Condition,
    Mental_Condition; user 0000001 first. The permissive reference user is not included."""
    from sage_builder.errors import ConfigError

    if sampler not in ("psalign", "config"):
        raise ConfigError(f"--sampler: unknown sampler '{sampler}'; choose psalign or config")
    if n <= 0:
        raise ConfigError(f"-n: must be > 0 (got {n})")
    if out.is_dir():
        raise ConfigError(f"-o {out}: is a folder; name the CSV file to write, e.g. -o {out / 'users.csv'}")
    rows = write_users_csv(out, sampler, seed, n, demographics)
    typer.echo(f"{rows} users -> {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(users_app, name="users")
