"""``sage generate``: render with a trained user adapter (one user, a new profile, or the grid)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sage_builder.cli_util import handle_errors, setup_logging
from sage_builder.errors import SageError


def register(app: typer.Typer) -> None:
    @app.command("generate")
    @handle_errors
    def generate(
        adapter: Annotated[Path, typer.Option(help="adapter folder (RUN/train/adapter)")],
        prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="prompt (repeatable)")],
        user: Annotated[Optional[list[str]], typer.Option(help="user id from the dataset's users config")] = None,
        level: Annotated[Optional[list[int]], typer.Option(help="strictness level 0-5 (reference user)")] = None,
        profile: Annotated[Optional[Path], typer.Option(
            help="profile JSON (age, age_group, gender, religion, physical_condition, mental_condition, "
                 "banned, allowed), embedded like stage 1")] = None,
        grid: Annotated[bool, typer.Option(help="every level 0-5 x every prompt, one PNG")] = False,
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
        dtype: Annotated[str, typer.Option(help="auto (fp16 on GPU), float32, float16, bfloat16")] = "auto",
        out: Annotated[Path, typer.Option(help="PNG file (a grid if several users or prompts)")] = Path("generated.png"),
        verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    ) -> None:
        """Render prompts with the user adapter for a user, a level, a new profile, or all levels (--grid)."""
        from sage_builder.stages.train.generate import (
            compose_grid,
            load_for_inference,
            profile_embedding_setup,
            render,
            user_from_profile,
            users_from_dataset,
        )

        setup_logging(verbose)
        if not (user or level or profile or grid):
            raise SageError("choose who to render for: --user ID, --level N, --profile JSON or --grid")
        pipeline, user_adapter = load_for_inference(adapter, model, device, dtype)
        source = dataset or user_adapter.config.dataset
        users = []
        if user or level or grid:
            if not source:
                raise SageError("--user/--level/--grid need --dataset (the adapter config records none)")
            users += users_from_dataset(source, user_ids=list(user or []), levels=list(level or []), all_levels=grid)
        if profile:
            users.append(user_from_profile(profile, profile_embedding_setup(adapter, config, embedding_model, device)))
        size = resolution or int(user_adapter.config.training.get("resolution") or 0) or \
            int(pipeline.unet.config.sample_size) * pipeline.vae_scale_factor
        rows = [(u.label, render(pipeline, user_adapter, u, prompt, scale, steps, guidance, seed, size)) for u in users]
        image = rows[0][1][0] if len(rows) == 1 and len(prompt) == 1 else compose_grid(rows, prompt, size)
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        typer.echo(f"wrote {out} ({len(rows)} user(s) x {len(prompt)} prompt(s), scale {scale})")
