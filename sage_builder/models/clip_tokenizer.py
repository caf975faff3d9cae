"""The real CLIP BPE tokenizer, rebuilt offline from the vocabulary file that open_clip ships.

SD1.5/SDXL use OpenAI CLIP's byte-level BPE (49,408 tokens). Its merges file
(``bpe_simple_vocab_16e6.txt.gz``) is inside the ``open_clip_torch`` wheel on PyPI; rebuilding the
vocabulary from it the way CLIP does gives the same token ids as the hub tokenizers, so the
77-token check of stage 2 counts exactly what the image model will see, even when the configured
image model is a tiny stand-in with a character tokenizer.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sage_builder.errors import SageError

OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 bytes, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def fetch_bpe(dest: Path) -> Path:
    """Download the open_clip wheel (no dependencies) with pip and extract the BPE merges file."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp,
               OPEN_CLIP_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("open_clip_torch-*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise SageError(f"could not download {OPEN_CLIP_WHEEL} for the CLIP vocabulary ({last}); "
                            f"pass --bpe with a local bpe_simple_vocab_16e6.txt.gz")
        with zipfile.ZipFile(wheels[0]) as wheel:
            target = dest / Path(BPE_MEMBER).name
            target.write_bytes(wheel.read(BPE_MEMBER))
    return target


def save_clip_tokenizer(out: Path, bpe: Path | None = None) -> Path:
    """Write ``out/tokenizer`` and ``out/tokenizer_2`` (both CLIP ViT-L's BPE, as in SDXL); return out."""
    from transformers import CLIPTokenizer

    out = Path(out)
    bpe = bpe or fetch_bpe(out / "_bpe")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1] if len(line.split()) == 2]
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    for sub in ("tokenizer", "tokenizer_2"):
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77,
                                  pad_token="<|endoftext|>")
        tokenizer.save_pretrained(out / sub)
    return out
