"""Clusters of user embeddings, the reference users of strictness levels 0-5, the t-SNE map,
and the users' split roles (SPEC 1.4)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sage_builder.errors import ConfigError

if TYPE_CHECKING:
    from sage_builder.stages.profiles.config import ProfilesConfig

PUBLISHED_LEVEL_BANS = [0, 2, 4, 4, 5, 7]


@dataclass
class Clusters:
    labels: np.ndarray            # one cluster id per sampled user
    reference: list[int]          # per cluster (in cluster id order), index of the user nearest its centre
    k: int
    standardized: np.ndarray
    predict_extra: np.ndarray     # cluster ids for the extra rows (the permissive user)
    extra_standardized: np.ndarray


def cluster_users(embeddings: np.ndarray, k: int, seed: int, extra: np.ndarray | None = None) -> Clusters:
    """k-means on standardized embeddings of the sampled users; ``extra`` rows are only assigned."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import StandardScaler

    from threadpoolctl import threadpool_limits

    n = embeddings.shape[0]
    k = min(k, n)
    scaler = StandardScaler().fit(embeddings)
    z = scaler.transform(embeddings)
    # One thread: the same clusters on every machine, and no OpenMP spinning on a busy CPU.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # Identical users give identical embeddings; fewer distinct points than k is reported below.
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(z)
    labels = km.labels_.astype(int)
    reference = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if members.size == 0:
            continue
        dist = np.linalg.norm(z[members] - km.cluster_centers_[c], axis=1)
        reference.append(int(members[int(np.argmin(dist))]))
    extra_z = scaler.transform(extra) if extra is not None and len(extra) else np.zeros((0, z.shape[1]))
    extra_labels = km.predict(extra_z).astype(int) if len(extra_z) else np.zeros(0, dtype=int)
    return Clusters(labels=labels, reference=reference, k=k, standardized=z, predict_extra=extra_labels,
                    extra_standardized=extra_z)


@dataclass
class Placement:
    """Step 4's result for every user (the sampled ones, then the permissive one if any)."""

    ids: list[str]
    clusters: Clusters
    cluster_of: dict[str, int]
    levels: dict[str, int]
    split_of: dict[str, str]
    seen: set[str]
    sizes: dict[str, int]
    coords: np.ndarray
    perplexity: float


def place_users(vectors: dict[str, np.ndarray], sampled_ids: list[str], permissive_id: str | None,
                banned: dict[str, list[str]], pc: ProfilesConfig, seed: int) -> Placement:
    """Clusters, reference users and levels, splits and the t-SNE map; the permissive user is only
    assigned to a cluster, is level 0 and has the split role ``reference``."""
    extra_ids = [permissive_id] if permissive_id else []
    ids = sampled_ids + extra_ids
    matrix = np.stack([vectors[uid] for uid in ids])
    clusters = cluster_users(matrix[:len(sampled_ids)], pc.n_clusters, seed, matrix[len(sampled_ids):])
    cluster_of = dict(zip(sampled_ids, clusters.labels.tolist()))
    cluster_of.update(zip(extra_ids, clusters.predict_extra.tolist()))
    candidates = [(uid, 0) for uid in extra_ids] + \
        [(uid, len(banned[uid])) for uid in (sampled_ids[i] for i in clusters.reference)]
    levels = assign_levels(candidates)
    if pc.splits.method == "psalign":
        split_of, seen, sizes = published_splits(pc.splits.file, sampled_ids, pc.n_users)
    else:
        sizes = split_sizes(len(sampled_ids), pc.splits.train, pc.splits.val, pc.splits.test_unseen,
                            pc.splits.test_seen)
        split_of, seen = assign_splits(sampled_ids, sizes, seed)
    split_of.update({uid: "reference" for uid in extra_ids})
    coords, perplexity = tsne_map(np.vstack([clusters.standardized, clusters.extra_standardized]), seed,
                                  pc.tsne_perplexity)
    return Placement(ids, clusters, cluster_of, levels, split_of, seen, sizes, coords, perplexity)


def assign_levels(candidates: list[tuple[str, int]]) -> dict[str, int]:
    """(user_id, n banned) of the reference users, permissive first -> level by strictness.

    Ties keep the permissive user lowest and then go by user id."""
    order = sorted(enumerate(candidates), key=lambda item: (item[1][1], item[0] != 0, item[1][0]))
    return {uid: level for level, (_, (uid, _)) in enumerate(order)}


