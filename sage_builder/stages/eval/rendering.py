"""Rendering eval's images with the render engine: one pipeline, adapters installed in turn.

The render engine's pieces do the work (pipeline loading, CPU batch invariance, per-image CPU
generators, per-image VAE decode, the background JPEG/PNG writer into an item cache); this module
adds what eval's methods need per batch: each image's own negative prompt (``prompt``) and user
tokens through ``cross_attention_kwargs`` (``psa`` and other adapters). Images are grouped by
adapter and cut into batches from the whole plan, so a resumed run renders the remaining batches
as an uninterrupted one would; only missing keys are rendered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from sage_builder.errors import StageInputError
from sage_builder.stages.eval.methods import EvalImage
from sage_builder.store import ItemCache

log = logging.getLogger("sage.eval")


def cut_batches(images: Sequence[EvalImage], batch_size: int, done: set[str]) -> list[list[EvalImage]]:
    """Batches of each adapter group, cut from the whole plan, finished keys dropped."""
    groups: dict[str | None, list[EvalImage]] = {}
    for image in images:
        groups.setdefault(image.adapter, []).append(image)
    out = []
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            batch = [i for i in group[start:start + batch_size] if i.key not in done]
            if batch:
                out.append(batch)
    return out


def encode_with_negatives(pipe: Any, images: Sequence[EvalImage], settings: Any, invariant: bool) -> dict[str, Any]:
    """Prompt embeddings where each image may have its own negative prompt (grouped per negative)."""
    import torch

    from sage_builder.stages.render.engine import encode_prompts

    groups: dict[str, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.negative_prompt, []).append(i)
    if len(groups) == 1:
        return encode_prompts(pipe, [i.prompt for i in images], replace(settings, negative_prompt=images[0].negative_prompt),
                              one_by_one=invariant)
    rows: list[dict[str, Any] | None] = [None] * len(images)
    for negative, members in groups.items():
        embeds = encode_prompts(pipe, [images[i].prompt for i in members], replace(settings, negative_prompt=negative),
                                one_by_one=invariant)
        for j, i in enumerate(members):
            rows[i] = {name: value[j:j + 1] for name, value in embeds.items()}
    first = rows[0]
    assert first is not None
    return {name: torch.cat([r[name] for r in rows if r is not None]) for name in first}


def user_tokens(adapter: Any, embeddings: Sequence[np.ndarray], device: str) -> Any:
    """User tokens, one embedding at a time (a 2-D linear rounds differently per batch size on CPU)."""
    import torch

    rows = [torch.from_numpy(np.ascontiguousarray(e, np.float32))[None].to(device) for e in embeddings]
    return torch.cat([adapter(row) for row in rows])


def generate_eval_batch(pipe: Any, batch: Sequence[EvalImage], settings: Any, invariant: bool,
                        adapter: Any = None, embeddings: dict[str, np.ndarray] | None = None) -> Any:
    """One batch -> (len(batch), H, W, 3) uint8, as the render engine's ``generate_batch`` renders,
    plus per-image negative prompts and user tokens."""
    import torch

    from sage_builder.stages.render.engine import decode_latents, to_uint8

    padded = list(batch)
    if settings.guidance <= 1.0 and len(padded) == 1:
        padded = padded * 2  # a lone image without guidance would be a UNet batch of one
    generators = [torch.Generator("cpu").manual_seed(image.seed) for image in padded]
    with torch.inference_mode():
        embeds = encode_with_negatives(pipe, padded, settings, invariant)
        extra: dict[str, Any] = {}
        if adapter is not None:
            assert embeddings is not None
            tokens = user_tokens(adapter, [embeddings[i.conditioned_on] for i in padded], pipe._execution_device)
            extra["cross_attention_kwargs"] = adapter.attention_kwargs(tokens)
        latents = pipe(**embeds, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                       height=settings.height, width=settings.width, generator=generators,
                       output_type="latent", **extra).images
        decoded = torch.cat([decode_latents(pipe, latents[i:i + 1]) for i in range(len(batch))])
        return to_uint8(decoded)


def load_adapter(folder: Path, device: str, scale: float, embedding_dim: int, label: str) -> Any:
    import torch

    from sage_builder.errors import SageError
    from sage_builder.stages.train.adapter import UserAdapter

    try:
        adapter = UserAdapter.load(folder)
    except SageError as exc:
        raise StageInputError(f"{label}: {exc}") from None
    if adapter.config.embedding_dim != embedding_dim:
        raise StageInputError(f"{label}: {folder} expects {adapter.config.embedding_dim}-d user embeddings, the "
                              f"dataset's users have {embedding_dim}; use an adapter trained on this dataset")
    adapter.to(device, torch.float32).eval()
    adapter.set_scale(scale)
    return adapter


def render_missing(images: Sequence[EvalImage], render_config: Any, settings: Any, revision: str | None,
                   device: str, cache: ItemCache, adapters: dict[str, Path], embeddings: dict[str, np.ndarray],
                   scale: float, batch_size: int, on_written: Callable[[int], None] | None = None,
                   pipe: Any = None) -> int:
    """Render the images whose keys the cache lacks; returns how many were written."""
    from sage_builder.stages.render.engine import (BackgroundWriter, ImageJob, load_pipeline, make_batch_invariant,
                                                   scheduler_label)

    batches = cut_batches(images, batch_size, cache.done_keys())
    if not batches:
        return 0
    if pipe is None:
        pipe = load_pipeline(render_config, device)
        if device == "cpu":
            make_batch_invariant(pipe)
    dim = len(next(iter(embeddings.values()))) if embeddings else 0
    writer = BackgroundWriter(cache, settings, scheduler_label(pipe), revision, writer_id="eval", on_written=on_written)
    installed: tuple[str | None, Any] = (None, None)
    try:
        for batch in batches:
            name = batch[0].adapter
            if name != installed[0]:
                if installed[1] is not None:
                    installed[1].remove()
                adapter = None
                if name is not None:
                    adapter = load_adapter(adapters[name], device, scale, dim,
                                           "eval.adapter" if name == "psa" else f"eval.adapters.{name}")
                    adapter.install(pipe.unet)
                installed = (name, adapter)
            pixels = generate_eval_batch(pipe, batch, settings, invariant=device == "cpu", adapter=installed[1],
                                         embeddings=embeddings)
            writer.put([ImageJob(i.key, i.prompt, i.seed) for i in batch], pixels)
    except BaseException:
        try:
            writer.close()  # keep the batches already rendered
        except RuntimeError as exc:
            log.warning("%s", exc)
        raise
    finally:
        if installed[1] is not None:
            installed[1].remove()
    writer.close()
    return writer.written
