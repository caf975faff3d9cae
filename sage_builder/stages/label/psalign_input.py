"""Reading the PSA authors' layout (SPEC §4) for ``sage import --format psalign``.

- ``users.csv``: ``Age, Age_Group, Gender, Religion, Physical_Condition, Mental_Condition,
  Banned_Categories, Allowed_Categories``; the list columns are Python list literals; no id column
  (data row i is user i, as ``0000001``...).
- ``<split>/metadata.jsonl``: one record per line (``file_name``, ``chosen``, ``rejected``,
  ``caption``, ``user_data``), read line by line.
- Image names ``user_{uid}_{category}_{concept}_{idx:05d}_{s|u}.jpg`` (category lowercased, spaces
  in the concept as underscores), the inverse of ``export.psalign_stem``.
- ``{User_ID}.npy`` float32 vectors, their shapes read without loading them.

Every problem that makes the input unusable raises a one-line StageInputError naming the file and line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sage_builder.errors import StageInputError
from sage_builder.psalign_users import DEMOGRAPHIC_COLUMNS
from sage_builder.psalign_users import PublishedUser as PsalignUser
from sage_builder.psalign_users import read_users_csv as read_published_users
from sage_builder.runtime import hub_offline, is_local_path

# psalign user_data key -> our column
DEMOGRAPHICS = {theirs: ours for ours, theirs in DEMOGRAPHIC_COLUMNS.items()}
RECORD_KEYS = ("file_name", "chosen", "rejected", "caption", "user_data")
CAPTION_NAME = re.compile(r"user_(?P<uid>\d{7})_(?P<rest>.+)_(?P<idx>\d{5})\.jpg_(?P<variant>[us])\.jpg")
IMAGE_NAME = re.compile(r"user_(?P<uid>\d{7})_(?P<rest>.+)_(?P<idx>\d{5})_(?P<variant>[us])\.jpg")


@dataclass(frozen=True)
class RecordNames:
    """What a record's three file names say: whose, which pair, which caption, which images."""

    user_id: str
    category: str
    concept: str
    idx: int
    caption_variant: str
    chosen_variant: str
    rejected_variant: str


def read_users_csv(path: Path, categories: list[str]) -> dict[str, PsalignUser]:
    """Users by id from a file in the published ``users.csv`` format."""
    return {user.user_id: user for user in read_published_users(path, categories)}


def split_lines(path: Path) -> tuple[int, str | None]:
    """(records, the first record's line) of a metadata.jsonl, without parsing it."""
    count, first = 0, None
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                count += 1
                first = first or line
    return count, first


def parse_record(line: str, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(line)
    except json.JSONDecodeError as exc:
        raise StageInputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the "
                              f"line") from None
    if not isinstance(meta, dict):
        raise StageInputError(f"{where}: a JSON {type(meta).__name__}, not a record object")
    missing = [k for k in RECORD_KEYS if k not in meta]
    if missing:
        raise StageInputError(f"{where}: the record has no '{missing[0]}' (needs {', '.join(RECORD_KEYS)})")
    if not isinstance(meta["user_data"], dict) or "User_ID" not in meta["user_data"]:
        raise StageInputError(f"{where}: user_data has no User_ID")
    return meta


