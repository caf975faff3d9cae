"""Stand-ins for tests and benchmarks of stage 2: a small real CLIP tokenizer and a scripted model.

Not used by the stage itself. The tokenizer is a genuine ``CLIPTokenizer`` (byte-level BPE code
path) whose merges spell whole words of a given vocabulary, so prompts of ~30 words count ~30
tokens as with the real one; other words fall back to characters.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sage_builder.models.clip_tokenizer import byte_alphabet
from sage_builder.stages.prompts.text import content_words

SCENE_WORDS = ("crowded harbor market quiet chapel neon alley rainy square misty forest old factory rooftop "
               "garden subway platform desert road snowy village marble hall").split()
SUBJECT_WORDS = ("figures soldiers children strangers workers dancers travelers elders clerks sailors "
                 "students neighbors").split()
MOOD_WORDS = "tense somber glowing shadowy frantic silent cold golden dim stark".split()
STYLE_WORDS = "oil painting photograph charcoal sketch film still poster watercolor engraving".split()
NOVEL_CONCEPTS = ("motif", "emblem", "chant", "pamphlet", "effigy", "graffiti", "banner", "mural", "costume",
                  "ritual", "slogan", "uniform")
FILLER = ("a an the in at of with under beneath near by on and their faces lit from above while stand "
          "gathered around wide shot gaze toward each other calm friendly table flowers light strong "
          "dramatic scene style rendered as picnic sharing food conversation peaceful").split()


def save_word_clip_tokenizer(root: Path, vocabulary: Iterable[str] = ()) -> Path:
    """Write ``root/tokenizer`` and ``root/tokenizer_2`` (a diffusers-style model folder); return root."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for char in byte_alphabet():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    known = sorted({w.lower() for w in [*SCENE_WORDS, *SUBJECT_WORDS, *MOOD_WORDS, *STYLE_WORDS, *FILLER,
                                        *vocabulary] if w.isalpha()})
    for word in known:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in vocab:
                merges.append((left, right))
                vocab[merged] = len(vocab)
            left = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    root = Path(root)
    for sub in ("tokenizer", "tokenizer_2"):
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77,
                                  pad_token="<|endoftext|>")
        tokenizer.save_pretrained(folder)
    return root


def _pick(options: list[str], *parts: Any) -> str:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return options[digest[0] % len(options)]


def _field(text: str, label: str) -> str:
    for line in text.splitlines():
        if line.startswith(label + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def scripted_reply(messages: list[dict[str, str]], schema_name: str, seed: int) -> dict[str, Any]:
    """A plausible, obedient, deterministic reply to one of stage 2's templates (as a JSON object)."""
    user = messages[-1]["content"]
    category = _field(user, "Category")
    if schema_name == "ConceptDescription":
        concept = _field(user, "Concept")
        return {"description": f"images that depict {concept} in the sense of {category.lower()}", "refused": False}
    if schema_name == "ConceptExpansion":
        count = int(user.split("List ", 1)[1].split()[0])
        names = [f"{category.lower()} {NOVEL_CONCEPTS[(seed + i) % len(NOVEL_CONCEPTS)]}" for i in range(count)]
        return {"concepts": [{"concept": name, "description": f"a scripted {category.lower()} concept"}
                             for name in names], "refused": False}
    if "Variation:" in user:
        concept = _field(user, "Concept").split(" (", 1)[0]
        words = [_pick(SCENE_WORDS, seed, k) for k in range(3)]
        return {"prompt": (f"A {_pick(MOOD_WORDS, seed, 'm')} {words[0]} {words[1]} where "
                           f"{_pick(SUBJECT_WORDS, seed, 's')} stand gathered around {words[2]} beneath "
                           f"{_pick(MOOD_WORDS, seed, 'l')} light, a {content_words(concept) and 'dramatic'} "
                           f"scene rendered as {_pick(STYLE_WORDS, seed, 'st')} style"),
                "refused": False}
    prompt = _field(user, "Prompt")
    rewritten = prompt.replace(" stand gathered around ", " share food calmly at ")
    return {"prompt": rewritten.replace("dramatic", "peaceful"), "refused": False}


def chat_script(latency_s: float = 0.0, fault: Any = None):  # type: ignore[no-untyped-def]
    """A ``ChatServer`` script answering stage 2's requests like :func:`scripted_reply`.

    ``fault(user_text, schema_name)`` may return a scripted behaviour (Status, Refusal, ...) to
    send instead; every answer comes after ``latency_s`` seconds (a stand-in for generation time).
    """
    from sage_builder.testing.chat_server import Delay

    def script(request: dict[str, Any], call: int) -> Any:
        schema_name = request["response_format"]["json_schema"]["name"]
        behaviour = fault(request["messages"][-1]["content"], schema_name) if fault else None
        if behaviour is None:
            behaviour = json.dumps(scripted_reply(request["messages"], schema_name, int(request.get("seed") or 0)))
        return Delay(latency_s, behaviour) if latency_s else behaviour

    return script
