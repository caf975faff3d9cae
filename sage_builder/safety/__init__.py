"""Safety scorers: one small interface (:mod:`.base`) and the scorers the paper evaluates with.

``make_scorers(settings, names, categories, device)`` builds the named scorers from a section of
:class:`~sage_builder.safety.config.ScreenConfig` settings: ``nudenet`` (exposed genitalia, NudeNet
3.0.8), ``q16`` (inappropriate, CLIP ViT-L/14 + Q16's prompts), ``open_nsfw`` (Yahoo's model, an
extra sexual-content score) and ``judge`` (a vision-language model over an OpenAI-compatible API).
Heavy imports (onnxruntime, torch, transformers) happen only when a scorer is built. The
``eval`` extra installs what they need: ``pip install 'sage-builder[eval]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sage_builder.errors import StageInputError
from sage_builder.safety.base import ImageInput, ImageScorer, ImageVerdict
from sage_builder.safety.config import SCORER_NAMES

if TYPE_CHECKING:
    from sage_builder.safety.config import ScreenConfig

__all__ = ["ImageInput", "ImageScorer", "ImageVerdict", "SCORER_NAMES", "make_scorer", "make_scorers",
           "not_run_notes"]

# How reports name each scorer ("Q16: not run").
DISPLAY = {"nudenet": "NudeNet", "q16": "Q16", "open_nsfw": "open_nsfw", "judge": "VLM judge"}


def make_scorer(name: str, settings: ScreenConfig, categories: Sequence[str], device: str = "cpu",
                section: str = "render.screen") -> ImageScorer:
    """Build one scorer; its one-line errors name the keys of ``section`` (e.g. ``eval.scorers``)."""
    try:
        if name == "nudenet":
            from sage_builder.safety.nudenet import NudeNetScorer

            return NudeNetScorer(settings.nudenet, device)
        if name == "q16":
            from sage_builder.safety.q16 import Q16Scorer

            return Q16Scorer(settings.q16, device)
        if name == "open_nsfw":
            from sage_builder.safety.open_nsfw import OpenNSFWScorer

            return OpenNSFWScorer(settings.open_nsfw, device)
        if name == "judge":
            from sage_builder.safety.judge import JudgeScorer

            return JudgeScorer(settings.judge, list(categories), device)
    except StageInputError as exc:
        if section == "render.screen":
            raise
        raise StageInputError(str(exc).replace("render.screen.", f"{section}.")) from None
    raise StageInputError(f"{section}.scorers: unknown scorer '{name}' (one of {', '.join(SCORER_NAMES)})")


def make_scorers(settings: ScreenConfig, names: Sequence[str], categories: Sequence[str], device: str = "cpu",
                 section: str = "render.screen") -> list[ImageScorer]:
    """The named scorers, in order; if one cannot be built, those already built are closed first."""
    built: list[ImageScorer] = []
    try:
        for name in names:
            built.append(make_scorer(name, settings, categories, device, section))
    except BaseException:
        for scorer in built:
            scorer.close()
        raise
    return built


def not_run_notes(names: Sequence[str]) -> list[str]:
    """'Q16: not run' (etc.) for each paper scorer that was turned off, for every report."""
    return [f"{DISPLAY[n]}: not run" for n in ("nudenet", "q16") if n not in names]


def describe_all(scorers: Sequence[ImageScorer]) -> dict[str, dict[str, Any]]:
    return {s.name: s.describe() for s in scorers}
