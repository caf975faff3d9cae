"""Reading the stage-4 dataset for training: checks that stop the run, and the latent cache."""

from __future__ import annotations

import pytest
import torch

from sage_builder.errors import StageInputError
from sage_builder.stages.train.data import LatentCache, load_preference_data
from sage_builder.stages.train.synthetic import PERMISSIVE_USER, STRICT_USER, write_synthetic_dataset


def test_records_users_and_pairs_are_read(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n_train_pairs=3, n_val_pairs=2, embedding_dim=8)
    data = load_preference_data(root, ["train", "val"])
    assert len(data.splits["train"]) == 6 and len(data.splits["val"]) == 4
    assert data.embedding_dim == 8 and set(data.embeddings) == {STRICT_USER, PERMISSIVE_USER}
    assert data.levels == {5: STRICT_USER, 0: PERMISSIVE_USER}
    rec = data.splits["train"][0]
    assert data.image_bytes(rec.pair_id, "u").startswith(b"\x89PNG")


def test_missing_user_embedding_names_the_user_and_record(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n_train_pairs=2, n_val_pairs=0,
                                   users_without_embedding=(PERMISSIVE_USER,))
    with pytest.raises(StageInputError, match=rf"record {PERMISSIVE_USER}-pair\d+: user {PERMISSIVE_USER} has no "
                                              r"embedding"):
        load_preference_data(root, ["train"])


def test_unknown_split_and_missing_dataset_are_one_line_errors(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n_train_pairs=1, n_val_pairs=0)
    with pytest.raises(StageInputError, match="no split 'test_seen'"):
        load_preference_data(root, ["test_seen"])
    with pytest.raises(StageInputError, match="run stage 4"):
        load_preference_data(tmp_path / "nowhere", ["train"])


def _fake_encode(pixels):
    return torch.nn.functional.avg_pool2d(pixels, 8).mean(dim=1, keepdim=True).repeat(1, 4, 1, 1)


def test_unreadable_image_stops_with_the_record_and_pair(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n_train_pairs=2, n_val_pairs=0, broken_images=("pair0001",))
    data = load_preference_data(root, ["train"])
    cache = LatentCache(tmp_path / "cache", _fake_encode, "vae", 64, torch.float32)
    wanted = [(r.pair_id, v) for r in data.splits["train"] for v in ("u", "s")]
    with pytest.raises(StageInputError, match=r"record 0000001-pair0001, pair pair0001 image_unsafe: unreadable"):
        cache.build(data, wanted, first_record={r.pair_id: r.record_id for r in reversed(data.splits["train"])
                                                if r.user_id == STRICT_USER})


def test_latent_cache_is_content_keyed_and_stores_both_flips(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n_train_pairs=2, n_val_pairs=0)
    data = load_preference_data(root, ["train"])
    calls = []

    def encode(pixels):
        calls.append(pixels.shape[0])
        return _fake_encode(pixels)

    cache = LatentCache(tmp_path / "cache", encode, "vae", 64, torch.float32)
    wanted = [(r.pair_id, v) for r in data.splits["train"] for v in ("u", "s")]
    stats = cache.build(data, wanted)
    assert stats == {"encoded": 4, "reused": 0, "distinct": 4}  # 2 users share each pair's images
    entry = cache.entry("pair0000", "u")
    assert entry["latent"].shape == (4, 8, 8) and torch.allclose(entry["latent_flipped"], entry["latent"].flip(-1))
    assert entry["original_size"].tolist() == [64, 64]
    again = LatentCache(tmp_path / "cache", encode, "vae", 64, torch.float32).build(data, wanted)
    assert again == {"encoded": 0, "reused": 4, "distinct": 4} and sum(calls) == 8  # image + mirror, once each
    other_vae = LatentCache(tmp_path / "cache", encode, "another-vae", 64, torch.float32).build(data, wanted)
    assert other_vae["encoded"] == 4
