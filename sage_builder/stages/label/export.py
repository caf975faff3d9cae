"""Exports of a label dataset directory to layouts other trainers read.

- ``psalign``: the PSA authors' layout (SPEC §4): ``<split>/metadata.jsonl`` + JPEG files named
  ``user_{uid}_{category}_{concept}_{idx:05d}_{s|u}.jpg`` next to it, and ``{User_ID}.npy``
  float32 embeddings in ``embeddings/``. The held-out split keeps the authors' name, ``val/``. Every user holds their own copy of a pair's images (as the
  authors' trainer expects); copies are hard links to one file where the filesystem allows.
- ``pickapic``: Pick-a-Pic columns as diffusers' Diffusion-DPO example reads them: ``jpg_0``,
  ``jpg_1`` (encoded bytes), ``label_0`` (1.0 when ``jpg_0`` is preferred), ``caption``, plus
  ``user_id``; ``jpg_0`` is always the unsafe image, ``jpg_1`` the safe one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sage_builder.errors import SageError
from sage_builder.progress import progress
from sage_builder.stages.label.assign import RECORD_SPLITS
from sage_builder.stages.label.dataset import SplitWriter, hub_split, shard_files

FORMATS = ("psalign", "pickapic")


def _require(root: Path) -> None:
    for config in ("preferences", "pairs", "users"):
        if not (root / "data" / config).is_dir():
            raise SageError(f"{root / 'data' / config}: missing; export needs a full label dataset directory "
                            f"(stage 4 with label.include_pairs: true)")


def _pair_locations(root: Path) -> dict[str, tuple[Path, int]]:
    where = {}
    for path in shard_files(root, "pairs", "train"):
        for row, pid in enumerate(pq.read_table(path, columns=["pair_id"]).column("pair_id").to_pylist()):
            where[pid] = (path, row)
    return where


class PairImages:
    """Image bytes by (pair_id, variant), read one pairs shard at a time."""

    def __init__(self, root: Path):
        self.where = _pair_locations(root)
        self._path: Path | None = None
        self._table: pa.Table | None = None

    def get(self, pair_id: str, variant: str) -> bytes:
        if pair_id not in self.where:
            raise SageError(f"pair {pair_id}: not in the pairs config; run `sage validate` on the dataset")
        path, row = self.where[pair_id]
        if path != self._path:
            self._table = pq.read_table(path, columns=["image_unsafe", "image_safe"])
            self._path = path
        column = "image_unsafe" if variant == "u" else "image_safe"
        return self._table.column(column)[row].as_py()["bytes"]  # type: ignore[union-attr]


def as_jpeg(data: bytes) -> bytes:
    if data[:3] == b"\xff\xd8\xff":
        return data
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def psalign_stem(uid: str, category: str, concept: str, idx: int) -> str:
    safe_concept = concept.replace(" ", "_").replace("/", "-")
    return f"user_{uid}_{category.lower()}_{safe_concept}_{idx:05d}"


def psalign_record(rec: dict[str, Any]) -> dict[str, Any]:
    stem = psalign_stem(rec["user_id"], rec["category"], rec["concept"], rec["idx"])
    return {
        "file_name": f"{stem}.jpg_{rec['caption_variant']}.jpg",
        "chosen": f"{stem}_{rec['chosen_variant']}.jpg",
        "rejected": f"{stem}_{rec['rejected_variant']}.jpg",
        "caption": rec["caption"],
        "user_data": {
            "User_ID": rec["user_id"], "Cluster_ID": str(rec["cluster_id"]), "Age": int(rec["age"]),
            "Age_Group": rec["age_group"], "Gender": rec["gender"], "Religion": rec["religion"],
            "Physical_Condition": rec["physical_condition"], "Mental_Condition": rec["mental_condition"],
        },
    }


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def export_psalign(root: Path, out: Path, splits: list[str]) -> dict[str, int]:
    _require(root)
    images = PairImages(root)
    out.mkdir(parents=True, exist_ok=True)
    pool = out / ".pool"
    pool.mkdir(exist_ok=True)
    counts = {}
    try:
        for split in splits:
            split_dir = out / split
            if split_dir.exists():
                if not (split_dir / "metadata.jsonl").exists() and any(split_dir.iterdir()):
                    raise SageError(f"{split_dir}: not empty and not an earlier export; choose another --out")
                shutil.rmtree(split_dir)  # an earlier export: replaced whole, so no stale image survives
            split_dir.mkdir(parents=True)
            n = 0
            owner: dict[str, str] = {}  # file name -> pair_id, to catch two concepts that map to one name
            tmp = split_dir / "metadata.jsonl.tmp"
            with open(tmp, "w", encoding="utf-8") as handle:
                for path in shard_files(root, "preferences", split):
                    for rec in pq.read_table(path).to_pylist():
                        meta = psalign_record(rec)
                        for name, variant in ((meta["chosen"], rec["chosen_variant"]),
                                              (meta["rejected"], rec["rejected_variant"])):
                            target = split_dir / name
                            if owner.setdefault(name, rec["pair_id"]) != rec["pair_id"]:
                                raise SageError(f"{path} record {rec['record_id']}: file name {name} is also "
                                                f"used by pair {owner[name]} (concepts that differ only by "
                                                f"spaces/underscores); rename one concept in stage 2")
                            if target.exists():
                                continue
                            pooled = pool / f"{rec['pair_id']}_{variant}.jpg"
                            if not pooled.exists():
                                pooled.write_bytes(as_jpeg(images.get(rec["pair_id"], variant)))
                            _link_or_copy(pooled, target)
                        handle.write(json.dumps(meta, ensure_ascii=False) + "\n")
                        n += 1
            tmp.replace(split_dir / "metadata.jsonl")
            counts[split] = n
    finally:
        shutil.rmtree(pool, ignore_errors=True)
    emb_dir = out / "embeddings"
    emb_dir.mkdir(exist_ok=True)
    users = 0
    for path in shard_files(root, "users", "train"):
        table = pq.read_table(path, columns=["user_id", "embedding"])
        for uid, emb in zip(table.column("user_id").to_pylist(), table.column("embedding").to_pylist()):
            if emb is None:
                raise SageError(f"{path} user {uid}: no embedding; run `sage validate {root}`")
            np.save(emb_dir / f"{uid}.npy", np.asarray(emb, dtype=np.float32))
            users += 1
    counts["embeddings"] = users
    return counts


PICKAPIC_SCHEMA = pa.schema([("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()),
                             ("caption", pa.string()), ("user_id", pa.string()), ("record_id", pa.string()),
                             ("category", pa.string()), ("reason", pa.string())])


def export_pickapic(root: Path, out: Path, splits: list[str], shard_rows: int = 5000) -> dict[str, int]:
    _require(root)
    images = PairImages(root)
    counts = {}
    configs = []
    for split in splits:
        files = shard_files(root, "preferences", split)
        total = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
        writer = SplitWriter(out, "pickapic", split, PICKAPIC_SCHEMA, total, shard_rows)
        bar = progress(total=total, desc=f"pickapic {split}", unit="record")
        for path in files:
            batch: list[dict[str, Any]] = []
            for rec in pq.read_table(path).to_pylist():
                batch.append({"jpg_0": images.get(rec["pair_id"], "u"), "jpg_1": images.get(rec["pair_id"], "s"),
                              "label_0": 1.0 if rec["chosen_variant"] == "u" else 0.0, "caption": rec["caption"],
                              "user_id": rec["user_id"], "record_id": rec["record_id"],
                              "category": rec["category"], "reason": rec["reason"]})
                if len(batch) >= 256:
                    writer.write(pa.Table.from_pylist(batch, schema=PICKAPIC_SCHEMA))
                    bar.update(len(batch))
                    batch = []
            if batch:
                writer.write(pa.Table.from_pylist(batch, schema=PICKAPIC_SCHEMA))
                bar.update(len(batch))
        bar.close()
        writer.close()
        counts[split] = writer.rows
        configs.append({"split": hub_split(split), "path": f"data/pickapic/{hub_split(split)}-*.parquet"})
    card = {"configs": [{"config_name": "default", "data_files": configs}]}
    import yaml

    (out / "README.md").write_text("---\n" + yaml.safe_dump(card, sort_keys=False) + "---\n\n"
                                   "Sage preference records in Pick-a-Pic columns (jpg_0 = unsafe image, jpg_1 = "
                                   "safe image, label_0 = 1.0 when jpg_0 is preferred). Content warning: harmful "
                                   "imagery by design.\n")
    return counts


def check_out_folder(root: Path, out: Path, overwrite: bool) -> None:
    """Never into the source dataset; into an existing dataset or a non-empty folder only with --overwrite."""
    if out.exists() and not out.is_dir():
        raise SageError(f"--out {out}: is a file; name a folder")
    source = root.resolve()
    target = out.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise SageError(f"--out {out}: is, holds or lies inside the dataset being exported ({root}); choose "
                        f"another folder")
    if not out.is_dir() or not any(out.iterdir()) or overwrite:
        return
    if (out / "README.md").exists() or (out / "data").is_dir():
        raise SageError(f"--out {out}: holds a dataset (README.md or data/); pass --overwrite to replace what "
                        f"the export writes there, or choose another --out")
    raise SageError(f"--out {out}: not empty; pass --overwrite to write into it anyway, or choose another --out")


def export_dataset(root: Path | str, out: Path | str, fmt: str, splits: list[str] | None = None,
                   overwrite: bool = False) -> dict[str, int]:
    root, out = Path(root), Path(out)
    if fmt not in FORMATS:
        raise SageError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if not root.is_dir():
        raise SageError(f"{root}: no such dataset directory (stage 4 writes RUN/label/dataset)")
    # `validation` is the Hub name of the held-out split; `val` is the pipeline's and psalign's.
    splits = [{"validation": "val"}.get(s, s) for s in (splits or RECORD_SPLITS)]
    for split in splits:
        if split not in RECORD_SPLITS:
            raise SageError(f"--split {split}: choose among {', '.join(hub_split(s) for s in RECORD_SPLITS)}")
    check_out_folder(root, out, overwrite)
    if fmt == "psalign":
        return export_psalign(root, out, splits)
    return export_pickapic(root, out, splits)
