"""A small synthetic stage-4 dataset for the trainer's tests and benchmarks.

Two image classes stand in for the two variants of a pair: "u" images are warm vertical stripes,
"s" images cool horizontal stripes, each pair with its own phase and noise. Two users with opposite
preferences share every pair and the same caption: user 0000001 bans the category (prefers "s"),
user 0000002 allows it (prefers "u"). The preference is therefore learnable only from the user
embedding. The layout is the one stage 4 writes (Hub layout, ``datasets`` features in each shard).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

STRICT_USER, PERMISSIVE_USER = "0000001", "0000002"

if TYPE_CHECKING:
    from sage_builder.store import RunDir

CARD = """---
configs:
- config_name: preferences
  default: true
  data_files:
{preference_files}
- config_name: pairs
  data_files:
  - split: train
    path: data/pairs/train-*.parquet
- config_name: users
  data_files:
  - split: train
    path: data/users/train-*.parquet
---
# Synthetic Sage-like dataset (tests only)
"""


def _image(rng: np.random.Generator, warm: bool, size: int) -> bytes:
    """Warm vertical stripes ("u") or cool horizontal stripes ("s"), each with its own phase and noise.

    The classes differ in spatial structure, not only in colour: a colour shift is mostly a constant
    offset of the latents, which the UNet's GroupNorms remove.
    """
    from PIL import Image

    period = 8
    phase = int(rng.integers(0, period))
    ramp = ((np.arange(size) + phase) // (period // 2)) % 2
    stripes = np.broadcast_to(ramp[None, :] if warm else ramp[:, None], (size, size))[..., None]
    base = np.array([0.75, 0.3, 0.25]) if warm else np.array([0.25, 0.3, 0.75])
    pixels = np.clip(base * (0.35 + 0.65 * stripes) + rng.normal(0, 0.04, (size, size, 3)), 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_synthetic_dataset(root: Path | str, n_train_pairs: int = 8, n_val_pairs: int = 4, size: int = 64,
                            embedding_dim: int = 16, seed: int = 0, caption: str = "a picture",
                            users_without_embedding: tuple[str, ...] = (), broken_images: tuple[str, ...] = ()
                            ) -> Path:
    """Write the dataset folder and return it. Records: every pair x both users, per split.
    ``broken_images``: pair ids whose unsafe image is stored as undecodable bytes."""
    import datasets

    root = Path(root)
    rng = np.random.default_rng(seed)
    embeddings = {STRICT_USER: rng.normal(0, 1, embedding_dim), PERMISSIVE_USER: rng.normal(0, 1, embedding_dim)}
    pairs: dict[str, list] = {k: [] for k in ("pair_id", "category", "concept", "idx", "prompt_unsafe",
                                              "prompt_safe", "seed", "image_unsafe", "image_safe",
                                              "sha256_unsafe", "sha256_safe")}
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for i in range(n_train_pairs + n_val_pairs):
        split = "train" if i < n_train_pairs else "validation"
        pair_id = f"pair{i:04d}"
        unsafe = b"not an image" if pair_id in broken_images else _image(rng, True, size)
        safe = _image(rng, False, size)
        for key, value in (("pair_id", pair_id), ("category", "Violence"), ("concept", "synthetic"), ("idx", i + 1),
                           ("prompt_unsafe", caption), ("prompt_safe", caption), ("seed", i),
                           ("image_unsafe", {"bytes": unsafe, "path": None}), ("image_safe", {"bytes": safe, "path": None}),
                           ("sha256_unsafe", hashlib.sha256(unsafe).hexdigest()),
                           ("sha256_safe", hashlib.sha256(safe).hexdigest())):
            pairs[key].append(value)
        for user, chosen, reason in ((STRICT_USER, "s", "banned"), (PERMISSIVE_USER, "u", "allowed")):
            splits[split].append({
                "record_id": f"{user}-{pair_id}", "user_id": user, "pair_id": pair_id, "category": "Violence",
                "concept": "synthetic", "idx": i + 1, "caption": caption, "caption_variant": "u",
                "chosen_variant": chosen, "rejected_variant": "u" if chosen == "s" else "s", "reason": reason})
    users = {"user_id": [STRICT_USER, PERMISSIVE_USER],
             "embedding": [None if u in users_without_embedding else embeddings[u].astype(np.float32).tolist()
                           for u in (STRICT_USER, PERMISSIVE_USER)],
             "level": [5, 0], "split": ["train", "train"], "banned": [["Violence"], []]}

    image = datasets.Image()
    pair_features = datasets.Features({
        "pair_id": datasets.Value("string"), "category": datasets.Value("string"),
        "concept": datasets.Value("string"), "idx": datasets.Value("int64"),
        "prompt_unsafe": datasets.Value("string"), "prompt_safe": datasets.Value("string"),
        "seed": datasets.Value("int64"), "image_unsafe": image, "image_safe": image,
        "sha256_unsafe": datasets.Value("string"), "sha256_safe": datasets.Value("string")})
    user_features = datasets.Features({
        "user_id": datasets.Value("string"), "embedding": datasets.List(datasets.Value("float32")),
        "level": datasets.Value("int64"), "split": datasets.Value("string"),
        "banned": datasets.List(datasets.Value("string"))})
    (root / "data" / "pairs").mkdir(parents=True, exist_ok=True)
    (root / "data" / "users").mkdir(parents=True, exist_ok=True)
    (root / "data" / "preferences").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(pairs, features=pair_features).to_parquet(
        str(root / "data" / "pairs" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict(users, features=user_features).to_parquet(
        str(root / "data" / "users" / "train-00000-of-00001.parquet"))
    files = []
    for split, rows in splits.items():
        if not rows:
            continue
        datasets.Dataset.from_list(rows).to_parquet(
            str(root / "data" / "preferences" / f"{split}-00000-of-00001.parquet"))
        files.append(f"  - split: {split}\n    path: data/preferences/{split}-*.parquet")
    (root / "README.md").write_text(CARD.format(preference_files="\n".join(files)))
    return root


def write_synthetic_label_stage(run: RunDir, **dataset: Any) -> Path:
    """The synthetic dataset as ``RUN/label/dataset`` with a label manifest that lists its files (size,
    sha256), as stage 4 leaves them; ``dataset`` goes to :func:`write_synthetic_dataset`."""
    from sage_builder.store import Manifest

    label = run.stage("label")
    root = write_synthetic_dataset(label.file("dataset"), **dataset)
    files = sorted(f"dataset/{p.relative_to(root).as_posix()}" for p in root.rglob("*") if p.is_file())
    label.write_manifest(Manifest(stage="label", fingerprint="synthetic", config_hash="synthetic",
                                  outputs=label.describe_outputs(files)))
    return root
