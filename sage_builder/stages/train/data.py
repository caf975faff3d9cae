"""Reading the stage-4 dataset for training, and the content-keyed latent and text caches.

Records come from the ``preferences`` config, user embeddings from ``users``, image bytes from
``pairs`` (read with ``datasets.load_dataset(DIR_or_hub_id, CONFIG)``). Every record is checked
before training starts: an unknown pair, a user without an embedding, an unreadable image or one
whose bytes do not match the pair's ``sha256_*`` column stops the run with a one-line error naming
the record, instead of becoming zeros or the next sample; a shard that cannot be read is named.

Latent cache: each distinct image is VAE-encoded once, keyed by sha256(image bytes, VAE id,
resolution, preprocessing version), and stored as ``<key>.safetensors`` holding the posterior
mean of the image *and of its horizontal mirror*. Flips are therefore exact (a flipped latent is
not the latent of the flipped image, so flipping in latent space would be wrong). Random crops are
taken in latent space, on the latent grid (8 px for SD1.5/SDXL), from the latent of the whole (resized) image; Sage's
renders are square at the training resolution, so for them the crop is the whole image and exact.
Text cache: the text-encoder outputs of each distinct caption (including the empty caption used
for caption dropout), keyed by sha256(caption, text-encoder id).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sage_builder.errors import StageInputError

log = logging.getLogger("sage.train")
PREPROCESS_VERSION = "resize-short-side-lanczos/center-to-8/mean/v1"
VARIANT_COLUMN = {"u": "image_unsafe", "s": "image_safe"}
SHA256_COLUMN = {"u": "sha256_unsafe", "s": "sha256_safe"}
# The held-out split is `validation` on the Hub (stage 4 since issue 16) and `val` in older datasets.
HELD_OUT_NAMES = {"validation": "val", "val": "validation"}
REBUILD = "rerun stage 4 (`sage stage label --force`) or copy the dataset again"


@dataclass(frozen=True)
class PreferenceRecord:
    record_id: str
    user_id: str
    pair_id: str
    caption: str
    chosen: str  # variant "u" or "s"
    rejected: str
    category: str = ""
    reason: str = ""  # "banned" (the safe image is chosen) or "allowed"


@dataclass
class PreferenceData:
    """Records of the requested splits, user embeddings, and the pairs table (images undecoded)."""

    splits: dict[str, list[PreferenceRecord]]
    embeddings: dict[str, np.ndarray]
    levels: dict[int, str]
    pairs: Any  # datasets.Dataset with Image(decode=False) columns
    pair_rows: dict[str, int]
    source: str

    @property
    def embedding_dim(self) -> int:
        return len(next(iter(self.embeddings.values())))

    def image_bytes(self, pair_id: str, variant: str) -> bytes:
        """The encoded image, checked against the pair's ``sha256_*`` column where the dataset has one
        (stage 4 writes it): a corrupt copy stops here instead of reaching training."""
        row = self.pairs[self.pair_rows[pair_id]]
        value = row[VARIANT_COLUMN[variant]]
        data = value.get("bytes") if isinstance(value, dict) else None
        if not data:
            path = value.get("path") if isinstance(value, dict) else None
            if not (path and Path(path).exists()):
                raise StageInputError(f"pair {pair_id}: {VARIANT_COLUMN[variant]} has no image bytes in {self.source}")
            data = Path(path).read_bytes()
        expected = row.get(SHA256_COLUMN[variant])
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise StageInputError(f"pair {pair_id}: {VARIANT_COLUMN[variant]} does not match its "
                                  f"{SHA256_COLUMN[variant]} in {self.source} (a corrupt copy); {REBUILD}")
        return data

    def user_embedding(self, user_id: str, record_id: str | None = None) -> np.ndarray:
        try:
            return self.embeddings[user_id]
        except KeyError:
            where = f"record {record_id}: " if record_id else ""
            raise StageInputError(f"{where}user {user_id} has no embedding in the 'users' config of {self.source}; "
                                  f"rerun stage 4 (label) or drop the user's records") from None


def _single_split(dataset_dict: Any, config: str, source: str) -> Any:
    names = list(dataset_dict.keys())
    if len(names) != 1:
        raise StageInputError(f"{source}: config '{config}' should have one split, found {names}")
    return dataset_dict[names[0]]


def _local_cache_dir(source: str) -> str | None:
    """A `datasets` cache folder keyed by the local files' names, sizes and mtimes.

    `datasets` keys the Arrow cache of a local folder by its name and card, not its content, so two
    runs' ``label/dataset`` folders would share (and serve each other's) cached tables.
    """
    root = Path(source)
    if not root.is_dir():
        return None
    from datasets import config as datasets_config

    files = sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)
    stamp = content_key(*(f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files))
    return str(Path(datasets_config.HF_DATASETS_CACHE) / "sage-local" / stamp[:16])


def _load(source: str, config: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(source, config, cache_dir=_local_cache_dir(source))
    except Exception as exc:  # noqa: BLE001 - a corrupt shard surfaces as whatever the reader raised
        unreadable = _unreadable_shard(source, config)
        if unreadable:
            raise StageInputError(unreadable) from None
        if isinstance(exc, (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError)):
            raise StageInputError(f"{source}: cannot load config '{config}' of the stage-4 dataset "
                                  f"({str(exc).splitlines()[0][:200]}); run stage 4 (label) first") from None
        cause = exc.__cause__ or exc
        raise StageInputError(f"{source}: config '{config}' of the stage-4 dataset cannot be read "
                              f"({cause.__class__.__name__}: {str(cause).splitlines()[0][:160] if str(cause) else ''})"
                              f"; {REBUILD}") from None


def _unreadable_shard(source: str, config: str) -> str | None:
    """For a local folder that `datasets` could not load: the first of the config's Parquet files
    that pyarrow cannot read either, as one line; None when every file reads."""
    import pyarrow.parquet as pq

    root = Path(source)
    if not root.is_dir():
        return None
    folder = root / "data" / config if (root / "data" / config).is_dir() else root
    for path in sorted(folder.rglob("*.parquet")):
        try:
            pq.read_table(path)
        except Exception as bad:  # noqa: BLE001
            return (f"{path}: not a readable Parquet file ({bad.__class__.__name__}: {str(bad).splitlines()[0][:120]})"
                    f"; {REBUILD}")
    return None


def load_preference_data(source: str | Path, splits: Iterable[str], optional: Iterable[str] = ()) -> PreferenceData:
    """Load and check the dataset; raises a one-line StageInputError naming the bad record.

    A split in ``optional`` that the dataset lacks (a small run's empty val split) reads as no records.
    """
    import datasets

    source = str(source)
    if not Path(source).exists() and (source.startswith(("/", ".", "~")) or source.count("/") != 1):
        raise StageInputError(f"{source}: no such dataset folder; run stage 4 (label) first")
    preferences = _load(source, "preferences")
    users = _single_split(_load(source, "users"), "users", source)
    pairs = _single_split(_load(source, "pairs"), "pairs", source)
    for column in VARIANT_COLUMN.values():
        pairs = pairs.cast_column(column, datasets.Image(decode=False))

    embeddings: dict[str, np.ndarray] = {}
    levels: dict[int, str] = {}
    user_columns = users.column_names
    for row in users.select_columns([c for c in ("user_id", "embedding", "level") if c in user_columns]):
        if row.get("embedding") is not None:
            embeddings[row["user_id"]] = np.asarray(row["embedding"], dtype=np.float32)
        if row.get("level") is not None:
            levels[int(row["level"])] = row["user_id"]
    if not embeddings:
        raise StageInputError(f"{source}: the 'users' config has no embeddings")
    dims = {len(v) for v in embeddings.values()}
    if len(dims) != 1:
        raise StageInputError(f"{source}: user embeddings have different lengths {sorted(dims)}")
    pair_rows = {pid: i for i, pid in enumerate(pairs["pair_id"])}

    out: dict[str, list[PreferenceRecord]] = {}
    optional = set(optional)
    for split in [*splits, *sorted(optional)]:
        stored = split if split in preferences else HELD_OUT_NAMES.get(split, split)
        if stored not in preferences and split in optional:
            log.warning("%s: no '%s' split in the preferences config; nothing to evaluate on", source, split)
            out[split] = []
            continue
        if stored not in preferences:
            raise StageInputError(f"{source}: the 'preferences' config has no split '{split}' "
                                  f"(it has {sorted(preferences.keys())})")
        wanted = ["record_id", "user_id", "pair_id", "caption", "chosen_variant", "rejected_variant"]
        table = preferences[stored].select_columns(
            wanted + [c for c in ("category", "reason") if c in preferences[stored].column_names])
        records = []
        for row in table:
            rec = PreferenceRecord(row["record_id"], row["user_id"], row["pair_id"], row["caption"] or "",
                                   row["chosen_variant"], row["rejected_variant"], row.get("category") or "",
                                   row.get("reason") or "")
            if rec.user_id not in embeddings:
                raise StageInputError(f"record {rec.record_id}: user {rec.user_id} has no embedding in the 'users' "
                                      f"config of {source}; rerun stage 4 (label) or drop the user's records")
            if rec.pair_id not in pair_rows:
                raise StageInputError(f"record {rec.record_id}: pair {rec.pair_id} is not in the 'pairs' config "
                                      f"of {source}")
            if {rec.chosen, rec.rejected} != {"u", "s"}:
                raise StageInputError(f"record {rec.record_id}: chosen/rejected variants are "
                                      f"{rec.chosen!r}/{rec.rejected!r}, expected 'u' and 's'")
            records.append(rec)
        out[split] = records
    return PreferenceData(out, embeddings, levels, pairs, pair_rows, source)


def load_image(data: bytes, what: str) -> Any:
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the same user-facing problem
        raise StageInputError(f"{what}: unreadable image ({exc.__class__.__name__}: {str(exc)[:120]}); "
                              f"re-render it (stage 3) or remove the pair") from None


def prepare_pixels(image: Any, resolution: int) -> tuple[Any, tuple[int, int]]:
    """Resize so the short side is ``resolution``, center-crop to multiples of 8; (-1..1 CHW tensor, original hw)."""
    import torch
    from PIL import Image

    original = (image.height, image.width)
    short = min(image.width, image.height)
    if short != resolution:
        ratio = resolution / short
        image = image.resize((max(resolution, round(image.width * ratio)), max(resolution, round(image.height * ratio))),
                             Image.LANCZOS)
    w8, h8 = image.width // 8 * 8, image.height // 8 * 8
    if (w8, h8) != (image.width, image.height):
        left, top = (image.width - w8) // 2, (image.height - h8) // 2
        image = image.crop((left, top, left + w8, top + h8))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), original


def content_key(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class TensorCache:
    """Content-keyed tensors on disk (``<dir>/<key[:2]>/<key>.safetensors``), written atomically."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def put(self, key: str, tensors: dict[str, Any]) -> None:
        from safetensors.torch import save

        from sage_builder.store import atomic_write_bytes

        # save() + an ordinary write: safetensors' save_file creates files 0600, ignoring the umask.
        atomic_write_bytes(self.path(key), save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))

    def get(self, key: str) -> dict[str, Any]:
        from safetensors.torch import load_file

        return load_file(str(self.path(key)))


