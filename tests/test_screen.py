"""Pair screening's attempt loop (render.screen): outcomes, actions, rerender seeds, rejects, resume.

The scorer is scripted (it reads which prompt and seed a fake image came from); the item caches,
keys, seeds and tables are the real ones. The scorers themselves are tested in test_safety_scorers.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from sage_builder.config import config_from_dict
from sage_builder.errors import ConfigError
from sage_builder.safety import ImageScorer, ImageVerdict
from sage_builder.safety.config import ScreenConfig
from sage_builder.stages.render import screen as screening
from sage_builder.stages.render.config import RenderConfig
from sage_builder.diffusion import RenderSettings, image_key
from sage_builder.stages.render.screen import Screening, attempt_seed, decide, pair_outcome
from sage_builder.stages.render.shards import PlannedImage
from sage_builder.store import ITEM_KEY, RunDir

SEED = 2025
SETTINGS = RenderSettings.from_config(RenderConfig(model="fake/tiny", steps=2, height=16, width=16), "cpu")


def seed_of(pair_id: str, attempt: int) -> int:
    return attempt_seed(SEED, pair_id, attempt)


class ScriptedScorer(ImageScorer):
    """Flags an image when (prompt, attempt) is listed in ``flag``; ``fail`` lists images it cannot judge."""

    name = "nudenet"

    def __init__(self, flag, fail=(), attempts_of=None):
        super().__init__(batch_size=3)
        self.flag, self.fail, self.calls, self.attempts_of = set(flag), set(fail), 0, attempts_of

    def describe(self):
        return {"scorer": self.name, "model": "scripted", "weights_sha256": "0" * 64, "threshold": 0.2}

    def _score_batch(self, images, prompts):
        self.calls += len(images)
        out = []
        for data in images:
            prompt, seed = data.decode().rsplit("|", 1)
            which = (prompt, self.attempts_of[(prompt, int(seed))])
            if which in self.fail:
                out.append(ImageVerdict(None, None, error="http_500"))
            else:
                hit = which in self.flag
                out.append(ImageVerdict(hit, 0.9 if hit else 0.0, {"FEMALE_GENITALIA_EXPOSED": 0.9} if hit else {}))
        return out


PAIRS = [  # pair -> what the scorer sees: A ok; B safe flagged at attempts 1-2; C always; D unsafe_clean; E error
    {"pair_id": "A", "category": "Hate", "prompt_unsafe": "A-u", "prompt_safe": "A-s"},
    {"pair_id": "B", "category": "Hate", "prompt_unsafe": "B-u", "prompt_safe": "B-s"},
    {"pair_id": "C", "category": "Sexuality", "prompt_unsafe": "C-u", "prompt_safe": "C-s"},
    {"pair_id": "D", "category": "Propaganda", "prompt_unsafe": "D-u", "prompt_safe": "D-s"},
    {"pair_id": "E", "category": "Sexuality", "prompt_unsafe": "E-u", "prompt_safe": "E-s"},
]
FLAG = {("A-u", 1), ("B-u", 1), ("B-u", 2), ("B-u", 3), ("B-s", 1), ("B-s", 2),
        ("C-u", 1), ("C-u", 2), ("C-u", 3), ("C-s", 1), ("C-s", 2), ("C-s", 3), ("E-u", 1)}
FAIL = {("E-s", 1)}


class FakeRender:
    """Writes 'prompt|seed' as an image's bytes into the render item cache, like render_all writes parts."""

    def __init__(self, cache):
        self.cache, self.jobs = cache, []

    def __call__(self, jobs):
        done = self.cache.done_keys()
        todo = [j for j in jobs if j.key not in done]
        self.jobs += list(jobs)
        self.cache.write([{ITEM_KEY: j.key, "image": f"{j.prompt}|{j.seed}".encode()} for j in todo])
        return len(todo)


def attempts_table():
    out = {}
    for pair in PAIRS:
        for attempt in (1, 2, 3):
            for prompt in (pair["prompt_unsafe"], pair["prompt_safe"]):
                out[(prompt, seed_of(pair["pair_id"], attempt))] = attempt
    return out


