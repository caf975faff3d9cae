"""Inference with a trained user adapter: one user's images, or the levels x prompts grid.

The adapter is installed on the base pipeline's UNet; the user embedding comes from the stage-4
dataset's ``users`` config (by user id or strictness level 0-5), or is computed for a new profile
with the shared ``sage_builder.user_embedding`` code stage 1 uses (the run's statement template and LLM,
mean pooling).
Classifier-free guidance gives the unconditional branch the same user tokens (see adapter.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sage_builder.errors import SageError
from sage_builder.user_embedding import EmbeddingSetup, embed_profile


@dataclass
class UserInput:
    label: str
    embedding: np.ndarray | None  # None: the base model (adapter off)
    banned: list[str] | None = None  # what the user bans, when known (shown in the grid)


BASE_USER = UserInput("base (adapter off)", None)


def users_from_dataset(source: str, user_ids: list[str] | None = None, levels: list[int] | None = None,
                       all_levels: bool = False) -> list[UserInput]:
    """Embeddings of users by id or by level (the reference users of stage 1; all_levels: every one)."""
    from sage_builder.stages.train.data import _load, _single_split

    users = _single_split(_load(source, "users"), "users", source)
    columns = [c for c in ("user_id", "embedding", "level", "banned") if c in users.column_names]
    by_id, by_level = {}, {}
    for row in users.select_columns(columns):
        by_id[row["user_id"]] = row
        if row.get("level") is not None:
            by_level[int(row["level"])] = row
    if all_levels:
        if not by_level:
            raise SageError(f"{source}: the 'users' config has no reference users (column 'level')")
        levels = sorted(set(levels or []) | set(by_level))
    out = []
    for uid in user_ids or []:
        row = by_id.get(uid)
        if row is None or row.get("embedding") is None:
            raise SageError(f"user {uid} has no embedding in the 'users' config of {source}")
        out.append(UserInput(f"user {uid}", np.asarray(row["embedding"], dtype=np.float32), row.get("banned")))
    for level in levels or []:
        row = by_level.get(level)
        if row is None:
            raise SageError(f"no reference user of level {level} in {source} (levels there: {sorted(by_level)})")
        out.append(UserInput(f"level {level} ({row['user_id']})", np.asarray(row["embedding"], dtype=np.float32),
                             row.get("banned")))
    return out


def profile_embedding_setup(adapter_dir: Path, config_path: Path | None, embedding_model: str | None,
                            device: str = "auto") -> EmbeddingSetup:
    """How ``--profile`` is embedded: stage 1's settings (statement template, embedding model, dtype) from
    ``config_path``, else from the adapter's run (``RUN/config.yaml`` beside ``RUN/train/adapter``);
    ``--embedding-model`` overrides the model; without either config, the shipped template."""
    from sage_builder.config import load_config, project_file

    saved = Path(adapter_dir).resolve().parent.parent / "config.yaml"
    config_path = config_path or (saved if saved.exists() else None)
    if config_path is not None:
        setup = EmbeddingSetup.from_config(load_config(config_path))
        if embedding_model and embedding_model != setup.model:
            setup = replace(setup, model=embedding_model, revision=None, gguf_file=None)
        return replace(setup, device=device)
    if not embedding_model:
        raise SageError("--profile needs --config (the pipeline stage 1 ran with; default: the adapter's run's "
                        "config.yaml, not found) or --embedding-model (e.g. .cache/models/smollm2-135m-instruct)")
    return EmbeddingSetup(embedding_model, None, None, device, "auto", project_file("prompts", "user_statement.txt"))


PROFILE_FIELDS = ["age", "age_group", "gender", "religion", "physical_condition", "mental_condition"]


def read_profile(profile_path: Path) -> dict[str, Any]:
    """A profile JSON, checked (no model is loaded): the six attributes, banned, and optionally allowed."""
    try:
        profile = json.loads(Path(profile_path).read_text())
    except (OSError, ValueError) as exc:
        raise SageError(f"{profile_path}: cannot read the profile JSON ({exc})") from None
    if not isinstance(profile, dict):
        raise SageError(f"{profile_path}: the profile JSON is not an object")
    missing = [f for f in PROFILE_FIELDS + ["banned"] if f not in profile]
    if missing:
        raise SageError(f"{profile_path}: the profile lacks {missing[0]} (needs {', '.join(PROFILE_FIELDS)}, "
                        f"banned, allowed)")
    return profile


def user_from_profile(profile_path: Path, setup: EmbeddingSetup) -> UserInput:
    """Embed a profile JSON (age, age_group, gender, religion, physical/mental condition, banned, allowed)
    exactly as stage 1 does: the shared statement -> embedding path with the run's template and LLM."""
    profile = read_profile(profile_path)
    vector = embed_profile(setup, {f: profile[f] for f in PROFILE_FIELDS}, list(profile["banned"]),
                           list(profile.get("allowed", [])))
    return UserInput(f"profile {Path(profile_path).stem}", vector, list(profile["banned"]))


