"""Rendering eval's images with the render engine, as units of an executor (one pipeline per worker).

The render engine's pieces do the work (pipeline loading, CPU batch invariance, per-image CPU
generators, per-image VAE decode, the background JPEG/PNG writer into an item cache); this module
adds what eval's methods need per batch: each image's own negative prompt (``prompt``) and user
tokens through ``cross_attention_kwargs`` (``psa`` and other adapters). Images are grouped by
adapter and cut into batches once, from the whole plan (finished keys dropped from their batch), so
every image is rendered in the same batch composition whatever the executor, the number of workers
or an interruption, and so with the same bytes. Units of batches go to whichever worker is idle
(:mod:`sage_builder.executors`, as render's :mod:`~sage_builder.stages.render.workers`); each worker
holds one loaded pipeline and its adapters and writes its own item-cache parts, one per batch, so a
kill loses at most the batches in flight and a rerun renders only the missing keys.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sage_builder.errors import SageError, StageInputError
from sage_builder.executors import Executor
from sage_builder.executors.base import WorkerSlot, require_shared, run_batches
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

    from sage_builder.diffusion import encode_prompts

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

    from sage_builder.diffusion import decode_latents, to_uint8

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

    from sage_builder.adapter import UserAdapter

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


class AdapterSwitch:
    """The adapters one pipeline renders with: each loaded once (when first needed), one installed at a time."""

    def __init__(self, pipe: Any, folders: dict[str, Path], device: str, scale: float, embedding_dim: int):
        self.pipe, self.folders, self.device, self.scale, self.dim = pipe, folders, device, scale, embedding_dim
        self.loaded: dict[str, Any] = {}
        self.installed: tuple[str | None, Any] = (None, None)

    def use(self, name: str | None) -> Any:
        """Install adapter ``name`` (None: the base pipeline) and return it."""
        if name == self.installed[0]:
            return self.installed[1]
        self.remove()
        if name is None:
            return None
        if name not in self.loaded:
            self.loaded[name] = load_adapter(self.folders[name], self.device, self.scale, self.dim,
                                             "eval.adapter" if name == "psa" else f"eval.adapters.{name}")
        adapter = self.loaded[name]
        adapter.install(self.pipe.unet)
        self.installed = (name, adapter)
        return adapter

    def remove(self) -> None:
        if self.installed[1] is not None:
            self.installed[1].remove()
        self.installed = (None, None)


def render_eval_batches(pipe: Any, batches: Sequence[Sequence[EvalImage]], settings: Any, revision: str | None,
                        device: str, cache: ItemCache, adapters: AdapterSwitch, embeddings: dict[str, np.ndarray],
                        writer_id: str = "eval", on_written: Callable[[int], None] | None = None) -> int:
    """Render batches that are already cut (their composition is kept); returns how many images were written.

    One item-cache part per batch, written on the render engine's background writer: an interruption
    loses at most the batches in flight.
    """
    from sage_builder.diffusion import BackgroundWriter, ImageJob, scheduler_label

    writer = BackgroundWriter(cache, settings, scheduler_label(pipe), revision, writer_id=writer_id,
                              on_written=on_written)
    try:
        for batch in batches:
            adapter = adapters.use(batch[0].adapter)
            pixels = generate_eval_batch(pipe, batch, settings, invariant=device == "cpu", adapter=adapter,
                                         embeddings=embeddings)
            writer.put([ImageJob(i.key, i.prompt, i.seed) for i in batch], pixels)
    except BaseException:
        try:
            writer.close()  # keep the batches already rendered
        except RuntimeError as exc:
            log.warning("%s", exc)
        raise
    writer.close()
    return writer.written


Unit = list[list[EvalImage]]


@dataclass
class EvalRenderWorker:
    """One loaded pipeline (and its adapters) on one device; copied to every worker slot, then fed units."""

    config: Any  # the RenderConfig eval renders with (inputs.render_config)
    settings: Any
    revision: str | None
    cache_dir: Path
    adapters: dict[str, Path]
    embeddings: dict[str, np.ndarray]
    scale: float
    marker: str | None = None  # a file the driver made in cache_dir: proves the directory is shared (Ray)

    def start(self, slot: WorkerSlot) -> None:
        import torch

        from sage_builder.diffusion import load_pipeline, make_batch_invariant

        require_shared(self.cache_dir, self.marker, self.cache_dir.parents[2])
        self.slot = slot
        self._threads = torch.get_num_threads()
        # CPU pixels can round differently with another torch thread count: eval.threads when set (the
        # same for any number of workers), else the cores the executor reserved for this worker.
        threads = self.config.threads or slot.cpus
        if threads and slot.device == "cpu":
            torch.set_num_threads(threads)
        self.pipe = load_pipeline(self.config, slot.device)
        if slot.device == "cpu":
            make_batch_invariant(self.pipe)
        dim = len(next(iter(self.embeddings.values()))) if self.embeddings else 0
        self.switch = AdapterSwitch(self.pipe, self.adapters, slot.device, self.scale, dim)

    def run(self, unit: Unit, report: Callable[[int], None]) -> int:
        return render_eval_batches(self.pipe, unit, self.settings, self.revision, self.slot.device,
                                   ItemCache(self.cache_dir), self.switch, self.embeddings, f"eval-{self.slot.tag}",
                                   report)

    def close(self) -> None:
        import torch

        self.switch.remove()
        self.pipe = self.switch = None
        torch.set_num_threads(self._threads)


def describe_unit(unit: Unit) -> str:
    images = sum(len(b) for b in unit)
    first = unit[0][0].key if unit and unit[0] else "?"
    return f"a unit of {images} eval image(s) (first image key {first})"


def render_missing(executor: Executor, images: Sequence[EvalImage], render_config: Any, settings: Any,
                   revision: str | None, cache: ItemCache, adapters: dict[str, Path],
                   embeddings: dict[str, np.ndarray], scale: float, batch_size: int) -> tuple[int, int]:
    """Render the images whose keys the cache lacks on the executor's workers; returns (written, units run)."""
    batches = cut_batches(images, batch_size, cache.done_keys())
    worker = EvalRenderWorker(render_config, settings, revision, cache.directory, adapters, embeddings, scale)
    return run_batches(executor, batches, worker, describe_unit, cache.directory, f"eval render ({executor.name})")
