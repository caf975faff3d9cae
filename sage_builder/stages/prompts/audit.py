"""Audit a CSV of prompt pairs from any source with a pipeline's pair checks (``sage prompts check-pairs``).

The CSV has the columns of the published sample (``category, concept, idx, prompt_unsafe,
prompt_safe``; others are ignored). Each pair is judged as stage 2 judges an attempt: p_h's checks,
then p_s's, then near-duplicates against the earlier accepted pairs of the same concept, in file
order. The first failing check is the pair's reason; every check is also run on its own, so the
report says how often each one fires.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_builder.errors import StageInputError
from sage_builder.stages.prompts.quality import acceptance
from sage_builder.stages.prompts.text import copied_share, edit_similarity, scene_similarity
from sage_builder.stages.prompts.validate import PairValidator

COLUMNS = ("category", "concept", "idx", "prompt_unsafe", "prompt_safe")


@dataclass(frozen=True)
class CsvPair:
    line: int
    category: str
    concept: str
    idx: int
    prompt_unsafe: str
    prompt_safe: str


@dataclass
class PairAudit:
    """Outcomes of a file: (category, first reason or None) per pair, rejected lines, check firings."""

    outcomes: list[tuple[str, str | None]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    fires: dict[str, int] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        report = acceptance(self.outcomes)
        report["fires"] = {reason: {"pairs": n, "acceptance": round(1 - n / len(self.outcomes), 4)}
                           for reason, n in sorted(self.fires.items())}
        return report

    def summary_line(self) -> str:
        report = acceptance(self.outcomes)
        parts = [f"{c} {v['accepted']}/{v['total']} ({100 * (v['rate'] or 0):.1f}%)"
                 for c, v in report["per_category"].items()]
        overall = report["overall"]
        return (f"accepted {overall['accepted']}/{overall['total']} ({100 * (overall['rate'] or 0):.1f}%); "
                + ", ".join(parts))


def read_pairs_csv(path: Path) -> list[CsvPair]:
    """The pairs of ``path``; a missing file, unreadable text, a missing column or a bad idx is one line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise StageInputError(f"{path}: lacks the column(s) {', '.join(missing)}; a pairs CSV has the "
                                      f"columns {', '.join(COLUMNS)}")
            return [_pair(path, reader.line_num, row) for row in reader]
    except FileNotFoundError:
        raise StageInputError(f"{path}: no such file; give a CSV with the columns {', '.join(COLUMNS)}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise StageInputError(f"{path}: cannot be read as a UTF-8 CSV ({str(exc).splitlines()[0][:120]})") from None


def _pair(path: Path, line: int, row: dict[str, Any]) -> CsvPair:
    text = {c: " ".join(str(row.get(c) or "").split()) for c in COLUMNS}
    try:
        idx = int(text["idx"])
    except ValueError:
        raise StageInputError(f"{path} line {line}: idx '{text['idx']}' is not an integer") from None
    return CsvPair(line, text["category"], text["concept"], idx, text["prompt_unsafe"], text["prompt_safe"])


def audit_pairs(pairs: list[CsvPair], validator: PairValidator) -> PairAudit:
    audit = PairAudit()
    kept: dict[tuple[str, str], list[tuple[int, set]]] = {}
    for pair in pairs:
        concept = {"concept": pair.concept, "category": pair.category}
        unsafe = [f"unsafe/{r}" for r in validator.prompt_findings(pair.prompt_unsafe, False, "unsafe")]
        safe = [f"safe/{r}" for r in validator.prompt_findings(pair.prompt_safe, False, "safe")]
        safe += [f"safe/{r}" for r in validator.rewrite_findings(pair.prompt_unsafe, pair.prompt_safe, concept)]
        grams = validator.pair_grams(pair.prompt_unsafe, pair.prompt_safe)
        twins = kept.setdefault((pair.category.lower(), pair.concept.lower()), [])
        duplicate = next(((line, score) for line, other in twins
                          if (score := validator.overlap(grams, other)) >= validator.config.near_duplicate_jaccard),
                         None)
        found = unsafe + safe + (["pair/near_duplicate"] if duplicate else [])
        for reason in found:
            audit.fires[reason] = audit.fires.get(reason, 0) + 1
        reason = found[0] if found else None
        audit.outcomes.append((pair.category, reason))
        if reason is None:
            twins.append((pair.line, grams))
        else:
            audit.rejected.append(f"line {pair.line}: {pair.category} / {pair.concept} / {pair.idx}: {reason} "
                                  f"({_detail(reason, pair, validator, duplicate)})")
    return audit


def _detail(reason: str, pair: CsvPair, validator: PairValidator, duplicate: tuple[int, float] | None) -> str:
    config = validator.config
    check = reason.split("/", 1)[1]
    text = pair.prompt_unsafe if reason.startswith("unsafe/") else pair.prompt_safe
    if check.startswith("clip_tokens"):
        return f"{validator.tokens(text)} CLIP tokens > {config.max_clip_tokens}"
    if check == "edit_similarity_high":
        return f"edit similarity {edit_similarity(pair.prompt_unsafe, pair.prompt_safe):.2f} > " \
               f"{config.edit_similarity_max}"
    if check == "copies_unsafe":
        return f"{100 * copied_share(pair.prompt_unsafe, pair.prompt_safe):.0f}% of p_s is one verbatim run of p_h"
    if check == "scene_similarity_low":
        return f"scene similarity {scene_similarity(pair.prompt_unsafe, pair.prompt_safe):.2f} < " \
               f"{config.scene_similarity_min}"
    if check == "near_duplicate" and duplicate:
        return f"n-gram Jaccard {duplicate[1]:.2f} with line {duplicate[0]}"
    return {"refusal": "reads as a refusal", "too_short": "fewer than 5 words",
            "template_residue": "holds a template marker", "copies_example": "copies the template's example",
            "identical": "p_s repeats p_h", "concept_term_in_safe": "p_s names the concept or category"}.get(check, check)