def render(pipeline: Any, adapter: Any, user: UserInput, prompts: list[str], scale: float, steps: int,
           guidance: float, seed: int, resolution: int, on_image: Any = None) -> list[Any]:
    """One image per prompt for one user (same seed for every prompt and user); the base user renders
    with the adapter off."""
    import torch

    device = pipeline.unet.device
    adapter.set_scale(scale)
    if user.embedding is not None and user.embedding.shape[0] != adapter.config.embedding_dim:
        raise SageError(f"{user.label}: embedding has {user.embedding.shape[0]} dims, the adapter expects "
                        f"{adapter.config.embedding_dim} (another embedding model?)")
    images = []
    with torch.no_grad():
        if user.embedding is None:
            kwargs = adapter.reference_kwargs()
        else:
            kwargs = adapter.attention_kwargs(adapter(torch.from_numpy(user.embedding)[None].to(device, torch.float32)))
        for prompt in prompts:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            out = pipeline(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                           height=resolution, width=resolution, cross_attention_kwargs=kwargs)
            images.append(out.images[0])
            if on_image is not None:
                on_image()
    return images


GRID_CELL_MIN = 192  # px: tiny demo renders (64 px) are scaled up so the grid can be read
GRID_FONT = 14


def compose_grid(columns: list[tuple[UserInput, list[Any]]], prompts: list[str], cell: int | None = None) -> Any:
    """One row per prompt, one column per user (the base model first when given): each column headed by
    the user and the categories that user bans, each row by its prompt, wrapped to fit, never cut."""
    from PIL import Image, ImageDraw

    from sage_builder.report.drawing import draw_lines, line_height, wrap

    first = columns[0][1][0] if columns and columns[0][1] else None
    cell = max(cell or (first.width if first is not None else GRID_CELL_MIN), GRID_CELL_MIN)
    pad, label_w = 8, 220
    headers = []
    for user, _ in columns:
        lines = wrap(user.label, cell - 2 * pad, GRID_FONT + 1)
        if user.embedding is None:
            bans = wrap("no user: what the base model draws", cell - 2 * pad, GRID_FONT)
        elif user.banned is None:
            bans = ["bans: unknown"]
        else:
            bans = wrap("bans: " + (", ".join(user.banned) if user.banned else "nothing"), cell - 2 * pad, GRID_FONT)
        headers.append((lines, bans))
    header_h = pad + max(len(a) * line_height(GRID_FONT + 1) + len(b) * line_height(GRID_FONT)
                         for a, b in headers) + pad
    prompt_lines = [wrap(p, label_w - 2 * pad, GRID_FONT) for p in prompts]
    row_h = [max(cell, len(lines) * line_height(GRID_FONT) + 2 * pad) for lines in prompt_lines]
    grid = Image.new("RGB", (label_w + len(columns) * (cell + pad) + pad, header_h + sum(r + pad for r in row_h)),
                     "white")
    draw = ImageDraw.Draw(grid)
    for j, (lines, bans) in enumerate(headers):
        left = label_w + pad + j * (cell + pad)
        y = draw_lines(draw, (left, pad), lines, GRID_FONT + 1)
        draw_lines(draw, (left, y), bans, GRID_FONT, fill="#444444" if columns[j][0].embedding is not None
                   else "#888888")
    top = header_h
    for i, lines in enumerate(prompt_lines):
        draw_lines(draw, (pad, top + pad), lines, GRID_FONT)
        for j, (_, images) in enumerate(columns):
            grid.paste(images[i].convert("RGB").resize((cell, cell), Image.NEAREST),
                       (label_w + pad + j * (cell + pad), top))
        top += row_h[i] + pad
    return grid


def render_grid(pipeline: Any, adapter: Any, users: list[UserInput], prompts: list[str], scale: float, steps: int,
                guidance: float, seed: int, resolution: int, base: bool = True, desc: str = "grid") -> Any:
    """The base model (adapter off, when ``base``) and every user x every prompt, with a progress bar."""
    from sage_builder.progress import progress

    everyone = ([BASE_USER] if base else []) + users
    bar = progress(total=len(everyone) * len(prompts), desc=desc, unit="img")
    try:
        columns = [(u, render(pipeline, adapter, u, prompts, scale, steps, guidance, seed, resolution,
                              on_image=lambda: bar.update(1))) for u in everyone]
    finally:
        bar.close()
    return compose_grid(columns, prompts, resolution)


def load_pipeline_for(adapter: Any, model: str, device: str, dtype: str, threads: int | None = None) -> Any:
    """The base pipeline with ``adapter`` installed on its UNet (every argument checked by the caller)."""
    import torch

    from sage_builder.runtime import torch_dtype
    from sage_builder.stages.train.trainer import load_base_pipeline

    if threads:
        torch.set_num_threads(threads)
    pipeline = load_base_pipeline(adapter.config.backbone, model, revision=adapter.config.base_model_revision,
                                  dtype=torch_dtype(dtype, device)).to(device)
    pipeline.set_progress_bar_config(disable=True)
    adapter.to(device, torch.float32)
    adapter.install(pipeline.unet)
    return pipeline
