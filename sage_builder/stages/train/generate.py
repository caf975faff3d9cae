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
    embedding: np.ndarray


def users_from_dataset(source: str, user_ids: list[str] | None = None, levels: list[int] | None = None,
                       all_levels: bool = False) -> list[UserInput]:
    """Embeddings of users by id or by level (the reference users of stage 1; all_levels: every one)."""
    from sage_builder.stages.train.data import _load, _single_split

    users = _single_split(_load(source, "users"), "users", source)
    columns = [c for c in ("user_id", "embedding", "level") if c in users.column_names]
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
        out.append(UserInput(f"user {uid}", np.asarray(row["embedding"], dtype=np.float32)))
    for level in levels or []:
        row = by_level.get(level)
        if row is None:
            raise SageError(f"no reference user of level {level} in {source} (levels there: {sorted(by_level)})")
        out.append(UserInput(f"level {level} ({row['user_id']})", np.asarray(row["embedding"], dtype=np.float32)))
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


def user_from_profile(profile_path: Path, setup: EmbeddingSetup) -> UserInput:
    """Embed a profile JSON (age, age_group, gender, religion, physical/mental condition, banned, allowed)
    exactly as stage 1 does: the shared statement -> embedding path with the run's template and LLM."""
    try:
        profile = json.loads(Path(profile_path).read_text())
    except (OSError, ValueError) as exc:
        raise SageError(f"{profile_path}: cannot read the profile JSON ({exc})") from None
    fields = ["age", "age_group", "gender", "religion", "physical_condition", "mental_condition"]
    missing = [f for f in fields + ["banned"] if f not in profile]
    if missing:
        raise SageError(f"{profile_path}: the profile lacks {missing[0]} (needs {', '.join(fields)}, banned, allowed)")
    vector = embed_profile(setup, {f: profile[f] for f in fields}, list(profile["banned"]),
                           list(profile.get("allowed", [])))
    return UserInput(f"profile {Path(profile_path).stem}", vector)


def render(pipeline: Any, adapter: Any, user: UserInput, prompts: list[str], scale: float, steps: int,
           guidance: float, seed: int, resolution: int) -> list[Any]:
    """One image per prompt for one user (same seed for every prompt and user)."""
    import torch

    device = pipeline.unet.device
    adapter.set_scale(scale)
    embedding = torch.from_numpy(user.embedding)[None].to(device, torch.float32)
    if embedding.shape[1] != adapter.config.embedding_dim:
        raise SageError(f"{user.label}: embedding has {embedding.shape[1]} dims, the adapter expects "
                        f"{adapter.config.embedding_dim} (another embedding model?)")
    images = []
    with torch.no_grad():
        tokens = adapter(embedding)
        for prompt in prompts:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            out = pipeline(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                           height=resolution, width=resolution, cross_attention_kwargs=adapter.attention_kwargs(tokens))
            images.append(out.images[0])
    return images


def compose_grid(rows: list[tuple[str, list[Any]]], prompts: list[str], cell: int) -> Any:
    """Rows of images under a header of prompts, each row labelled on the left."""
    from PIL import Image, ImageDraw

    label_w, header_h = max(120, cell // 2), 28
    grid = Image.new("RGB", (label_w + cell * len(prompts), header_h + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, prompt in enumerate(prompts):
        draw.text((label_w + j * cell + 4, 4), prompt[: max(8, cell // 7)], fill="black")
    for i, (label, images) in enumerate(rows):
        draw.text((4, header_h + i * cell + cell // 2 - 6), label, fill="black")
        for j, image in enumerate(images):
            grid.paste(image.resize((cell, cell)), (label_w + j * cell, header_h + i * cell))
    return grid


def render_grid(pipeline: Any, adapter: Any, users: list[UserInput], prompts: list[str], scale: float, steps: int,
                guidance: float, seed: int, resolution: int) -> Any:
    rows = [(u.label, render(pipeline, adapter, u, prompts, scale, steps, guidance, seed, resolution)) for u in users]
    return compose_grid(rows, prompts, resolution)


def load_for_inference(adapter_dir: Path, model: str | None, device: str, dtype: str) -> tuple[Any, Any]:
    """(pipeline with the adapter installed, adapter), for the backbone recorded in the adapter config."""
    import torch

    from sage_builder.stages.train.adapter import UserAdapter
    from sage_builder.stages.train.trainer import load_base_pipeline, resolve_device

    adapter = UserAdapter.load(adapter_dir)
    model = model or adapter.config.base_model
    if not model:
        raise SageError(f"{adapter_dir}: the adapter config records no base model; pass --model")
    device = resolve_device(device)
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else (torch.float16 if device == "cuda" else torch.float32)
    pipeline = load_base_pipeline(adapter.config.backbone, model, dtype=torch_dtype).to(device)
    pipeline.set_progress_bar_config(disable=True)
    adapter.to(device, torch.float32)
    adapter.install(pipeline.unet)
    return pipeline, adapter
