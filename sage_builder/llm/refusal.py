"""Phrase patterns of LLM refusals: a refusal is never a prompt, however well-formed its JSON."""

from __future__ import annotations

import re

_PATTERNS = [
    r"\bI(?:'m| am)?\s+(?:sorry|afraid)\b",
    r"\bI\s+(?:can(?:no|')?t|cannot|won'?t|will not|am not able to|'m not able to|am unable to|'m unable to)\s+"
    r"(?:help|assist|comply|create|generate|provide|write|produce|fulfil+|do that|engage|support)",
    r"\bas an (?:ai|language model|assistant)\b",
    r"\b(?:not|isn'?t) (?:appropriate|something I can)\b",
    r"\bagainst (?:my|the|our) (?:guidelines|policy|policies|principles)\b",
    r"\bviolates? (?:my|the|our|content) (?:guidelines|policy|policies)\b",
    r"\bI must (?:decline|refuse)\b",
    r"\bI (?:have to|need to) decline\b",
    r"\bunable to (?:comply|fulfil+|assist|help) with\b",
]
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in _PATTERNS), re.IGNORECASE)


def looks_like_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text or ""))
