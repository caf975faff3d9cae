"""Rendering images with diffusers: seeds, keys, pipeline loading, the batch loop, the background writer.

What an image *is* is decided here: its seed comes from the pair (both images of a pair share it),
its key is the hash of prompt, seed and render settings, and each image gets its own CPU
``torch.Generator`` so that its initial noise does not depend on its batch or device. On CPU the
pixels are batch-invariant too (``make_batch_invariant``). Encoding and writing run on a
background writer with a bounded queue, so the accelerator never waits for JPEG or disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from sage_builder.config_base import model_identity, public_model_ref
from sage_builder.errors import StageInputError
from sage_builder.runtime import hub_offline, is_local_path, resolve_dtype, torch_dtype
from sage_builder.stages.render.config import SCHEDULERS, RenderConfig
from sage_builder.store import ITEM_KEY, ItemCache, stable_hash

log = logging.getLogger("sage.render")

PIPELINE_CLASSES = {"sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline"}
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}

# One row per finished image in the item cache: everything the key determines, plus the bytes.
PART_SCHEMA = pa.schema([
    (ITEM_KEY, pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("model", pa.string()),
    ("revision", pa.string()), ("scheduler", pa.string()), ("steps", pa.int32()), ("guidance", pa.float32()),
    ("height", pa.int32()), ("width", pa.int32()), ("dtype", pa.string()), ("encoding", pa.string()),
    ("quality", pa.int32()), ("image", pa.binary()), ("sha256", pa.string()), ("nbytes", pa.int64()),
])


@dataclass(frozen=True)
class RenderSettings:
    """Everything besides prompt and seed that determines an image's bytes."""

    backbone: str
    model: str
    revision: str | None
    scheduler: str
    steps: int
    guidance: float
    height: int
    width: int
    negative_prompt: str
    dtype: str
    encoding: str
    quality: int

    @classmethod
    def from_config(cls, config: RenderConfig, device: str) -> RenderSettings:
        return cls(backbone=config.backbone, model=config.model, revision=config.revision,
                   scheduler=config.scheduler, steps=config.steps, guidance=config.guidance,
                   height=config.height, width=config.width, negative_prompt=config.negative_prompt,
                   dtype=resolve_dtype(config.dtype, device), encoding=config.encoding, quality=config.quality)


@dataclass(frozen=True)
class ImageJob:
    """One image to render: its key, prompt and seed."""

    key: str
    prompt: str
    seed: int


