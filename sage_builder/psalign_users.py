"""The PSA authors' ``users.csv`` format (SPEC §4), read in one place for stage 1 and ``sage import``.

Columns ``Age, Age_Group, Gender, Religion, Physical_Condition, Mental_Condition, Banned_Categories,
Allowed_Categories``; the two list columns are Python list literals (``"['Propaganda', 'Sexuality']"``);
no id column: data row i is user i (``0000001``...). The published file's 1,001st row is the
permissive user. Every problem is one line naming the file, line and user.
"""

from __future__ import annotations

import ast
import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_builder.errors import SageError, StageInputError

# our column name -> the published column
DEMOGRAPHIC_COLUMNS = {"age": "Age", "age_group": "Age_Group", "gender": "Gender", "religion": "Religion",
                       "physical_condition": "Physical_Condition", "mental_condition": "Mental_Condition"}
LIST_COLUMNS = ("Banned_Categories", "Allowed_Categories")
USERS_COLUMNS = (*DEMOGRAPHIC_COLUMNS.values(), *LIST_COLUMNS)


@dataclass
class PublishedUser:
    user_id: str
    line: int  # line of the file (the header is line 1)
    demographics: dict[str, Any]  # our column names; age as int
    banned: list[str]
    allowed: list[str]

    @property
    def where(self) -> str:
        return f"line {self.line} (user {self.user_id})"


def read_users_csv(path: Path | str, categories: Sequence[str],
                   error: type[SageError] = StageInputError) -> list[PublishedUser]:
    """Every row of a users file, in file order; category names are matched case-insensitively."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such users file (the published users.csv format, SPEC §4)")
    by_lower = {c.lower(): c for c in categories}
    users = []
    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's BOM is not a column
        reader = csv.DictReader(handle)
        missing = [c for c in USERS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise error(f"{path}: column {missing[0]} is missing (a users file has the columns "
                        f"{', '.join(USERS_COLUMNS)})")
        for i, row in enumerate(reader, start=1):
            user = PublishedUser(f"{i:07d}", i + 1, {}, [], [])
            where = f"{path}: {user.where}"
            user.demographics = {ours: row[theirs] for ours, theirs in DEMOGRAPHIC_COLUMNS.items()}
            try:
                user.demographics["age"] = int(row["Age"])
            except (TypeError, ValueError):
                raise error(f"{where}: Age {row['Age']!r} is not a whole number") from None
            user.banned = category_list(row["Banned_Categories"], "Banned_Categories", where, by_lower, error)
            user.allowed = category_list(row["Allowed_Categories"], "Allowed_Categories", where, by_lower, error)
            both = [c for c in user.banned if c in user.allowed]
            if both:
                raise error(f"{where}: '{both[0]}' is both banned and allowed; fix the row")
            users.append(user)
    if not users:
        raise error(f"{path}: no users")
    return users


def category_list(text: str | None, column: str, where: str, by_lower: dict[str, str],
                  error: type[SageError] = StageInputError) -> list[str]:
    """A list column's categories, spelled as the pipeline spells them."""
    try:
        value = ast.literal_eval((text or "").strip()) if (text or "").strip() else []
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise error(f"{where}: {column} {text!r} is not a Python list literal of category names, "
                    f"such as \"['Propaganda', 'Sexuality']\"")
    out = []
    for name in value:
        if name.lower() not in by_lower:
            raise error(f"{where}: {column}: unknown category '{name}' (the pipeline's categories: "
                        f"{', '.join(by_lower.values())})")
        out.append(by_lower[name.lower()])
    return out
