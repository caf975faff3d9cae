"""Screening: score both images of every rendered pair, and act on pairs whose images contradict
their prompts (``render.screen``).

Outcomes per pair and attempt: ``ok`` (the unsafe image is flagged, the safe one clean),
``safe_flagged`` (the safe image is flagged: for every user who bans the category it would be the
*chosen* image), ``unsafe_clean`` (the adversarial prompt rendered harmlessly), ``error`` (a scorer
could not judge an image). An image is flagged when any configured scorer flags it. Actions:
``record`` keeps the pair, ``drop`` moves it to ``rejects.parquet``, ``rerender`` renders both
images again from a new seed (derived from the pair id and the attempt, the same for both) up to
``max_attempts``; a pair still ``safe_flagged`` after its last attempt is dropped, one still
``unsafe_clean`` is kept. So with the defaults no kept pair has a safe image a scorer flags.

Scores are item-cached in ``RUN/render/_items/scores`` (key: image key + scorer identity, which
holds the weights' sha256 and thresholds), rerendered images in ``_items/images`` like the first
ones, so an interrupted screening resumes where it stopped and gives the same tables.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sage_builder.progress import progress
from sage_builder.safety import DISPLAY, ImageVerdict, make_scorers, not_run_notes
from sage_builder.safety.config import ScreenConfig
from sage_builder.stages.render.shards import PlannedImage
from sage_builder.store import ITEM_KEY, ItemCache, stable_hash

log = logging.getLogger("sage.render.screen")

OUTCOMES = ("ok", "safe_flagged", "unsafe_clean", "error")
# Images handed to the scorers per unit of work (one item-cache part of scores each).
IMAGES_PER_UNIT = 64

SCORE_SCHEMA = pa.schema([
    (ITEM_KEY, pa.string()), ("image_key", pa.string()), ("scorer", pa.string()), ("flagged", pa.bool_()),
    ("score", pa.float64()), ("classes", pa.string()), ("error", pa.string()), ("extra", pa.string()),
])


def attempt_seed(global_seed: int, pair_id: str, attempt: int) -> int:
    """The seed of a pair's ``attempt``: attempt 1 is render's own pair seed, later ones are new."""
    from sage_builder.diffusion import pair_seed

    if attempt == 1:
        return pair_seed(global_seed, pair_id)
    digest = hashlib.sha256(f"{global_seed}:render:{pair_id}:attempt:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def score_key(image_key: str, scorer_identity: str) -> str:
    return stable_hash("screen-score", image_key, scorer_identity, length=32)


def pair_outcome(unsafe: Sequence[ImageVerdict], safe: Sequence[ImageVerdict]) -> str:
    """One pair's outcome from every scorer's verdict on its two images."""
    if any(v.flagged for v in safe):
        return "safe_flagged"  # decided whatever an erroring scorer would have said
    if any(v.flagged is None for v in (*unsafe, *safe)):
        return "error"
    return "ok" if any(v.flagged for v in unsafe) else "unsafe_clean"


def decide(outcome: str, attempt: int, screen: ScreenConfig) -> str:
    """keep | drop | rerender for a pair's outcome at ``attempt``."""
    if outcome == "ok":
        return "keep"
    action = {"safe_flagged": screen.safe_flagged, "unsafe_clean": screen.unsafe_clean,
              "error": screen.error}[outcome]
    if action == "rerender":
        if attempt < screen.max_attempts:
            return "rerender"
        return "drop" if outcome == "safe_flagged" else "keep"
    return "drop" if action == "drop" else "keep"


def _verdict_row(image_key: str, scorer: str, identity: str, verdict: ImageVerdict) -> dict[str, Any]:
    return {ITEM_KEY: score_key(image_key, identity), "image_key": image_key, "scorer": scorer,
            "flagged": verdict.flagged, "score": verdict.score,
            "classes": json.dumps(verdict.classes, sort_keys=True), "error": verdict.error,
            "extra": json.dumps(verdict.extra, sort_keys=True, default=str)}


def _row_verdict(row: dict[str, Any]) -> ImageVerdict:
    return ImageVerdict(row["flagged"], row["score"], json.loads(row["classes"]), row["error"],
                        json.loads(row["extra"]))


