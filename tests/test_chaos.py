"""A small chaos run (benchmarks/chaos.py): SIGKILL stage 2 at seeded random points, rerun, compare.

The full table (N >= 20 per stage, stages 1-4 and 6) is in BENCHMARKS.md; `make chaos` reruns it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import chaos  # noqa: E402


@pytest.mark.slow
def test_killed_prompts_stage_reruns_to_the_reference(tmp_path: Path) -> None:
    (result,) = chaos.run_chaos(tmp_path, ["prompts"], kills=2, seed=1)
    assert result.kills + result.finished_first >= 2
    assert result.different == 0, result.what_differed
    assert result.identical == result.kills


def test_json_is_compared_without_timings_and_cache_accounting() -> None:
    a = {"rows": 3, "seconds": 1.5, "llm": {"from_cache": 0, "usage": {"requests": 4}}, "finished_at": 1.0}
    b = {"rows": 3, "seconds": 9.0, "llm": {"from_cache": 4}, "finished_at": 2.0}
    assert chaos.drop_timings(a) == chaos.drop_timings(b)
    assert chaos.drop_timings({"rows": 3}) != chaos.drop_timings({"rows": 4})
