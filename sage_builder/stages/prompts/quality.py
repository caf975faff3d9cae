"""The quality report of a prompts run, measured against the published Sage figures."""

from __future__ import annotations

from collections import Counter
from statistics import mean
from typing import Any

from sage_builder.stages.prompts.text import contains_phrase, distinct_n, edit_similarity, words

# Published Sage, as the 300 published pairs in tests/data/published_pairs_sample.csv give it (words
# 30.9 / 29.4, the paper's "about 30"; concept named in p_h 0.097; edit similarity p_h -> p_s 0.426 by
# ``edit_similarity``): a sample, not all of Sage.
PUBLISHED = {"words_unsafe": 30, "words_safe": 29, "concept_named_share": 0.10, "edit_similarity_mean": 0.43}


def _mean(values: list[float]) -> float | None:
    return round(mean(values), 3) if values else None


def acceptance(outcomes: list[tuple[str, str | None]], categories: list[str] | None = None) -> dict[str, Any]:
    """Acceptance overall, per category and per check from (category, reject reason or None) outcomes.

    A check's acceptance is the share of judged pairs (or attempts) it did not reject.
    """
    names = list(categories or []) + sorted({c for c, _ in outcomes} - set(categories or []))

    def rate(accepted: int, total: int) -> dict[str, Any]:
        return {"accepted": accepted, "total": total, "rate": round(accepted / total, 4) if total else None}

    per_category = {c: rate(sum(1 for k, r in outcomes if k == c and r is None), sum(1 for k, _ in outcomes if k == c))
                    for c in names}
    reasons = Counter(r for _, r in outcomes if r is not None)
    total = len(outcomes)
    return {"overall": rate(sum(1 for _, r in outcomes if r is None), total),
            "per_category": per_category,
            "per_check": {reason: {"rejected": n, "acceptance": round(1 - n / total, 4)}
                          for reason, n in sorted(reasons.items())}}


def quality_report(categories: list[str], concepts: list[dict[str, Any]], dropped: list[dict[str, Any]],
                   pairs: list[dict[str, Any]], rejects: list[dict[str, Any]], n: int) -> dict[str, Any]:
    per_category: dict[str, Any] = {}
    for category in categories:
        mine = [p for p in pairs if p["category"] == category]
        per_category[category] = {
            "concepts": sum(c["category"] == category for c in concepts),
            "concepts_llm": sum(c["category"] == category and c["source"] == "llm" for c in concepts),
            "pairs": len(mine),
            "distinct2_unsafe": round(distinct_n([p["prompt_unsafe"] for p in mine], 2), 3),
            "distinct2_safe": round(distinct_n([p["prompt_safe"] for p in mine], 2), 3),
            "rejects": sum(r["category"] == category for r in rejects),
            "slots_without_pair": sum(r["category"] == category and r["final"] for r in rejects),
        }
    words_u = [len(words(p["prompt_unsafe"])) for p in pairs]
    words_s = [len(words(p["prompt_safe"])) for p in pairs]
    named = [contains_phrase(p["prompt_unsafe"], p["concept"]) for p in pairs]
    sims = [edit_similarity(p["prompt_unsafe"], p["prompt_safe"]) for p in pairs]
    by_reason = Counter(f"{r['step']}/{r['reason']}" for r in rejects)
    by_reason_category: dict[str, dict[str, int]] = {}
    for r in rejects:
        slot = by_reason_category.setdefault(r["category"], {})
        key = f"{r['step']}/{r['reason']}"
        slot[key] = slot.get(key, 0) + 1
    slots = len(concepts) * n
    summary = {
        "concepts": len(concepts),
        "pairs": len(pairs),
        "pair_slots": slots,
        "pair_yield": round(len(pairs) / slots, 3) if slots else None,
        "words_unsafe_mean": _mean(words_u),
        "words_safe_mean": _mean(words_s),
        "concept_named_share": _mean([float(x) for x in named]),
        "edit_similarity_mean": _mean(sims),
        "rejected_attempts": len(rejects),
        "slots_without_pair": sum(r["final"] for r in rejects),
    }
    return {
        "summary": summary,
        "published": PUBLISHED,
        "concepts": {"per_category": {c: per_category[c]["concepts"] for c in categories},
                     "dropped_by_reason": dict(Counter(d["reason"] for d in dropped))},
        "per_category": per_category,
        "rejects_by_reason": dict(sorted(by_reason.items())),
        "rejects_by_category": by_reason_category,
        # every judged attempt: a kept pair, or a reject with its first failing check
        "acceptance": acceptance([(p["category"], None) for p in pairs]
                                 + [(r["category"], f"{r['step']}/{r['reason']}") for r in rejects], categories),
        "pairs_per_category_min": min((v["pairs"] for v in per_category.values()), default=0),
    }