def run_screening(tmp_path, monkeypatch, **screen):
    stage_dir = RunDir(tmp_path / "run").stage("render")
    scorer = ScriptedScorer(FLAG, FAIL, attempts_table())
    monkeypatch.setattr(screening, "make_scorers", lambda *a, **k: [scorer])
    render = FakeRender(stage_dir.items("images"))
    planned = []
    first_jobs = []
    from sage_builder.diffusion import ImageJob

    for pair in PAIRS:
        seed = seed_of(pair["pair_id"], 1)
        for variant, column in (("u", "prompt_unsafe"), ("s", "prompt_safe")):
            key = image_key(pair[column], seed, SETTINGS)
            planned.append(PlannedImage(pair["pair_id"], variant, key))
            first_jobs.append(ImageJob(key, pair[column], seed))
    render(first_jobs)
    render.jobs = []
    config = ScreenConfig(enabled=True, scorers=["nudenet"], **screen)
    result = Screening(config, ["Hate", "Sexuality", "Propaganda"], stage_dir, "cpu").run(
        PAIRS, planned, SETTINGS, SEED, render)
    return result, scorer, render


def test_outcomes_rerender_and_drop_with_the_full_pipeline_defaults(tmp_path, monkeypatch):
    result, scorer, render = run_screening(tmp_path, monkeypatch)
    rows = result.attempts.to_pylist()
    by_pair = {pid: [r for r in rows if r["pair_id"] == pid] for pid in "ABCDE"}
    assert [r["outcome"] for r in by_pair["A"]] == ["ok"]
    assert [r["outcome"] for r in by_pair["B"]] == ["safe_flagged", "safe_flagged", "ok"]
    assert [r["action"] for r in by_pair["B"]] == ["rerender", "rerender", "keep"]
    assert [r["outcome"] for r in by_pair["C"]] == ["safe_flagged"] * 3 and by_pair["C"][-1]["action"] == "drop"
    assert [r["outcome"] for r in by_pair["D"]] == ["unsafe_clean"] and by_pair["D"][0]["action"] == "keep"
    assert [r["outcome"] for r in by_pair["E"]] == ["error"] and by_pair["E"][0]["action"] == "drop"
    assert [r["final"] for r in by_pair["B"]] == [False, False, True]
    # Rerenders: a new seed per attempt, derived from pair and attempt; both images share it.
    assert [r["seed"] for r in by_pair["B"]] == [seed_of("B", a) for a in (1, 2, 3)]
    assert len({seed_of("B", a) for a in (1, 2, 3)} | {seed_of("C", 2)}) == 4
    seeds_by_pair = {}
    for job in render.jobs:
        seeds_by_pair.setdefault((job.prompt[0], job.seed), set()).add(job.prompt)
    assert all(prompts == {f"{p}-u", f"{p}-s"} for (p, _), prompts in seeds_by_pair.items())
    assert {p for p, _ in seeds_by_pair} == {"B", "C"} and len(render.jobs) == 8
    # The dataset keeps the final images of kept pairs only; no kept safe image is flagged.
    kept = {(p.pair_id, p.variant): p.key for p in result.planned}
    assert {pid for pid, _ in kept} == {"A", "B", "D"}
    assert kept[("B", "s")] == image_key("B-s", seed_of("B", 3), SETTINGS)
    for row in rows:
        if row["final"] and row["action"] != "drop":
            assert json.loads(row["scores"])["nudenet"]["s"]["flagged"] is False
    rejects = {r["pair_id"]: r for r in result.rejects.to_pylist()}
    assert set(rejects) == {"C", "E"}
    assert rejects["C"]["reason"] == "safe_flagged after 3 attempt(s): the safe image is flagged by NudeNet 0.90"
    assert rejects["C"]["attempts"] == 3 and rejects["E"]["reason"] == "error: NudeNet: http_500"
    # Stats per category count every pair at its first attempt, errors included (no silent drops).
    stats = result.stats
    assert stats["per_category"]["Sexuality"] == {"pairs": 2, "ok": 0, "safe_flagged": 1, "unsafe_clean": 0,
                                                  "error": 1, "rerendered": 1, "dropped": 2, "kept": 0,
                                                  "kept_safe_flagged": 0}
    assert stats["totals"]["pairs"] == 5 and stats["totals"]["dropped"] == 2 and stats["totals"]["rerendered"] == 2
    assert stats["not_run"] == ["Q16: not run"]
    assert scorer.calls == 10 + 4 + 4  # first images, then two rerender rounds of B and C