def split_sizes(n: int, train: int, val: int, test_unseen: int, test_seen: int) -> dict[str, int]:
    """Scale the 1,000-user split sizes to ``n`` users; every non-zero split keeps at least one user."""
    total = train + val + test_unseen
    if total <= 0:
        raise ConfigError("profiles.splits: train + val + test_unseen must be > 0")
    sizes = {}
    for name, share in (("val", val), ("test_unseen", test_unseen)):
        size = int(math.floor(n * share / total + 0.5))
        if share > 0 and n >= 3:
            size = max(1, size)
        sizes[name] = size
    sizes["train"] = n - sizes["val"] - sizes["test_unseen"]
    if sizes["train"] < 0 or (train > 0 and sizes["train"] == 0):
        raise ConfigError(f"profiles.n_users: {n} users are too few for the splits "
                          f"{train}/{val}/{test_unseen}; use at least 3 users")
    seen = int(math.floor(n * test_seen / total + 0.5))
    if test_seen > 0 and sizes["train"] > 0:
        seen = max(1, seen)
    sizes["test_seen"] = min(seen, sizes["train"])
    return sizes


def assign_splits(user_ids: list[str], sizes: dict[str, int], seed: int) -> tuple[dict[str, str], set[str]]:
    """A deterministic shuffle of the users (by the seed only) cut into val, test_unseen, train;
    test_seen is drawn from train by the same generator."""
    rng = np.random.default_rng([seed, 0x5E1175])  # a fixed stream id: splits never share draws
    order = [user_ids[i] for i in rng.permutation(len(user_ids))]
    split = {}
    cut_val = sizes["val"]
    cut_unseen = cut_val + sizes["test_unseen"]
    for pos, uid in enumerate(order):
        split[uid] = "val" if pos < cut_val else "test_unseen" if pos < cut_unseen else "train"
    train = sorted(uid for uid in user_ids if split[uid] == "train")
    seen = {train[i] for i in rng.choice(len(train), size=sizes["test_seen"], replace=False)} if train else set()
    return split, seen


PUBLISHED_SPLIT_ROLES = ("val", "test_seen", "test_unseen")


def read_published_splits(path: Path, n_users: int) -> dict[str, str]:
    """``user_id -> role`` from a ``user_id,split`` CSV; every user it names must be one of 1..n_users."""
    import csv

    if not path.exists():
        raise ConfigError(f"profiles.splits.file: {path} not found (the shipped one is profiles/published_splits.csv)")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not {"user_id", "split"} <= set(reader.fieldnames or []):
            raise ConfigError(f"{path}: needs the columns user_id,split")
        roles = {}
        for line, row in enumerate(reader, 2):
            uid, role = row["user_id"], row["split"]
            if role not in PUBLISHED_SPLIT_ROLES:
                raise ConfigError(f"{path}: line {line}: split '{role}' (known: {', '.join(PUBLISHED_SPLIT_ROLES)})")
            if not (uid.isdigit() and 1 <= int(uid) <= n_users):
                raise ConfigError(f"{path}: line {line}: user {uid} ({role}) does not exist: profiles.n_users is "
                                  f"{n_users}; psalign splits need the users they name (the published 1,000), or "
                                  f"use profiles.splits: seeded")
            roles[uid] = role
    return roles


def published_splits(path: Path, user_ids: list[str], n_users: int
                     ) -> tuple[dict[str, str], set[str], dict[str, int]]:
    """(split per user, the test_seen users, sizes): the file's val and test_unseen users, every other
    user train, and its test_seen users taken from train. Users not in ``user_ids`` (excluded) are skipped."""
    roles = read_published_splits(path, n_users)
    split = {uid: roles.get(uid, "train") for uid in user_ids}
    seen = {uid for uid in user_ids if split[uid] == "test_seen"}
    split.update({uid: "train" for uid in seen})
    sizes = {name: sum(v == name for v in split.values()) for name in ("val", "test_unseen", "train")}
    sizes["test_seen"] = len(seen)
    return split, seen, sizes


def tsne_map(z: np.ndarray, seed: int, perplexity: float) -> tuple[np.ndarray, float]:
    """2-D t-SNE of all users; perplexity is capped below the number of users."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = z.shape[0]
    if n < 4:
        return np.zeros((n, 2)), 0.0
    used = float(min(perplexity, max(1.0, (n - 1) / 3)))
    with threadpool_limits(limits=1):
        coords = TSNE(n_components=2, perplexity=used, random_state=seed, init="pca").fit_transform(z)
    return coords, used


def plot_tsne(path: Path, coords: np.ndarray, clusters: list[int], reference: dict[int, int],
              title: str) -> None:
    """Users coloured by cluster, reference users ringed and labelled with their level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    cmap = plt.get_cmap("tab10")
    labels = np.asarray(clusters)
    for c in sorted(set(clusters)):
        pts = coords[labels == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=14, color=cmap(c % 10), label=f"cluster {c}", alpha=0.8)
    for idx, level in sorted(reference.items(), key=lambda kv: kv[1]):
        x, y = coords[idx]
        ax.scatter([x], [y], s=140, facecolors="none", edgecolors="black", linewidths=1.5)
        ax.annotate(f"L{level}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9, weight="bold")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8, markerscale=1.2)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
