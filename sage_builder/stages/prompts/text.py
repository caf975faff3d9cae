"""Word-level text measures of prompts and concepts: normal forms, edit similarity, n-gram overlap.

Plain standard-library code (``re``, ``difflib``): the measures are simple on purpose, so that a
reject reason can be checked by hand from the two prompts it names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or as is are be into onto over under its their his her "
    "this that these those it".split())


def singular(word: str) -> str:
    """A crude English singular key, enough to fold 'zombies'/'zombie' and 'atrocities'/'atrocity'.

    Words ending in -ie and -ies both map to -y ('zombie' -> 'zomby'): a key, never shown.
    """
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("ie"):
        return word[:-2] + "y"
    if len(word) > 4 and word.endswith(("sses", "ches", "shes", "xes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words (hyphens and punctuation split words)."""
    return _WORD.findall(text.lower())


def normal_words(text: str) -> list[str]:
    return [singular(w) for w in words(text)]


def normal_form(text: str) -> str:
    """Case, whitespace, punctuation and plural forms folded: 'Troll-Farms ' -> 'troll farm'."""
    return " ".join(normal_words(text))


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words, ignoring case and plurals."""
    needle = normal_form(phrase)
    return bool(needle) and f" {needle} " in f" {normal_form(text)} "


def content_words(text: str, min_len: int = 4) -> list[str]:
    return [w for w in normal_words(text) if w not in STOPWORDS and len(w) >= min_len]


def edit_similarity(a: str, b: str) -> float:
    """Word-level similarity of two prompts, 0 (nothing shared) .. 1 (same words in the same order)."""
    return difflib.SequenceMatcher(None, words(a), words(b), autojunk=False).ratio()


def copied_share(source: str, copy: str) -> float:
    """Share of ``copy``'s words that are one verbatim run of ``source``'s words (1.0: a fragment of it)."""
    a, b = words(source), words(copy)
    if not a or not b:
        return 0.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b)).size / len(b)


def scene_words(text: str) -> set[str]:
    """Content words cut to a 5-letter stem ('soldiers'/'soldier', 'illuminated'/'illumination')."""
    return {w[:5] for w in normal_words(text) if w not in STOPWORDS and len(w) >= 3}


def scene_similarity(a: str, b: str) -> float:
    """How much of a scene a rewrite keeps: the larger of word-order similarity (``edit_similarity``)
    and the share of scene words kept (shared stems / the smaller stem set).

    A rewrite that restructures the sentence but keeps the subjects and setting scores high;
    0 means no word in order and no scene word in common.
    """
    a_words, b_words = scene_words(a), scene_words(b)
    kept = len(a_words & b_words) / min(len(a_words), len(b_words)) if a_words and b_words else 0.0
    return max(edit_similarity(a, b), kept)


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = normal_words(text)
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of ``texts`` (the usual distinct-n diversity measure)."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = words(text)
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0