def pair_seed(global_seed: int, pair_id: str) -> int:
    """The seed both images of a pair share: from the global seed and the pair, never its position."""
    digest = hashlib.sha256(f"{global_seed}:render:{pair_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def image_key(prompt: str, seed: int, settings: RenderSettings) -> str:
    # A local model folder counts by its content, not its path (see config.model_identity).
    keyed = {**asdict(settings), "model": model_identity(settings.model)}
    return stable_hash("render-image", prompt, seed, keyed, length=32)


def locate_model(config: RenderConfig) -> tuple[str, str | None]:
    """(where to load from, resolved revision); raises a one-line error if the model is unavailable."""
    expected = PIPELINE_CLASSES[config.backbone]
    if is_local_path(config.model):
        folder = Path(config.model).expanduser()
        index = folder / "model_index.json"
        if not index.exists():
            raise StageInputError(f"render.model: {folder}: no diffusers model folder (model_index.json "
                                  f"missing); run `make models` or point render.model at a saved pipeline")
        _check_pipeline_class(index, expected, config)
        return str(folder), config.revision
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(config.model, "model_index.json", revision=config.revision)
    if isinstance(cached, str):
        _check_pipeline_class(Path(cached), expected, config)
        snapshot = Path(cached).parent.name
        return config.model, config.revision or snapshot
    if hub_offline():
        raise StageInputError(f"render.model: '{config.model}' is not in the local Hugging Face cache and "
                              f"HF_HUB_OFFLINE is set; download it first (`hf download {config.model}`) "
                              f"or set render.model to a local folder")
    return config.model, config.revision


def _check_pipeline_class(index: Path, expected: str, config: RenderConfig) -> None:
    import json

    try:
        found = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise StageInputError(f"render.model: {index}: unreadable ({exc.__class__.__name__})") from None
    if found and found != expected:
        raise StageInputError(f"render.model: {config.model} is a {found}, but render.backbone "
                              f"'{config.backbone}' needs a {expected}; fix render.backbone or render.model")


def load_pipeline(config: RenderConfig, device: str) -> Any:
    """The diffusers pipeline for ``config``, on ``device`` in the configured precision, SDPA attention
    (eager: the speed levers are applied by ``levers.apply_levers``)."""
    import diffusers

    from sage_builder.logs import quiet_libraries

    quiet_libraries()  # no loading bars or library warnings on the console unless -v
    source, _ = locate_model(config)
    dtype = torch_dtype(config.dtype, device)
    cls = getattr(diffusers, PIPELINE_CLASSES[config.backbone])
    extra: dict[str, Any] = {"add_watermarker": False} if config.backbone == "sdxl" else \
        {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_pretrained(source, revision=config.revision, dtype=dtype,
                                   local_files_only=hub_offline() or is_local_path(source), **extra)
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise StageInputError(f"render.model: cannot load {source} as a {cls.__name__}: {first}") from None
    return prepare_pipeline(pipe, config.scheduler, device)


def prepare_pipeline(pipe: Any, scheduler: str, device: str) -> Any:
    """Scheduler by name, device, SDPA attention, quiet progress."""
    import diffusers

    class_name, extra = SCHEDULERS[scheduler]
    if class_name:
        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)
    pipe.to(device)
    # torch >= 2 gives AttnProcessor2_0 (scaled_dot_product_attention) by default; make it explicit.
    from diffusers.models.attention_processor import AttnProcessor2_0

    if hasattr(pipe.unet, "set_attn_processor"):
        pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scheduler_label(pipe: Any) -> str:
    return type(pipe.scheduler).__name__


def encode_image(pixels: Any, encoding: str, quality: int) -> bytes:
    """HxWx3 uint8 array -> JPEG (quality), lossless WebP or PNG bytes; deterministic for a given Pillow."""
    from PIL import Image

    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if encoding == "jpeg":
        image.save(buffer, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif encoding == "webp":
        image.save(buffer, format="WEBP", lossless=True, quality=100, method=4)
    else:
        image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def to_uint8(images: Any) -> Any:
    """Pipeline output (B,3,H,W floats in [0,1], any device) -> (B,H,W,3) uint8 numpy, as diffusers rounds."""
    import torch

    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


class BackgroundWriter:
    """Encodes rendered batches and writes them as item-cache parts on its own thread.

    ``put`` blocks only when ``max_batches`` are already waiting (bounded memory). One part is
    written per batch, so a crash loses at most the batches still in the queue or on the device.
    An error on the writer thread is raised again by the next ``put`` or by ``close``.
    """

    def __init__(self, cache: ItemCache, settings: RenderSettings, scheduler: str, revision: str | None,
                 writer_id: str = "0", max_batches: int = 2, on_written: Callable[[int], None] | None = None):
        self.cache = cache
        self.settings = settings
        self.scheduler = scheduler
        self.revision = revision
        self.writer_id = writer_id
        self.on_written = on_written
        self.written = 0
        self.bytes = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_batches)
        # Pillow releases the GIL while encoding: a batch's images encode in parallel.
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                                        thread_name_prefix=f"render-encode-{writer_id}")
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=f"render-writer-{writer_id}", daemon=True)
        self._thread.start()

    def put(self, jobs: Sequence[ImageJob], pixels: Any) -> None:
        self._raise_if_failed()
        self._queue.put((list(jobs), pixels))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._pool.shutdown()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"render writer failed: {self._error}") from self._error

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            try:
                self._write(*item)
            except BaseException as exc:  # noqa: BLE001 - handed to the rendering thread
                self._error = exc

    def _write(self, jobs: list[ImageJob], pixels: Any) -> None:
        s = self.settings
        rows = []
        encoded = self._pool.map(lambda array: encode_image(array, s.encoding, s.quality), list(pixels))
        for job, data in zip(jobs, encoded):
            # The model by name (hub id, or a local folder's name and content identity), never a path (issue 16).
            rows.append({ITEM_KEY: job.key, "prompt": job.prompt, "seed": job.seed, "model": public_model_ref(s.model),
                         "revision": self.revision, "scheduler": self.scheduler, "steps": s.steps,
                         "guidance": s.guidance, "height": s.height, "width": s.width, "dtype": s.dtype,
                         "encoding": s.encoding, "quality": s.quality, "image": data,
                         "sha256": hashlib.sha256(data).hexdigest(), "nbytes": len(data)})
        self.cache.write(pa.Table.from_pylist(rows, schema=PART_SCHEMA), self.writer_id)
        self.written += len(rows)
        self.bytes += sum(r["nbytes"] for r in rows)
        if self.on_written:
            self.on_written(len(rows))


def batches(jobs: Sequence[ImageJob], size: int) -> Iterable[list[ImageJob]]:
    for start in range(0, len(jobs), size):
        yield list(jobs[start:start + size])


def make_batch_invariant(pipe: Any) -> None:
    """CPU: make each image's pixels independent of what else is in its batch.

    oneDNN picks different kernels (and so rounds differently) for different batch sizes in two
    places of the UNet: convolutions over a batch of one, and linear layers on 2-D inputs (the
    time and text embeddings). Channels-last convolutions are batch-invariant from two samples up
    (classifier-free guidance always gives the UNet two per image), and 2-D linears run row by row.
    Text encoding and VAE decoding are done per image by ``generate_batch`` itself.
    """
    import torch

    pipe.unet.to(memory_format=torch.channels_last)
    for module in pipe.unet.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _rowwise(module.forward)