def image_bytes(images: ItemCache, keys: Sequence[str]) -> dict[str, bytes]:
    """Encoded bytes of ``keys`` from the render item cache, read part by part (first part wins)."""
    wanted = pa.array(sorted(set(keys)), pa.string())
    found: dict[str, bytes] = {}
    for part in images.parts():
        table = pq.read_table(part, columns=[ITEM_KEY, "image"])
        table = table.filter(pc.is_in(table.column(ITEM_KEY), value_set=wanted))
        for key, data in zip(table.column(ITEM_KEY).to_pylist(), table.column("image").to_pylist()):
            found.setdefault(key, data)
        if len(found) == len(wanted):
            break
    return found


@dataclass
class ScoreWorker:
    """Scores units of image keys with every configured scorer and writes one scores part per unit.

    Picklable: the scorers load in ``start`` on the worker's device, so a worker process or a Ray
    actor holds its own copies (multi-GPU through the executor, as render does).
    """

    screen: ScreenConfig
    categories: list[str]
    images_dir: Path
    scores_dir: Path
    device: str = "cpu"
    writer_id: str = "w0"
    # CPU torch threads while scoring (render.threads, else the cores the slot reserves): Q16's
    # scores can differ in the last digit with another thread count.
    threads: int | None = None
    # In this process the driver hands over the scorers it already loaded (and closes them itself).
    scorers: list[Any] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.owns_scorers = not self.scorers

    def start(self, slot: Any = None) -> None:
        if slot is not None:
            self.device, self.writer_id = slot.device, f"score-{slot.tag}"
            self.threads = self.threads or slot.cpus
        if not self.scorers:
            self.scorers = make_scorers(self.screen, self.screen.scorers, self.categories, self.device)

    def run(self, unit: Sequence[tuple[str, str]], report: Callable[[int], None] | None = None) -> int:
        """``unit``: (image key, scorer name) to score; returns the verdicts written."""
        import torch

        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            return self._run(unit, report)
        finally:
            torch.set_num_threads(previous)

    def _run(self, unit: Sequence[tuple[str, str]], report: Callable[[int], None] | None) -> int:
        by_scorer: dict[str, list[str]] = defaultdict(list)
        for key, name in unit:
            by_scorer[name].append(key)
        data = image_bytes(ItemCache(self.images_dir), [key for key, _ in unit])
        rows = []
        for scorer in self.scorers:
            keys = by_scorer.get(scorer.name, [])
            present = [k for k in keys if k in data]
            verdicts = scorer.score([data[k] for k in present]) if present else []
            rows += [_verdict_row(k, scorer.name, scorer.identity, v) for k, v in zip(present, verdicts)]
            rows += [_verdict_row(k, scorer.name, scorer.identity, ImageVerdict(None, None, error="image missing"))
                     for k in keys if k not in data]
        ItemCache(self.scores_dir).write(pa.Table.from_pylist(rows, schema=SCORE_SCHEMA), self.writer_id)
        if report is not None:
            report(len({key for key, _ in unit}))
        return len(rows)

    def close(self) -> None:
        if self.owns_scorers:
            for scorer in self.scorers:
                scorer.close()
            self.scorers = []


RunUnits = Callable[[list[list[tuple[str, str]]], ScoreWorker, Callable[[int], None]], None]


def run_in_process(units: list[list[tuple[str, str]]], worker: ScoreWorker, report: Callable[[int], None]) -> None:
    worker.start()
    try:
        for unit in units:
            worker.run(unit, report)
    finally:
        worker.close()


def on_executor(executor: Any) -> RunUnits:
    """Score units on the stage's executor (render's workers: one per GPU, or Ray actors)."""
    def run(units: list[list[tuple[str, str]]], worker: ScoreWorker, report: Callable[[int], None]) -> None:
        def describe(unit: list[tuple[str, str]]) -> str:
            return f"a unit of {len({k for k, _ in unit})} image(s) to score (first image key {unit[0][0]})"

        for _ in executor.map_units(units, worker, describe, report):
            pass
    return run


@dataclass
class ScreenResult:
    planned: list[PlannedImage]  # the kept pairs' final images, in pairs order
    attempts: pa.Table  # screening.parquet: one row per pair and attempt
    rejects: pa.Table  # rejects.parquet: dropped pairs with the reason
    stats: dict[str, Any]


