"""Step 3 of stage 1: one embedding per user, through the shared profile -> statement -> embedding
path (``sage_builder.user_embedding``), saved item by item (key: the statement and the model)."""

from __future__ import annotations

import numpy as np

from sage_builder.errors import SageError
from sage_builder.progress import progress
from sage_builder.stages.profiles.demographics import Demographics
from sage_builder.stages.profiles.labelling import allowed_of
from sage_builder.store import ItemCache, stable_hash
from sage_builder.user_embedding import EmbeddingSetup, load_statement_template, statement_messages


def embed_users(setup: EmbeddingSetup, users: dict[str, Demographics], banned: dict[str, list[str]],
                categories: list[str], cache: ItemCache, batch_size: int) -> tuple[dict[str, np.ndarray], int]:
    """(vector per user id, dimension). Users with the same statement share one computation."""
    setup = setup.resolved()
    template = load_statement_template(setup.template)
    messages = {uid: statement_messages(template, u.as_dict(), banned[uid], allowed_of(banned[uid], categories))
                for uid, u in users.items()}
    identity = setup.identity()
    keys = {uid: stable_hash("embedding", m, identity) for uid, m in messages.items()}
    vec_by_key = _cached_vectors(cache, set(keys.values()))
    todo_keys = list(dict.fromkeys(keys[uid] for uid in users if keys[uid] not in vec_by_key))
    if todo_keys:
        first_uid: dict[str, str] = {}
        for uid, key in keys.items():
            first_uid.setdefault(key, uid)
        convs = [messages[first_uid[k]] for k in todo_keys]
        embedder = setup.embedder()
        with cache.writer(flush_rows=batch_size) as writer, \
                progress(total=len(convs), desc="user embeddings", unit="user") as bar:
            for start, vecs in embedder.embed_batches(convs, batch_size):
                for key, vec in zip(todo_keys[start:start + batch_size], vecs):
                    vec_by_key[key] = vec
                    writer.add({"item_key": key, "embedding": vec.tolist()})
                bar.update(len(vecs))
        embedder.close()
    dims = {v.shape[0] for v in vec_by_key.values()}
    if len(dims) != 1:
        raise SageError(f"embeddings of different sizes {sorted(dims)} in {cache.directory}; rerun with --force")
    return {uid: vec_by_key[keys[uid]] for uid in users}, dims.pop()


def _cached_vectors(cache: ItemCache, keys: set[str]) -> dict[str, np.ndarray]:
    done = cache.read(keys=keys)
    if done is None:
        return {}
    return {key: np.asarray(vec, dtype=np.float32)
            for key, vec in zip(done.column("item_key").to_pylist(), done.column("embedding").to_pylist())}
