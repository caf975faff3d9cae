"""The ``file`` labeller: banned lists read from a CSV in the published ``users.csv`` format (SPEC 4).

The format is read by :mod:`sage_builder.psalign_users`. Rows after the last sampled user (e.g. the
published file's 1,001st, the permissive user) are not used. Each used row's demographics must equal
the sampled user's, so a file can only label the users it was made for; any problem is one line naming
the file, row and user.
"""

from __future__ import annotations

from pathlib import Path

from sage_builder.errors import ConfigError
from sage_builder.psalign_users import USERS_COLUMNS, PublishedUser, read_users_csv
from sage_builder.stages.profiles.demographics import PUBLISHED_COLUMNS, Demographics

LABEL_COLUMNS = USERS_COLUMNS


def read_labels_file(path: Path | str, users: dict[str, Demographics], categories: list[str]
                     ) -> dict[str, list[str]]:
    """Banned categories per user id (in the pipeline's category order), users in id order from row 1."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: labels file not found (profiles.labels_file)")
    rows = read_users_csv(path, categories, error=ConfigError)
    if len(rows) < len(users):
        raise ConfigError(f"{path}: {len(rows)} rows for {len(users)} users (row i is user i+1); give a file "
                          f"with a row per user or lower profiles.n_users")
    banned = {}
    for (uid, user), row in zip(users.items(), rows):
        _check_demographics(f"{path}: {row.where}", row, user)
        banned[uid] = [c for c in categories if c in row.banned]
    return banned


def _check_demographics(where: str, row: PublishedUser, user: Demographics) -> None:
    for attr, column in PUBLISHED_COLUMNS.items():
        expected, value = getattr(user, attr), row.demographics[attr]
        if value != expected:
            raise ConfigError(f"{where}: {column} is '{value}' but the sampled user's is '{expected}': the file "
                              f"was made for other users (check profiles.sampler, seed and demographics)")