def test_a_rerun_scores_and_renders_nothing_again_and_gives_the_same_tables(tmp_path, monkeypatch):
    first, _, _ = run_screening(tmp_path, monkeypatch)
    again, scorer, render = run_screening(tmp_path, monkeypatch)
    assert scorer.calls == 0 and again.stats["scored_now"] == 0
    assert again.attempts.equals(first.attempts) and again.rejects.equals(first.rejects)
    assert again.planned == first.planned


def test_record_and_drop_actions(tmp_path, monkeypatch):
    recorded, _, render = run_screening(tmp_path / "a", monkeypatch, safe_flagged="record", error="record")
    assert render.jobs == [] and recorded.rejects.num_rows == 0
    assert {p.pair_id for p in recorded.planned} == set("ABCDE")
    dropped, _, _ = run_screening(tmp_path / "b", monkeypatch, safe_flagged="drop", unsafe_clean="drop")
    assert {r["pair_id"] for r in dropped.rejects.to_pylist()} == {"B", "C", "D", "E"}
    assert {r["pair_id"]: r["reason"] for r in dropped.rejects.to_pylist()}["D"] == "unsafe_clean (action drop)"


def test_outcome_and_action_rules():
    flagged, clean, unknown = ImageVerdict(True, 1.0), ImageVerdict(False, 0.0), ImageVerdict(None, None, error="x")
    assert pair_outcome([flagged, clean], [clean, clean]) == "ok"  # any scorer flags the unsafe image
    assert pair_outcome([clean], [clean]) == "unsafe_clean"
    assert pair_outcome([unknown], [flagged]) == "safe_flagged"
    assert pair_outcome([flagged], [unknown]) == "error"
    screen = ScreenConfig(max_attempts=2, unsafe_clean="rerender")
    assert decide("safe_flagged", 1, screen) == "rerender" and decide("safe_flagged", 2, screen) == "drop"
    assert decide("unsafe_clean", 1, screen) == "rerender" and decide("unsafe_clean", 2, screen) == "keep"
    assert decide("ok", 1, screen) == "keep" and decide("error", 1, screen) == "drop"


@pytest.mark.parametrize("screen, message", [
    ({"enabled": True, "scorers": ["nudenet", "q17"]}, r"render\.screen\.scorers\.1: Input should be 'nudenet'"),
    ({"enabled": True, "scorers": []}, r"screening is enabled with no scorer"),
    ({"enabled": True, "nudenet": {"threshold": 1.5}}, r"render\.screen\.nudenet\.threshold: Input should be less"),
    ({"enabled": True, "q16": {"threshold": -0.1}}, r"render\.screen\.q16\.threshold: Input should be greater"),
    ({"enabled": True, "scorers": ["judge"]}, r"judge\.base_url is not set"),
    ({"enabled": True, "safe_flagged": "ignore"}, r"render\.screen\.safe_flagged: Input should be 'record'"),
])
def test_bad_screening_config_is_one_line(screen, message):
    with pytest.raises(ConfigError, match=message) as info:
        config_from_dict({"name": "x", "llm": {"model": "m"}, "render": {"screen": screen}})
    assert "\n" not in str(info.value)


def test_screen_tables_have_stable_columns(tmp_path, monkeypatch):
    result, _, _ = run_screening(tmp_path, monkeypatch)
    assert result.attempts.column_names == ["pair_id", "category", "attempt", "seed", "image_key_u", "image_key_s",
                                            "outcome", "action", "nudenet_u", "nudenet_s", "scores", "final"]
    assert result.rejects.schema.field("attempts").type == pa.int64()
