"""The prompts eval renders: the dataset's test splits, or an external CSV, each tied to a user.

- A split (``test_unseen``, ``test_seen``): its records captioned with the unsafe prompt p_h
  (``caption_variant`` u), one prompt per record: 50 users x 21 = 1,050 at full size.
- A CSV (``eval.prompts_csv``): ``caption``, ``user_id`` (a user of the dataset) or ``level`` (0-5:
  that level's reference user), optional ``category``. Every row is checked before anything is
  written; an unknown user or level is one line naming the file, the row and the fix.

Users (banned/allowed categories, demographics, embedding, level) come from the dataset's
``users`` config, which stage 4 writes from the profiles.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sage_builder.errors import StageInputError
from sage_builder.store import stable_hash

PROFILE_FIELDS = ("age", "age_group", "gender", "religion", "physical_condition", "mental_condition")
PREFERENCE_COLUMNS = ["record_id", "user_id", "category", "caption", "caption_variant"]


@dataclass(frozen=True)
class EvalUser:
    user_id: str
    banned: tuple[str, ...]
    allowed: tuple[str, ...]
    level: int | None
    embedding: np.ndarray = field(compare=False, repr=False)
    profile: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def embedding_sha(self) -> str:
        return stable_hash("user-embedding", np.ascontiguousarray(self.embedding, np.float32).tobytes(), length=16)


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of a prompt set, for one user."""

    prompt_id: str
    prompt_set: str
    user_id: str
    category: str | None
    caption: str


def _shards(root: Path, config: str, split: str) -> list[Path]:
    return sorted((root / "data" / config).glob(f"{split}-*.parquet"))


def load_users(root: Path) -> dict[str, EvalUser]:
    """Every user of the dataset's ``users`` config, by id."""
    files = _shards(root, "users", "train")
    if not files:
        raise StageInputError(f"{root}: no users config (data/users/train-*.parquet); rerun `sage stage label` or "
                              "point eval.dataset at a stage-4 dataset folder")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    for column in ("user_id", "banned", "embedding"):
        if column not in table.column_names:
            raise StageInputError(f"{files[0]}: the users config has no '{column}' column; rerun `sage stage label`")
    users = {}
    for row in table.to_pylist():
        banned = tuple(row.get("banned") or [])
        allowed = tuple(row.get("allowed") or [])
        level = row.get("level")
        users[row["user_id"]] = EvalUser(row["user_id"], banned, allowed, None if level is None else int(level),
                                         np.asarray(row["embedding"], dtype=np.float32),
                                         {f: row.get(f) for f in PROFILE_FIELDS if f in row})
    return users


def reference_users(users: dict[str, EvalUser]) -> dict[int, EvalUser]:
    """Level -> the reference user of that level (stage 1's levels 0-5)."""
    return {u.level: u for u in users.values() if u.level is not None}


def split_prompts(root: Path, split: str, users: dict[str, EvalUser], limit: int | None = None) -> list[EvalPrompt]:
    """The unsafe-caption records of one split, in file order."""
    files = _shards(root, "preferences", split)
    if not files:
        raise StageInputError(f"{root}: no '{split}' split in the preferences config; list only the splits the "
                              f"dataset has in eval.splits, or rerun `sage stage label`")
    prompts = []
    for path in files:
        table = pq.read_table(path, columns=PREFERENCE_COLUMNS)
        for row in table.to_pylist():
            if row["caption_variant"] != "u":
                continue
            if row["user_id"] not in users:
                raise StageInputError(f"{path}: record {row['record_id']} names user {row['user_id']}, who is not in "
                                      f"the users config of {root}; rerun `sage stage label`")
            prompts.append(EvalPrompt(stable_hash("eval-prompt", split, row["record_id"], length=16), split,
                                      row["user_id"], row["category"], row["caption"]))
            if limit is not None and len(prompts) >= limit:
                return prompts
    return prompts


def csv_prompts(path: Path, users: dict[str, EvalUser], categories: list[str],
                limit: int | None = None) -> list[EvalPrompt]:
    """The rows of an external prompt CSV, each checked: one line names the first bad row."""
    path = Path(path)
    if not path.exists():
        raise StageInputError(f"eval.prompts_csv: {path} does not exist")
    levels = reference_users(users)
    name = f"csv:{path.stem}"
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if "caption" not in columns or not ({"user_id", "level"} & columns):
            raise StageInputError(f"{path}: needs a 'caption' column and a 'user_id' or 'level' column (has "
                                  f"{', '.join(sorted(columns)) or 'none'})")
        prompts = []
        for number, row in enumerate(reader, start=2):
            caption = (row.get("caption") or "").strip()
            if not caption:
                raise StageInputError(f"{path}: line {number} has an empty caption")
            uid = (row.get("user_id") or "").strip()
            level = (row.get("level") or "").strip()
            if uid:
                uid = uid.zfill(7) if uid.isdigit() else uid
                if uid not in users:
                    raise StageInputError(f"{path}: line {number}: user {uid} is not in the dataset's users "
                                          f"({len(users)} users); use a user_id of eval.dataset or a level 0-5")
            elif level:
                if not level.isdigit() or int(level) not in levels:
                    raise StageInputError(f"{path}: line {number}: level '{level}' is not a reference level of "
                                          f"the dataset (levels: {sorted(levels)})")
                uid = levels[int(level)].user_id
            else:
                raise StageInputError(f"{path}: line {number} has neither a user_id nor a level")
            category = (row.get("category") or "").strip() or None
            if category is not None and category not in categories:
                raise StageInputError(f"{path}: line {number}: category '{category}' is not one of "
                                      f"{', '.join(categories)}")
            prompts.append(EvalPrompt(stable_hash("eval-prompt", name, number, caption, uid, length=16), name, uid,
                                      category, caption))
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise StageInputError(f"{path}: no prompt rows")
    return prompts


def load_prompt_sets(root: Path, splits: list[str], csv_path: Path | None, users: dict[str, EvalUser],
                     categories: list[str], limit: int | None = None) -> list[EvalPrompt]:
    if csv_path is not None:
        return csv_prompts(csv_path, users, categories, limit)
    prompts: list[EvalPrompt] = []
    for split in splits:
        found = split_prompts(root, split, users, limit)
        if not found:
            raise StageInputError(f"{root}: the '{split}' split has no unsafe-caption records")
        prompts += found
    return prompts