class LatentCache:
    """VAE latents (posterior mean, scaled) of each distinct image and of its mirror image."""

    def __init__(self, directory: Path, encode: Callable[[Any], Any], vae_id: str, resolution: int,
                 dtype: Any):
        self.store = TensorCache(directory)
        self.encode = encode
        self.vae_id = vae_id
        self.resolution = resolution
        self.dtype = dtype
        self.key_of: dict[tuple[str, str], str] = {}

    def key(self, data: bytes) -> str:
        return content_key(data, self.vae_id, str(self.resolution), PREPROCESS_VERSION)

    def build(self, data: PreferenceData, pairs: Iterable[tuple[str, str]], batch_size: int = 4,
              first_record: dict[str, str] | None = None) -> dict[str, int]:
        """Encode every (pair_id, variant) not yet cached; returns counts."""
        import torch

        from sage_builder.progress import progress

        todo: list[tuple[str, bytes, str]] = []
        seen: set[str] = set()
        reused = 0
        for pair_id, variant in pairs:
            if (pair_id, variant) in self.key_of:
                continue
            raw = data.image_bytes(pair_id, variant)
            key = self.key(raw)
            self.key_of[(pair_id, variant)] = key
            if key in seen:
                continue
            seen.add(key)
            if self.store.has(key):
                reused += 1
                continue
            record = (first_record or {}).get(pair_id)
            what = f"{'record ' + record + ', ' if record else ''}pair {pair_id} {VARIANT_COLUMN[variant]}"
            todo.append((what, raw, key))
        bar = progress(total=len(todo), desc="train: encode latents", unit="img")
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            pixels, originals = [], []
            for what, raw, _ in chunk:
                tensor, original = prepare_pixels(load_image(raw, what), self.resolution)
                pixels.append(tensor)
                originals.append(original)
            shapes = {tuple(p.shape) for p in pixels}
            for shape in shapes:
                idx = [i for i, p in enumerate(pixels) if tuple(p.shape) == shape]
                batch = torch.stack([pixels[i] for i in idx])
                with torch.no_grad():
                    latents = self.encode(torch.cat([batch, batch.flip(-1)]))
                plain, flipped = latents.chunk(2)
                for j, i in enumerate(idx):
                    self.store.put(chunk[i][2], {"latent": plain[j].to(self.dtype),
                                                 "latent_flipped": flipped[j].to(self.dtype),
                                                 "original_size": torch.tensor(originals[i])})
            bar.update(len(chunk))
        bar.close()
        return {"encoded": len(todo), "reused": reused, "distinct": len(seen)}

    def entry(self, pair_id: str, variant: str) -> dict[str, Any]:
        """{"latent", "latent_flipped", "original_size"} of one image (built by ``build``)."""
        return self.store.get(self.key_of[(pair_id, variant)])


