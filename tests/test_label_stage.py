"""Stage 4 (label) on synthetic stage 1-3 outputs (sage_builder.testing.fake_run)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sage_builder.stages import get_stage
from sage_builder.stages.base import run_stage
from sage_builder.stages.label.card import split_card
from sage_builder.stages.label.dataset import hub_split
from sage_builder.testing.fake_run import make_fake_run

CATS = 7
K = 2
N = 4  # pairs_per_concept in the fake run: idx 4 is the test index


def read_split(dataset: Path, config: str, split: str):
    files = sorted((dataset / "data" / config).glob(f"{hub_split(split)}-*.parquet"))
    assert files, f"no {config}/{split} shards"
    return [row for f in files for row in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    run, config = make_fake_run(tmp_path_factory.mktemp("label") / "run", n_users=20, pairs_per_category=K)
    manifest = run_stage(get_stage("label"), config, run)
    return run, config, manifest, run.stage("label").file("dataset")


def test_split_sizes_follow_user_roles(labelled):
    run, _, manifest, dataset = labelled
    profiles = pq.read_table(run.stage("profiles").file("profiles.parquet")).to_pylist()
    roles = Counter(p["split"] for p in profiles)
    seen = sum(p["test_seen"] for p in profiles)
    per_user = CATS * K * 2
    expected = {"train": roles["train"] * per_user, "val": roles["val"] * per_user,
                "test_seen": seen * per_user, "test_unseen": roles["test_unseen"] * per_user}
    assert manifest.stats["records"] == expected
    for split, n in expected.items():
        assert len(read_split(dataset, "preferences", split)) == n


def test_records_follow_the_label_rule_and_split_indices(labelled):
    run, _, _, dataset = labelled
    pairs = {p["pair_id"]: p for p in pq.read_table(run.stage("prompts").file("pairs.parquet")).to_pylist()}
    by_pair = defaultdict(list)
    for split in ("train", "val", "test_seen", "test_unseen"):
        for rec in read_split(dataset, "preferences", split):
            banned = rec["category"] in rec["banned"]
            if banned:
                assert (rec["chosen_variant"], rec["rejected_variant"], rec["reason"]) == ("s", "u", "banned")
            else:
                assert rec["chosen_variant"] == rec["caption_variant"] != rec["rejected_variant"]
                assert rec["reason"] == "allowed"
            pair = pairs[rec["pair_id"]]
            assert rec["caption"] == (pair["prompt_unsafe"] if rec["caption_variant"] == "u" else pair["prompt_safe"])
            assert (rec["idx"] == N) == split.startswith("test")
            by_pair[(split, rec["user_id"], rec["pair_id"])].append(rec["caption_variant"])
    assert all(sorted(v) == ["s", "u"] for v in by_pair.values())


def test_user_roles_test_seen_and_reference(labelled):
    run, _, _, dataset = labelled
    profiles = pq.read_table(run.stage("profiles").file("profiles.parquet")).to_pylist()
    users = {s: {r["user_id"] for r in read_split(dataset, "preferences", s)}
             for s in ("train", "val", "test_seen", "test_unseen")}
    reference = [p["user_id"] for p in profiles if p["split"] == "reference"]
    assert reference and not any(reference[0] in u for u in users.values())
    assert users["test_seen"] <= users["train"]
    assert users["test_seen"] == {p["user_id"] for p in profiles if p["test_seen"]}
    assert not users["val"] & users["train"] and not users["test_unseen"] & users["train"]
    for user in users["train"]:
        records = [r for r in read_split(dataset, "preferences", "train") if r["user_id"] == user]
        assert Counter(r["category"] for r in records) == Counter({c: 2 * K for c in {r["category"] for r in records}})
        assert len({r["pair_id"] for r in records}) == CATS * K  # K distinct pairs per category


def test_pair_use_is_spread_evenly(labelled):
    _, _, manifest, dataset = labelled
    uses = Counter((r["category"], r["pair_id"]) for r in read_split(dataset, "preferences", "train")
                   if r["caption_variant"] == "u")
    per_cat = defaultdict(list)
    for (cat, _), n in uses.items():
        per_cat[cat].append(n)
    # 18 train users x 2 pairs over 9 train pairs per category (3 concepts x idx 1-3): 4 uses each.
    assert all(len(v) == 9 and max(v) - min(v) <= 1 for v in per_cat.values())
    assert manifest.stats["pair_uses"]["train"] == [4, 4]


def test_labelling_is_deterministic(labelled, tmp_path):
    run, config, _, dataset = labelled
    again, _ = make_fake_run(tmp_path / "again", n_users=20, pairs_per_category=K)
    run_stage(get_stage("label"), config, again)
    for split in ("train", "test_seen"):
        assert read_split(again.stage("label").file("dataset"), "preferences", split) == \
            read_split(dataset, "preferences", split)


def test_load_dataset_reads_all_three_configs(labelled, tmp_path):
    datasets = pytest.importorskip("datasets")
    _, _, manifest, dataset = labelled
    prefs = datasets.load_dataset(str(dataset), cache_dir=str(tmp_path / "cache"))
    assert set(prefs) == {"train", "validation", "test_seen", "test_unseen"}  # the Hub name of val
    assert prefs["train"].num_rows == manifest.stats["records"]["train"]
    pairs = datasets.load_dataset(str(dataset), "pairs", cache_dir=str(tmp_path / "cache"))["train"]
    first = pairs[0]
    assert first["image_unsafe"].size == (16, 16) and first["image_safe"].mode == "RGB"
    users = datasets.load_dataset(str(dataset), "users", cache_dir=str(tmp_path / "cache"))["train"]
    assert users.num_rows == 21 and len(users[0]["embedding"]) == 8
    assert users.features["embedding"].length == 8


def test_card_front_matter_and_body(labelled):
    _, config, manifest, dataset = labelled
    meta, body = split_card((dataset / "README.md").read_text())
    assert meta["license"] == config.publish.license
    assert {c["config_name"] for c in meta["configs"]} == {"preferences", "pairs", "users"}
    assert "not-for-all-audiences" in meta["tags"]
    assert meta["sage_builder"]["categories"] == config.categories
    assert "Content warning" in body and "Intended use" in body and "Lineage" in body
    assert str(manifest.stats["records"]["train"]) in body
    assert "a safe scene" not in body and "unsafe scene" not in body  # no prompt text in the card


def test_card_merge_keeps_human_sections(tmp_path):
    run, config = make_fake_run(tmp_path / "run", n_users=12, pairs_per_category=1)
    run_stage(get_stage("label"), config, run)
    card = run.stage("label").file("dataset/README.md")
    meta, body = split_card(card.read_text())
    edited = body.replace("<!-- sage-builder:begin intended-use -->",
                          "## Notes from the team\n\nKeep this paragraph.\n\n<!-- sage-builder:begin intended-use -->")
    edited = re.sub(r"(<!-- sage-builder:begin counts -->\n).*?(<!-- sage-builder:end counts -->)",
                    r"\1stale 999999\n\2", edited, flags=re.S)
    import yaml

    meta["extra_gated_prompt"] = "Agree to the terms"
    meta["pretty_name"] = "My Sage"
    card.write_text("---\n" + yaml.safe_dump(meta) + "---\n" + edited)
    config.label.pairs_per_category = 2
    run_stage(get_stage("label"), config, run)
    meta2, body2 = split_card(card.read_text())
    assert "Keep this paragraph." in body2 and body2.index("Notes from the team") < body2.index("Intended use")
    assert meta2["extra_gated_prompt"] == "Agree to the terms" and meta2["pretty_name"] == "My Sage"
    assert "999999" not in body2 and "| train | " in body2
    assert body2.count("<!-- sage-builder:begin counts -->") == 1


def test_shards_roll_over_and_pairs_can_be_skipped(tmp_path):
    run, config = make_fake_run(tmp_path / "run", n_users=20, pairs_per_category=1, image_bytes=False,
                                include_pairs=False, shard_rows={"preferences": 100, "pairs": 10, "users": 8})
    manifest = run_stage(get_stage("label"), config, run)
    dataset = run.stage("label").file("dataset")
    train = sorted(p.name for p in (dataset / "data/preferences").glob("train-*.parquet"))
    assert manifest.stats["records"]["train"] == 18 * 14 == 252
    assert train == ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    assert [pq.ParquetFile(dataset / "data/preferences" / f).metadata.num_rows for f in train] == [100, 100, 52]
    assert sorted(p.name for p in (dataset / "data/users").iterdir()) == [
        "train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    assert not (dataset / "data/pairs").exists()
    meta, _ = split_card((dataset / "README.md").read_text())
    assert {c["config_name"] for c in meta["configs"]} == {"preferences", "users"}


def test_published_split_sizes_at_1000_users(tmp_path):
    run, config = make_fake_run(tmp_path / "run", n_users=1000, concepts_per_category=5, pairs_per_concept=10,
                                pairs_per_category=3, image_bytes=False, include_pairs=False)
    manifest = run_stage(get_stage("label"), config, run)
    assert manifest.stats["records"] == {"train": 37_800, "val": 2_100, "test_seen": 2_100, "test_unseen": 2_100}
    assert manifest.stats["users"] == {"train": 900, "val": 50, "test_seen": 50, "test_unseen": 50}
