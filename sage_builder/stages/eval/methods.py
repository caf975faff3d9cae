"""The methods eval compares, and the plan of images they need.

Every method renders a prompt with the same seed (from the global seed and the caption), so two
methods' images of one prompt differ only by the method:

- ``base``: the base pipeline, no adapter;
- ``prompt``: the base pipeline with the user's banned categories added to the negative prompt (the
  paper's prompt-engineering baseline);
- ``psa``: the trained user adapter with the test user's own embedding, and once per reference
  level (0-5) with that level's reference user's embedding;
- any other user-adapter folder (``eval.adapters``), with the test user's own embedding.

An image's key is the hash of the render image key (prompt, seed, settings, negative prompt), the
adapter's identity (weights sha256, scale) and the conditioning embedding's hash: equal images are
rendered once (base's image of a caption serves every user who has it; ``prompt`` for a user who
bans nothing is base's image).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sage_builder.stages.eval.prompt_sets import EvalPrompt, EvalUser
from sage_builder.store import stable_hash


@dataclass(frozen=True)
class EvalImage:
    """One image to render: the render job plus what conditions it."""

    key: str
    prompt: str
    seed: int
    negative_prompt: str
    adapter: str | None  # None (base pipeline), "psa", or an eval.adapters name
    conditioned_on: str | None  # the user id whose embedding the adapter gets


@dataclass(frozen=True)
class EvalRow:
    """One evaluated (prompt, method, level): which image it is and whose profile judges it."""

    prompt_id: str
    prompt_set: str
    user_id: str
    category: str | None
    caption: str
    method: str
    level: int | None
    image_key: str
    profile_user: str  # the test user (own-user rows) or the level's reference user

    @property
    def own_user(self) -> bool:
        return self.level is None


def prompt_seed(global_seed: int, caption: str) -> int:
    """One seed per prompt, shared by every method: from the global seed and the caption text."""
    digest = hashlib.sha256(f"{global_seed}:eval:{caption}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def adapter_identity(folder: Path, scale: float) -> str:
    """The adapter's weights and config, and the scale it runs at."""
    from sage_builder.store import file_sha256

    folder = Path(folder)
    return stable_hash("eval-adapter", file_sha256(folder / "adapter.safetensors"),
                       file_sha256(folder / "adapter_config.json"), scale, length=24)


def negative_with_bans(negative: str, banned: tuple[str, ...]) -> str:
    words = [negative.strip()] if negative.strip() else []
    return ", ".join(words + [c.lower() for c in banned])


@dataclass
class ImagePlan:
    images: list[EvalImage]  # distinct keys, in plan order
    rows: list[EvalRow]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            label = row.method if row.level is None else f"{row.method} L{row.level}"
            out[label] = out.get(label, 0) + 1
        return out


def plan_images(prompts: list[EvalPrompt], users: dict[str, EvalUser], levels: dict[int, EvalUser],
                methods: list[str], level_list: list[int], adapter_ids: dict[str, str], settings: Any,
                global_seed: int) -> ImagePlan:
    """Every (prompt, method, level) row and the distinct images they need.

    ``adapter_ids``: "psa" and each eval.adapters name -> :func:`adapter_identity`; ``settings``: the
    render engine's ``RenderSettings`` (its ``negative_prompt`` is every method's base negative).
    """
    from sage_builder.diffusion import image_key

    images: dict[str, EvalImage] = {}
    rows: list[EvalRow] = []

    def add(prompt: EvalPrompt, method: str, level: int | None, negative: str, adapter: str | None,
            owner: EvalUser | None) -> None:
        seed = prompt_seed(global_seed, prompt.caption)
        render_key = image_key(prompt.caption, seed, replace(settings, negative_prompt=negative))
        key = stable_hash("eval-image", render_key, adapter_ids.get(adapter) if adapter else None,
                          owner.embedding_sha if owner is not None and adapter else None, length=32)
        if key not in images:
            images[key] = EvalImage(key, prompt.caption, seed, negative, adapter,
                                    owner.user_id if owner is not None and adapter else None)
        profile = owner.user_id if owner is not None else prompt.user_id
        rows.append(EvalRow(prompt.prompt_id, prompt.prompt_set, prompt.user_id, prompt.category, prompt.caption,
                            method, level, key, profile))

    base_negative = settings.negative_prompt
    for prompt in prompts:
        user = users[prompt.user_id]
        if "base" in methods:
            add(prompt, "base", None, base_negative, None, None)
        if "prompt" in methods:
            add(prompt, "prompt", None, negative_with_bans(base_negative, user.banned), None, None)
        if "psa" in methods:
            add(prompt, "psa", None, base_negative, "psa", user)
        for name in sorted(a for a in adapter_ids if a != "psa"):
            add(prompt, name, None, base_negative, name, user)
    if "psa" in methods:
        for level in level_list:
            if level not in levels:
                continue
            for prompt in prompts:
                add(prompt, "psa", level, base_negative, "psa", levels[level])
    return ImagePlan(list(images.values()), rows)
