"""The one image-scorer interface: a batch of images in, one verdict per image out.

Every scorer (NudeNet, Q16, open_nsfw, the VLM judge) takes encoded image bytes (what the render
stage stores) or PIL images, cuts them into ``batch_size`` chunks itself, and returns an
:class:`ImageVerdict` per image: whether it is flagged, the scorer's headline score, and every
class it detected with its score. ``describe()`` names the model and the sha256 of its weights, so
manifests and item keys change when the weights do.
"""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Union

from sage_builder.store import stable_hash

ImageInput = Union[bytes, "Any"]  # encoded bytes (JPEG/PNG/WebP) or a PIL.Image.Image


@dataclass
class ImageVerdict:
    """One scorer's judgement of one image. ``flagged`` is None when the scorer could not judge it
    (``error`` says why); such an image is never counted as clean."""

    flagged: bool | None
    score: float | None
    classes: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ImageScorer(ABC):
    """A batched image classifier or detector; subclasses implement ``_score_batch``."""

    name: ClassVar[str]
    # What a flag means, for reports: "exposed genitalia", "inappropriate", ...
    flags: ClassVar[str] = "flagged"

    def __init__(self, batch_size: int = 16):
        self.batch_size = max(1, int(batch_size))

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """``scorer``, ``model``, ``weights_sha256`` and every setting that changes a verdict."""

    @property
    def identity(self) -> str:
        """A short hash of ``describe()``: part of the item key of every score this scorer makes."""
        return stable_hash("image-scorer", self.describe(), length=16)

    def score(self, images: Sequence[ImageInput], prompts: Sequence[str] | None = None) -> list[ImageVerdict]:
        """Verdicts for ``images`` in order, computed ``batch_size`` at a time."""
        if prompts is not None and len(prompts) != len(images):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        out: list[ImageVerdict] = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start:start + self.batch_size])
            chunk_prompts = None if prompts is None else list(prompts[start:start + self.batch_size])
            verdicts = self._score_batch(chunk, chunk_prompts)
            if len(verdicts) != len(chunk):
                raise RuntimeError(f"{self.name}: {len(verdicts)} verdicts for {len(chunk)} images")
            out.extend(verdicts)
        return out

    @abstractmethod
    def _score_batch(self, images: list[ImageInput], prompts: list[str] | None) -> list[ImageVerdict]:
        """Verdicts for one batch (at most ``batch_size`` images)."""

    def close(self) -> None:
        """Release sessions, models and threads."""

    def __enter__(self) -> ImageScorer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def to_pil(image: ImageInput) -> Any:
    """An RGB PIL image from encoded bytes or a PIL image."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
        image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(*paths: Path) -> str:
    """sha256 of one weights file, or of the files' sha256s in order (a sharded checkpoint)."""
    digests = []
    for path in paths:
        stat = Path(path).stat()
        digests.append(_sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns))
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()
