"""``sage generate``: render with a trained user adapter (one user, a new profile, or the grid)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sage_builder.cli_util import handle_errors, setup_logging
from sage_builder.errors import SageError


@handle_errors
def generate(
    adapter: Annotated[Path, typer.Option(help="adapter folder (RUN/train/adapter)")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="prompt (repeatable)")],
    user: Annotated[Optional[list[str]], typer.Option(help="user id from the dataset's users config")] = None,
    level: Annotated[Optional[list[int]], typer.Option(help="strictness level 0-5 (reference user)")] = None,
    profile: Annotated[Optional[Path], typer.Option(
        help="profile JSON (age, age_group, gender, religion, physical_condition, mental_condition, "
             "banned, allowed), embedded like stage 1")] = None,
    grid: Annotated[bool, typer.Option(help="the base model (adapter off) and every level 0-5 x every prompt, "
                                           "one PNG")] = False,
    dataset: Annotated[Optional[str], typer.Option(
        help="stage-4 dataset (folder or hub id) for --user/--level (default: the one it was trained on)")] = None,
    embedding_model: Annotated[Optional[str], typer.Option(help="--profile: stage 1's embedding LLM")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="--profile: the pipeline stage 1 ran with, for its statement template and "
                               "embedding LLM (default: the adapter's run's config.yaml)")] = None,
    model: Annotated[Optional[str], typer.Option(help="base pipeline (default: recorded in the adapter)")] = None,
    scale: Annotated[float, typer.Option(help="adapter scale (0 = base model)")] = 1.0,
    steps: Annotated[int, typer.Option(help="sampling steps")] = 30,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance")] = 7.5,
    resolution: Annotated[Optional[int], typer.Option(help="pixels (default: the training resolution)")] = None,
    seed: Annotated[int, typer.Option(help="the same seed for every user and prompt")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU), float32, float16, bfloat16")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    out: Annotated[Path, typer.Option(help="PNG file (a grid if several users or prompts)")] = Path("generated.png"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Render prompts with the user adapter for a user, a level, a new profile, or all levels (--grid).

    Every argument, the adapter folder, the dataset and the base model are checked before any model
    is loaded; a copied adapter folder works from any directory given --model and --dataset."""
    from sage_builder.runtime import resolve_device
    from sage_builder.adapter import UserAdapter
    from sage_builder.stages.train.card import resolve_base_model
    from sage_builder.stages.train.generate import load_pipeline_for, render, render_grid, user_from_profile

    setup_logging(verbose)
    check_generate_arguments(user, level, profile, grid, prompt, steps, guidance, resolution, threads, dtype, out)
    device = resolve_device(device, "--device")
    user_adapter = UserAdapter.load(adapter)
    users, setup = _users(adapter, user_adapter, user, level, grid, dataset, profile, config, embedding_model, device)
    base_model = resolve_base_model(adapter, user_adapter.config, model)
    if setup is not None:  # the embedding LLM loads only after every check passed
        users.append(user_from_profile(profile, setup))
    pipeline = load_pipeline_for(user_adapter, base_model, device, dtype, threads)
    size = resolution or int(user_adapter.config.training.get("resolution") or 0) or \
        int(pipeline.unet.config.sample_size) * pipeline.vae_scale_factor
    if len(users) == 1 and len(prompt) == 1 and not grid:
        image = render(pipeline, user_adapter, users[0], list(prompt), scale, steps, guidance, seed, size)[0]
    else:
        image = render_grid(pipeline, user_adapter, users, list(prompt), scale, steps, guidance, seed, size,
                            base=grid, desc="generate")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    typer.echo(f"wrote {out} ({len(users)} user(s){' + the base model' if grid else ''} x {len(prompt)} "
               f"prompt(s), scale {scale})")


def _users(adapter: Path, user_adapter: Any, user: Optional[list[str]], level: Optional[list[int]], grid: bool,
           dataset: Optional[str], profile: Optional[Path], config: Optional[Path], embedding_model: Optional[str],
           device: str) -> tuple[list[Any], Any]:
    """(dataset users and levels, the embedding setup for a new profile or None), checked, nothing loaded."""
    from sage_builder.stages.train.card import resolve_dataset
    from sage_builder.stages.train.generate import profile_embedding_setup, read_profile, users_from_dataset

    users = []
    if user or level or grid:
        source = resolve_dataset(adapter, user_adapter.config, dataset)
        users += users_from_dataset(source, user_ids=list(user or []), levels=list(level or []), all_levels=grid)
    setup = None
    if profile:
        read_profile(profile)
        setup = profile_embedding_setup(adapter, config, embedding_model, device)
    return users, setup


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def check_generate_arguments(user: Optional[list[str]], level: Optional[list[int]], profile: Optional[Path],
                             grid: bool, prompt: list[str], steps: int, guidance: float, resolution: Optional[int],
                             threads: Optional[int], dtype: str, out: Path) -> None:
    """Everything about the command line that can be wrong, before anything is loaded."""
    if not (user or level or profile or grid):
        raise SageError("choose who to render for: --user ID, --level N, --profile JSON or --grid")
    if not prompt or any(not p.strip() for p in prompt):
        raise SageError("--prompt: give at least one non-empty prompt")
    bad_level = next((n for n in level or [] if not 0 <= n <= 5), None)
    if bad_level is not None:
        raise SageError(f"--level {bad_level}: levels are 0-5")
    if profile is not None and not Path(profile).is_file():
        raise SageError(f"--profile {profile}: no such file")
    if steps < 1:
        raise SageError(f"--steps {steps}: must be at least 1")
    if guidance < 0:
        raise SageError(f"--guidance {guidance}: must be 0 or more")
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise SageError(f"--resolution {resolution}: must be a positive multiple of 8")
    if threads is not None and threads < 1:
        raise SageError(f"--threads {threads}: must be at least 1")
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise SageError(f"--dtype {dtype}: choose auto, float32, float16 or bfloat16")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise SageError(f"--out {out}: name an image file (.png, .jpg or .webp)")
    if out.is_dir():
        raise SageError(f"--out {out}: is a folder; name an image file")
