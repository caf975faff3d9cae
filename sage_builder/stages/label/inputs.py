"""What stage 4 reads from stages 1-3, checked before anything is written.

``check_inputs`` proves the three upstream outputs belong to one run; ``rendered_pairs`` is the
pair table the dealing draws from (only pairs with both images); ``open_profiles`` and
``users_per_split`` read ``profiles.parquet`` in batches, so memory does not grow with users.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sage_builder.errors import StageInputError
from sage_builder.stages.label.assign import record_splits
from sage_builder.stages.label.dataset import USER_COLUMNS
from sage_builder.store import RunDir, file_sha256

PAIR_COLUMNS = ["pair_id", "concept_id", "category", "concept", "idx", "prompt_unsafe", "prompt_safe"]
PROFILE_COLUMNS = ["user_id", *USER_COLUMNS, "split", "test_seen"]
ROLES = {"train", "val", "test_unseen", "reference"}
UPSTREAM = (("profiles", ["profiles.parquet"]), ("prompts", ["pairs.parquet"]), ("render", ["index.parquet"]))


def check_inputs(run: RunDir) -> None:
    """Upstream outputs exist, match their manifests, and come from one run (lineage hashes agree)."""
    manifests = {}
    for stage, files in UPSTREAM:
        stage_dir = run.stage(stage)
        manifest = stage_dir.read_manifest()
        if manifest is None:
            raise StageInputError(f"{stage_dir.manifest_path}: missing, so stage '{stage}' is not done; "
                                  f"run `{run.stage_command(stage)}` first")
        for rel in files:
            path = stage_dir.file(rel)
            if not path.exists():
                raise StageInputError(f"{path}: missing (stage '{stage}' output); rerun "
                                      f"`{run.stage_command(stage, '--force')}`")
            recorded = manifest.outputs.get(rel)
            if recorded is not None and file_sha256(path) != recorded.sha256:
                raise StageInputError(f"{path}: sha256 does not match {stage_dir.manifest_path} (the file comes "
                                      f"from another run or was edited); restore it or rerun `{run.stage_command(stage)}`")
        manifests[stage] = manifest
    for stage, manifest in manifests.items():
        for upstream, recorded in manifest.inputs.items():
            if upstream in manifests and manifests[upstream].content_hash() != recorded:
                raise StageInputError(
                    f"{run.stage(upstream).manifest_path}: hash {manifests[upstream].content_hash()[:12]} is not the "
                    f"input {recorded[:12]} that {run.stage(stage).manifest_path} was built from (outputs of "
                    f"different runs are mixed); rerun `{run.stage_command(stage)}`")


def rendered_pairs(run: RunDir) -> pa.Table:
    """Rows of pairs.parquet whose two images are both rendered, in file order, with ``row``."""
    pairs_path = run.stage("prompts").file("pairs.parquet")
    pairs = pq.read_table(pairs_path, columns=PAIR_COLUMNS)
    pairs = pairs.append_column("row", pa.array(range(pairs.num_rows), pa.int64()))
    index = pq.read_table(run.stage("render").file("index.parquet"), columns=["pair_id", "variant"])
    have: dict[str, set[str]] = defaultdict(set)
    for pid, variant in zip(index.column("pair_id").to_pylist(), index.column("variant").to_pylist()):
        have[pid].add(variant)
    mask = [have.get(pid) == {"u", "s"} for pid in pairs.column("pair_id").to_pylist()]
    return pairs.filter(pa.array(mask, pa.bool_()))


def open_profiles(path: Path) -> pq.ParquetFile:
    """``profiles.parquet`` opened for batch reads, with the columns labelling needs."""
    # Without pre-buffering, pyarrow decodes a row group page by page: stage 1 may write all users
    # (embeddings included) as one row group, and memory must not grow with it.
    profiles = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    missing = [c for c in PROFILE_COLUMNS + ["embedding", "allowed", "level"] if c not in profiles.schema_arrow.names]
    if missing:
        raise StageInputError(f"{path}: missing column(s) {', '.join(missing)}; rerun stage 1")
    return profiles


def users_per_split(profiles: pq.ParquetFile, path: Path) -> Counter[str]:
    """Users contributing to each record split (a first pass, so shard names can say "-of-MMMMM")."""
    counts: Counter[str] = Counter()
    row = 0
    for batch in profiles.iter_batches(batch_size=8192, columns=["user_id", "split", "test_seen"]):
        for uid, role, seen in zip(*(batch.column(c).to_pylist() for c in range(3))):
            if role not in ROLES:
                raise StageInputError(f"{path} row {row} (user {uid}): split '{role}' is not one of "
                                      f"{', '.join(sorted(ROLES))}; rerun stage 1")
            for split in record_splits(role, bool(seen)):
                counts[split] += 1
            row += 1
    return counts