class TextCache:
    """Text-encoder outputs of each distinct caption (embeddings, and the pooled vector for SDXL)."""

    def __init__(self, directory: Path, encode: Callable[[list[str]], dict[str, Any]], text_id: str, dtype: Any):
        self.store = TensorCache(directory)
        self.encode = encode
        self.text_id = text_id
        self.dtype = dtype
        self.memory: dict[str, dict[str, Any]] = {}

    def key(self, caption: str) -> str:
        return content_key(caption, self.text_id)

    def build(self, captions: Iterable[str], batch_size: int = 16) -> dict[str, int]:
        from sage_builder.progress import progress

        distinct = sorted(set(captions))
        todo = [c for c in distinct if not self.store.has(self.key(c))]
        bar = progress(total=len(todo), desc="train: encode captions", unit="caption")
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            out = self.encode(chunk)
            for i, caption in enumerate(chunk):
                self.store.put(self.key(caption), {k: v[i].to(self.dtype) for k, v in out.items()})
            bar.update(len(chunk))
        bar.close()
        return {"encoded": len(todo), "distinct": len(distinct)}

    def get(self, caption: str) -> dict[str, Any]:
        key = self.key(caption)
        if key not in self.memory:
            value = self.store.get(key)
            if len(self.memory) < 4096:
                self.memory[key] = value
            return value
        return self.memory[key]