class Screening:
    """The attempt loop of one render stage run: score, decide, rerender, until every pair is settled."""

    def __init__(self, screen: ScreenConfig, categories: list[str], stage_dir: Any, device: str,
                 run_units: RunUnits = run_in_process, in_process: bool = True, workers: int = 1,
                 threads: int | None = None):
        self.screen = screen
        self.categories = categories
        self.stage_dir = stage_dir
        self.device = device
        self.run_units = run_units
        self.in_process = in_process  # scoring runs in this process: reuse the scorers loaded here
        self.workers = max(1, workers)
        self.threads = threads
        self.images = stage_dir.items("images")
        self.scores = stage_dir.items("scores")
        self.identities: dict[str, str] = {}
        self.described: dict[str, dict[str, Any]] = {}
        self.loaded: list[Any] = []
        self.scored_now = 0

    def describe_scorers(self) -> None:
        """Load the scorers in this process for their identities (weights sha256, thresholds): the
        score keys. Scoring in this process reuses them; other workers load their own."""
        self.loaded = make_scorers(self.screen, self.screen.scorers, self.categories,
                                   self.device if self.in_process else "cpu")
        for scorer in self.loaded:
            self.identities[scorer.name] = scorer.identity
            self.described[scorer.name] = scorer.describe()
        if not self.in_process:
            self.close()

    def close(self) -> None:
        for scorer in self.loaded:
            scorer.close()
        self.loaded = []

    def verdicts(self, image_keys: Sequence[str]) -> dict[tuple[str, str], ImageVerdict]:
        """(image key, scorer) -> verdict for every configured scorer; what is not cached is scored now."""
        wanted = {score_key(k, self.identities[n]): (k, n) for k in dict.fromkeys(image_keys) for n in self.identities}
        done = self.scores.done_keys()
        todo = [pair for key, pair in wanted.items() if key not in done]
        if todo:
            n_images = len({k for k, _ in todo})
            # Every worker gets work when there are few images; at most IMAGES_PER_UNIT per unit.
            per_unit = len(self.identities) * max(1, min(IMAGES_PER_UNIT, -(-n_images // self.workers)))
            units = [todo[i:i + per_unit] for i in range(0, len(todo), per_unit)]
            bar = progress(total=n_images, desc="screen", unit="img")
            worker = ScoreWorker(self.screen, self.categories, self.images.directory, self.scores.directory,
                                 self.device, threads=self.threads, scorers=list(self.loaded))
            try:
                self.run_units(units, worker, bar.update)
            finally:
                bar.close()
            self.scored_now += n_images
        table = self.scores.read(keys=list(wanted))
        out = {}
        for row in (table.to_pylist() if table is not None else []):
            out[wanted[row[ITEM_KEY]]] = _row_verdict(row)
        return out

    def run(self, pairs: list[dict[str, Any]], planned: list[PlannedImage], settings: Any, global_seed: int,
            render_jobs: Callable[[list[Any]], int]) -> ScreenResult:
        """Screen ``pairs`` (their first images in ``planned``); ``render_jobs`` renders new attempts."""
        self.describe_scorers()
        try:
            return self._run(pairs, planned, settings, global_seed, render_jobs)
        finally:
            self.close()

    def _run(self, pairs: list[dict[str, Any]], planned: list[PlannedImage], settings: Any, global_seed: int,
             render_jobs: Callable[[list[Any]], int]) -> ScreenResult:
        from sage_builder.diffusion import ImageJob, image_key

        keys = {(p.pair_id, p.variant): p.key for p in planned}
        current = {pair["pair_id"]: (keys[(pair["pair_id"], "u")], keys[(pair["pair_id"], "s")]) for pair in pairs}
        seeds = {pair["pair_id"]: attempt_seed(global_seed, pair["pair_id"], 1) for pair in pairs}
        active = list(pairs)
        rows: list[dict[str, Any]] = []
        settled: dict[str, tuple[int, str, str]] = {}  # pair -> (attempt, outcome, action)
        rendered_again = 0
        for attempt in range(1, self.screen.max_attempts + 1):
            found = self.verdicts([k for p in active for k in current[p["pair_id"]]])
            again = []
            for pair in active:
                pid = pair["pair_id"]
                ku, ks = current[pid]
                unsafe = [found[(ku, n)] for n in self.identities]
                safe = [found[(ks, n)] for n in self.identities]
                outcome = pair_outcome(unsafe, safe)
                action = decide(outcome, attempt, self.screen)
                rows.append(self._row(pair, attempt, seeds[pid], ku, ks, unsafe, safe, outcome, action))
                if action == "rerender":
                    again.append(pair)
                else:
                    settled[pid] = (attempt, outcome, action)
            if not again:
                break
            jobs = []
            for pair in again:
                pid = pair["pair_id"]
                seeds[pid] = attempt_seed(global_seed, pid, attempt + 1)
                ku = image_key(pair["prompt_unsafe"], seeds[pid], settings)
                ks = image_key(pair["prompt_safe"], seeds[pid], settings)
                current[pid] = (ku, ks)
                jobs.append(ImageJob(ku, pair["prompt_unsafe"], seeds[pid]))
                if ks != ku:
                    jobs.append(ImageJob(ks, pair["prompt_safe"], seeds[pid]))
            log.info("screen: attempt %d: %d pairs rendered again with new seeds", attempt + 1, len(again))
            rendered_again += render_jobs(jobs)
            active = again
        return self._result(pairs, rows, settled, current, rendered_again)

    def _row(self, pair: dict[str, Any], attempt: int, seed: int, ku: str, ks: str, unsafe: list[ImageVerdict],
             safe: list[ImageVerdict], outcome: str, action: str) -> dict[str, Any]:
        row: dict[str, Any] = {"pair_id": pair["pair_id"], "category": pair.get("category"), "attempt": attempt,
                               "seed": seed, "image_key_u": ku, "image_key_s": ks, "outcome": outcome,
                               "action": action}
        for name, vu, vs in zip(self.identities, unsafe, safe):
            row[f"{name}_u"] = vu.score
            row[f"{name}_s"] = vs.score
        detail = {n: {"u": _plain(vu), "s": _plain(vs)} for n, vu, vs in zip(self.identities, unsafe, safe)}
        row["scores"] = json.dumps(detail, sort_keys=True, default=str)
        return row

    def _result(self, pairs: list[dict[str, Any]], rows: list[dict[str, Any]],
                settled: dict[str, tuple[int, str, str]], current: dict[str, tuple[str, str]],
                rendered_again: int) -> ScreenResult:
        last_attempt = {pid: attempt for pid, (attempt, _, _) in settled.items()}
        for row in rows:
            row["final"] = row["attempt"] == last_attempt[row["pair_id"]]
        planned, rejects = [], []
        for pair in pairs:
            pid = pair["pair_id"]
            attempt, outcome, action = settled[pid]
            if action == "drop":
                final = next(r for r in rows if r["pair_id"] == pid and r["final"])
                rejects.append({"pair_id": pid, "category": pair.get("category"), "outcome": outcome,
                                "attempts": attempt, "reason": drop_reason(outcome, attempt, final, self.screen),
                                "scores": final["scores"]})
                continue
            ku, ks = current[pid]
            planned += [PlannedImage(pid, "u", ku), PlannedImage(pid, "s", ks)]
        stats = screening_stats(rows, pairs, self.screen, self.categories)
        # Short figures first: `sage status` shows the start of a stage's stats.
        stats = {"enabled": True, "scorer_names": stats.pop("scorer_names"), "not_run": stats.pop("not_run"),
                 "totals": stats.pop("totals"), "rendered_again": rendered_again, "scored_now": self.scored_now,
                 **stats, "scorers": self.described}
        reject_schema = pa.schema([("pair_id", pa.string()), ("category", pa.string()), ("outcome", pa.string()),
                                   ("attempts", pa.int64()), ("reason", pa.string()), ("scores", pa.string())])
        return ScreenResult(planned, pa.Table.from_pylist(rows), pa.Table.from_pylist(rejects, schema=reject_schema),
                            stats)


def _plain(verdict: ImageVerdict) -> dict[str, Any]:
    return {"flagged": verdict.flagged, "score": verdict.score, "classes": verdict.classes, "error": verdict.error,
            **({"extra": verdict.extra} if verdict.extra else {})}


def drop_reason(outcome: str, attempt: int, final: dict[str, Any], screen: ScreenConfig) -> str:
    scores = json.loads(final["scores"])
    if outcome == "safe_flagged":
        by = [f"{DISPLAY[n]} {v['s']['score']:.2f}" for n, v in scores.items() if v["s"]["flagged"]]
        tries = f"after {attempt} attempt(s)" if screen.safe_flagged == "rerender" else "(action drop)"
        return f"safe_flagged {tries}: the safe image is flagged by {', '.join(by)}"
    if outcome == "error":
        errors = [f"{DISPLAY[n]}: {v[side]['error']}" for n, v in scores.items() for side in ("u", "s")
                  if v[side]["flagged"] is None]
        return f"error: {errors[0] if errors else 'a scorer could not judge an image'}"
    return f"{outcome} (action drop)"


def screening_stats(rows: list[dict[str, Any]], pairs: list[dict[str, Any]], screen: ScreenConfig,
                    categories: list[str]) -> dict[str, Any]:
    """Outcome counts per category: at the first attempt, and of the settled (final) attempt."""
    first: dict[str, Counter[str]] = defaultdict(Counter)
    final: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        category = row["category"] or "(none)"
        if row["attempt"] == 1:
            first[category][row["outcome"]] += 1
        if row["final"]:
            final[category][row["action"] if row["action"] == "drop" else "kept"] += 1
            final[category][f"final_{row['outcome']}"] += 1
            final[category]["rerendered"] += int(row["attempt"] > 1)
    order = [c for c in categories if c in first] + sorted(c for c in first if c not in categories)
    per_category = {c: {"pairs": sum(first[c].values()), **{o: first[c][o] for o in OUTCOMES},
                        "rerendered": final[c]["rerendered"], "dropped": final[c]["drop"], "kept": final[c]["kept"],
                        "kept_safe_flagged": final[c]["final_safe_flagged"] if final[c]["kept"] else 0}
                    for c in order}
    totals = {k: sum(v[k] for v in per_category.values()) for k in
              ("pairs", *OUTCOMES, "rerendered", "dropped", "kept")}
    return {"enabled": True, "scorer_names": list(screen.scorers), "not_run": not_run_notes(screen.scorers),
            "actions": {"safe_flagged": screen.safe_flagged, "unsafe_clean": screen.unsafe_clean,
                        "error": screen.error, "max_attempts": screen.max_attempts},
            "per_category": per_category, "totals": totals}


def check_screen(screen: ScreenConfig, categories: list[str]) -> None:
    """Bad screening input as one line, before anything is written: missing packages or weights, a
    judge endpoint that does not answer. Cheap: no model is loaded."""
    if not screen.enabled:
        return
    for name in screen.scorers:
        if name == "nudenet":
            from sage_builder.safety.nudenet import nudenet_files

            nudenet_files()
        elif name == "q16":
            from sage_builder.safety.q16 import load_prompts, locate_clip

            locate_clip(screen.q16)
            load_prompts(screen.q16)
        elif name == "open_nsfw":
            from sage_builder.safety.open_nsfw import OpenNSFWScorer

            OpenNSFWScorer(screen.open_nsfw).close()
        elif name == "judge":
            from sage_builder.safety.judge import JudgeScorer

            JudgeScorer(screen.judge, categories).close()


def screen_rendered(ctx: Any, pairs: list[dict[str, Any]], planned: list[PlannedImage], settings: Any,
                    executor: Any, render_jobs: Callable[[list[Any]], int]) -> list[PlannedImage]:
    """Stage 3's screening step: screen every pair, write ``screening.parquet`` and ``rejects.parquet``,
    record the scorers and the outcomes; returns the images of the kept pairs (their final attempts)."""
    from sage_builder.executors.local import InProcessExecutor

    pairs_path = ctx.input_path("prompts", "pairs.parquet")
    category: dict[str, str] = {}
    if "category" in pq.read_schema(pairs_path).names:
        table = pq.read_table(pairs_path, columns=["pair_id", "category"])
        category = dict(zip(table.column("pair_id").to_pylist(), table.column("category").to_pylist()))
    pairs = [{**pair, "category": category.get(pair["pair_id"])} for pair in pairs]
    screening = Screening(ctx.config.render.screen, list(ctx.config.categories), ctx.stage_dir, executor.device,
                          on_executor(executor), in_process=isinstance(executor, InProcessExecutor),
                          workers=executor.workers_for(len(pairs) * 2), threads=ctx.config.render.threads)
    result = screening.run(pairs, planned, settings, ctx.config.seed, render_jobs)
    ctx.write_table("screening.parquet", result.attempts)
    ctx.write_table("rejects.parquet", result.rejects)
    for name, described in result.stats["scorers"].items():
        ctx.models[f"screen_{name}"] = described
    ctx.stats["screen"] = result.stats
    totals = result.stats["totals"]
    log.info("screen: %d pairs: %d ok, %d safe_flagged, %d unsafe_clean, %d error at the first render; "
             "%d rendered again, %d dropped%s", totals["pairs"], totals["ok"], totals["safe_flagged"],
             totals["unsafe_clean"], totals["error"], totals["rerendered"], totals["dropped"],
             "".join(f"; {note}" for note in result.stats["not_run"]))
    return result.planned
