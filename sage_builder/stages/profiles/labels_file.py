"""The ``file`` labeller: banned lists read from a CSV in the published ``users.csv`` format (SPEC 4).

Columns ``Age, Age_Group, Gender, Religion, Physical_Condition, Mental_Condition, Banned_Categories,
Allowed_Categories``; the two list columns are Python list literals (``"['Propaganda', 'Sexuality']"``);
no id column: row i is user i+1. Rows after the last sampled user (e.g. the published file's 1,001st,
the permissive user) are not used. Each used row's demographics must equal the sampled user's, so a
file can only label the users it was made for; any problem is one line naming the file, row and user.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path

from sage_builder.errors import ConfigError
from sage_builder.stages.profiles.demographics import PUBLISHED_COLUMNS, Demographics

LIST_COLUMNS = ("Banned_Categories", "Allowed_Categories")
LABEL_COLUMNS = (*PUBLISHED_COLUMNS.values(), *LIST_COLUMNS)


def read_labels_file(path: Path | str, users: dict[str, Demographics], categories: list[str]
                     ) -> dict[str, list[str]]:
    """Banned categories per user id (in the pipeline's category order), users in id order from row 1."""
    path = Path(path)
    rows = _read_rows(path)
    if len(rows) < len(users):
        raise ConfigError(f"{path}: {len(rows)} rows for {len(users)} users (row i is user i+1); give a file "
                          f"with a row per user or lower profiles.n_users")
    banned = {}
    for (uid, user), row, line in zip(users.items(), rows, range(2, len(rows) + 2)):
        where = f"{path}: line {line} (user {uid})"
        _check_demographics(where, row, user)
        lists = {column: _category_list(where, column, row[column], categories) for column in LIST_COLUMNS}
        both = [c for c in lists["Banned_Categories"] if c in lists["Allowed_Categories"]]
        if both:
            raise ConfigError(f"{where}: '{both[0]}' is both banned and allowed; fix the row")
        banned[uid] = [c for c in categories if c in lists["Banned_Categories"]]
    return banned


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise ConfigError(f"{path}: labels file not found (profiles.labels_file)")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}: column {missing[0]} is missing (a labels file has the columns "
                              f"{', '.join(LABEL_COLUMNS)})")
        return list(reader)


def _check_demographics(where: str, row: dict[str, str], user: Demographics) -> None:
    for attr, column in PUBLISHED_COLUMNS.items():
        expected = getattr(user, attr)
        value = row[column]
        if attr == "age":
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: Age '{value}' is not a whole number") from None
        if value != expected:
            raise ConfigError(f"{where}: {column} is '{value}' but the sampled user's is '{expected}': the file "
                              f"was made for other users (check profiles.sampler, seed and demographics)")


def _category_list(where: str, column: str, text: str | None, categories: list[str]) -> list[str]:
    try:
        value = ast.literal_eval((text or "").strip())
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {column} {text!r} is not a Python list literal of category names, "
                          f"such as \"['Propaganda', 'Sexuality']\"")
    for name in value:
        if name not in categories:
            raise ConfigError(f"{where}: {column}: unknown category '{name}' (the pipeline's categories: "
                              f"{', '.join(categories)})")
    return value