def _rowwise(forward: Callable[[Any], Any]) -> Callable[[Any], Any]:
    import torch

    def rowwise_forward(x: Any) -> Any:
        if x.dim() == 2 and x.shape[0] > 1:
            return torch.cat([forward(x[i:i + 1]) for i in range(x.shape[0])])
        return forward(x)

    return rowwise_forward


def encode_prompts(pipe: Any, prompts: Sequence[str], settings: RenderSettings,
                   one_by_one: bool = True) -> dict[str, Any]:
    """Prompt embeddings for the pipeline call; ``one_by_one`` encodes each prompt alone (batch-invariant)."""
    import torch

    if not one_by_one:
        prompts = [list(prompts)]  # type: ignore[list-item]
    cfg = settings.guidance > 1.0
    negative = settings.negative_prompt or None
    device = pipe._execution_device
    parts: list[tuple[Any, ...]] = []
    for prompt in prompts:
        # SD1.5 wants the negative prompt in the same shape as the prompt (str or list).
        neg = [negative] * len(prompt) if negative and isinstance(prompt, list) else negative
        if hasattr(pipe, "text_encoder_2"):
            parts.append(pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=cfg, negative_prompt=neg))
        else:
            parts.append(pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt=neg))
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return {name: torch.cat([p[i] for p in parts]) for i, name in enumerate(names[:len(parts[0])])
            if parts[0][i] is not None}


def decode_latents(pipe: Any, latents: Any) -> Any:
    """Latents of one image -> (1,3,H,W) in [0,1], as the pipelines' own decode + postprocess do."""
    import torch

    vae = pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)
    latents = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)


def generate_batch(pipe: Any, jobs: Sequence[ImageJob], settings: RenderSettings, pad_to: int = 0,
                   invariant: bool = True, sdpa_backend: str = "auto") -> Any:
    """Render one batch; returns (len(jobs), H, W, 3) uint8.

    Each image has its own CPU generator (so the initial noise is the same on any device), its own
    VAE decode (less memory, too); only the denoising loop is batched. ``invariant`` (CPU) also
    encodes each prompt alone; on GPUs the text encoders get the whole batch. ``pad_to`` repeats
    the last job so that a compiled UNet always sees one shape; ``sdpa_backend`` pins the attention
    kernel (:func:`attention_backend`).
    """
    import torch

    padded = list(jobs) + [jobs[-1]] * max(0, pad_to - len(jobs))
    if settings.guidance <= 1.0 and len(padded) == 1:
        padded = padded * 2  # without guidance a lone image would be a UNet batch of one (see above)
    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in padded]
    with torch.inference_mode(), attention_backend(sdpa_backend):
        embeds = encode_prompts(pipe, [job.prompt for job in padded], settings, one_by_one=invariant)
        latents = pipe(**embeds, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                       height=settings.height, width=settings.width, generator=generators,
                       output_type="latent").images
        images = torch.cat([decode_latents(pipe, latents[i:i + 1]) for i in range(len(jobs))])
        return to_uint8(images)


def render_batches(pipe: Any, job_batches: Iterable[Sequence[ImageJob]], settings: RenderSettings,
                   cache: ItemCache, revision: str | None, writer_id: str = "0", pad_to: int = 0,
                   on_written: Callable[[int], None] | None = None, max_queued: int = 2,
                   invariant: bool = True, sdpa_backend: str = "auto") -> BackgroundWriter:
    """Render each batch in turn, handing the pixels to a background writer (one part per batch)."""
    writer = BackgroundWriter(cache, settings, scheduler_label(pipe), revision, writer_id=writer_id,
                              max_batches=max_queued, on_written=on_written)
    try:
        for batch in job_batches:
            writer.put(batch, generate_batch(pipe, batch, settings, pad_to=pad_to, invariant=invariant,
                                             sdpa_backend=sdpa_backend))
    except BaseException:
        # Keep what is already rendered (the queued batches still get written), then re-raise.
        try:
            writer.close()
        except RuntimeError as exc:
            log.warning("%s", exc)
        raise
    writer.close()
    return writer


def render_jobs(pipe: Any, jobs: Sequence[ImageJob], settings: RenderSettings, cache: ItemCache,
                batch_size: int, revision: str | None, writer_id: str = "0", pad_batches: bool = False,
                on_written: Callable[[int], None] | None = None, invariant: bool = True,
                sdpa_backend: str = "auto") -> BackgroundWriter:
    """Render ``jobs`` in order, ``batch_size`` at a time (see ``render_batches``)."""
    return render_batches(pipe, batches(jobs, batch_size), settings, cache, revision, writer_id,
                          pad_to=batch_size if pad_batches else 0, on_written=on_written, invariant=invariant,
                          sdpa_backend=sdpa_backend)


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Pin scaled_dot_product_attention to one kernel (``auto``: torch's own choice)."""
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name])):
        yield