def iter_records(path: Path, label: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-empty line; ``label`` names the file in messages."""
    with open(path, encoding="utf-8") as handle:
        for n, line in enumerate(handle, start=1):
            if line.strip():
                yield n, parse_record(line, f"{label} line {n}")


def _split_rest(rest: str, by_lower: dict[str, str]) -> tuple[str, str] | None:
    for lower in sorted(by_lower, key=len, reverse=True):
        if rest.startswith(lower + "_"):
            return by_lower[lower], rest[len(lower) + 1:].replace("_", " ")
    return None


def record_names(meta: dict[str, Any], by_lower: dict[str, str], where: str) -> RecordNames:
    """The pair and variants a record's file names encode; names that disagree are a one-line error."""
    caption = CAPTION_NAME.fullmatch(str(meta["file_name"]))
    chosen = IMAGE_NAME.fullmatch(str(meta["chosen"]))
    rejected = IMAGE_NAME.fullmatch(str(meta["rejected"]))
    for key, match in (("file_name", caption), ("chosen", chosen), ("rejected", rejected)):
        if match is None:
            raise StageInputError(f"{where}: {key} {meta[key]!r} is not a psalign name "
                                  f"(user_UID_category_concept_IDX{'.jpg_[us].jpg' if key == 'file_name' else '_[us].jpg'})")
    stem = caption.group("uid", "rest", "idx")  # type: ignore[union-attr]
    for key, match in (("chosen", chosen), ("rejected", rejected)):
        if match.group("uid", "rest", "idx") != stem:  # type: ignore[union-attr]
            raise StageInputError(f"{where}: {key} {meta[key]} is not an image of the record's pair ({meta['file_name']})")
    if chosen.group("variant") == rejected.group("variant"):  # type: ignore[union-attr]
        raise StageInputError(f"{where}: chosen and rejected are the same image ({meta['chosen']})")
    uid, rest, idx = stem
    if str(meta["user_data"]["User_ID"]) != uid:
        raise StageInputError(f"{where}: user_data.User_ID {meta['user_data']['User_ID']} but the file names "
                              f"name user {uid}")
    parts = _split_rest(rest, by_lower)
    if parts is None:
        raise StageInputError(f"{where}: {meta['file_name']} names no known category "
                              f"({', '.join(sorted(by_lower))}); pass the pipeline's categories with --config")
    return RecordNames(uid, parts[0], parts[1], int(idx), caption.group("variant"),  # type: ignore[union-attr]
                       chosen.group("variant"), rejected.group("variant"))  # type: ignore[union-attr]


def embedding_dim(folder: Path, user_ids: list[str]) -> int:
    """The one vector length of the users' ``{uid}.npy`` in ``folder`` (shapes only, nothing loaded);
    mixed sizes and unreadable files are one-line errors. A missing file is the caller's concern."""
    if not folder.is_dir():
        raise StageInputError(f"{folder}: no such embeddings folder ({{User_ID}}.npy files)")
    dim, first = None, None
    for uid in user_ids:
        path = folder / f"{uid}.npy"
        if not path.is_file():
            continue
        try:
            shape = np.load(path, mmap_mode="r").shape
        except (ValueError, OSError) as exc:
            raise StageInputError(f"{path}: not a readable .npy file ({str(exc)[:80]})") from None
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[0] != 1):
            raise StageInputError(f"{path}: shape {shape}, expected one vector")
        if dim is None:
            dim, first = shape[-1], path.name
        elif shape[-1] != dim:
            raise StageInputError(f"{path}: a {shape[-1]}-d embedding, but {first} is {dim}-d (embeddings of mixed "
                                  f"sizes); export all users' embeddings with one model")
    if dim is None:
        raise StageInputError(f"{folder}: none of the users' embeddings ({{User_ID}}.npy) is there")
    return int(dim)


def load_embedding(folder: Path, uid: str) -> np.ndarray | None:
    path = folder / f"{uid}.npy"
    return np.load(path).astype(np.float32).reshape(-1) if path.is_file() else None


def model_hidden_size(ref: str) -> int:
    """Hidden size of an LLM from its ``config.json`` (a local folder, or the Hub cache / Hub)."""
    if is_local_path(ref):
        path = Path(ref).expanduser() / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(ref, "config.json", local_files_only=hub_offline()))
        except Exception as exc:  # noqa: BLE001 - offline miss, unknown repo, network: one line either way
            raise StageInputError(f"embedding model {ref}: cannot read its config.json ({exc.__class__.__name__}); "
                                  f"pass a local model folder, or leave the embedding model out") from None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise StageInputError(f"{path}: no readable config.json, so the embedding model's size is unknown") from None
    for source in (config, config.get("text_config") or {}):
        for key in ("hidden_size", "d_model", "n_embd"):
            if isinstance(source.get(key), int):
                return source[key]
    raise StageInputError(f"{path}: no hidden_size, so the embedding model's size is unknown")
