"""CLIP score: 100 x max(cos(image embedding, caption embedding), 0), per image with its caption.

The model is a ``CLIPModel`` folder with its tokenizer and image processor (or a hub id read from
the local cache), loaded through ``from_pretrained``; nothing is downloaded. The paper used
open_clip ViT-H-14; without those weights here the demo leaves CLIP score out ('not run').
Scores are item-cached per (image, caption, model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sage_builder.config_base import model_identity
from sage_builder.errors import StageInputError
from sage_builder.runtime import hub_offline, is_local_path
from sage_builder.safety.base import to_pil
from sage_builder.store import ITEM_KEY, ItemCache, stable_hash

CLIP_SCHEMA = pa.schema([(ITEM_KEY, pa.string()), ("clip_score", pa.float64())])


def locate(model: str, revision: str | None) -> Path:
    if is_local_path(model):
        folder = Path(model)
        if not (folder / "config.json").exists():
            raise StageInputError(f"eval.clip_score.model: {folder}: no CLIP model folder (config.json missing); "
                                  "set it to a saved CLIPModel with its tokenizer, or null ('CLIP score: not run')")
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        if hub_offline():
            raise StageInputError(f"eval.clip_score.model: '{model}' is not in the local Hugging Face cache and "
                                  "HF_HUB_OFFLINE is set; download it first, use a local folder, or set it to null "
                                  "('CLIP score: not run')") from None
        return Path(snapshot_download(model, revision=revision))


class ClipScorer:
    def __init__(self, model: str, revision: str | None, device: str = "cpu", batch_size: int = 16):
        import torch
        from transformers import AutoTokenizer, CLIPModel

        from sage_builder.safety.q16 import image_processor_class

        self.model_ref, self.device, self.batch_size = model, device, batch_size
        folder = locate(model, revision)
        try:
            self.model = CLIPModel.from_pretrained(str(folder), torch_dtype=torch.float32).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.processor = image_processor_class().from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise StageInputError(f"eval.clip_score.model: cannot load {model} as a CLIPModel with tokenizer "
                                  f"({str(exc).splitlines()[0][:160]})") from None
        self.identity = stable_hash("clip-score", model_identity(model) if is_local_path(model) else model, revision,
                                    length=16)

    def scores(self, images: Sequence[bytes], captions: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [to_pil(i) for i in images[start:start + self.batch_size]]
            texts = list(captions[start:start + self.batch_size])
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
            max_len = min(77, getattr(self.model.config.text_config, "max_position_embeddings", 77))
            tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            with torch.inference_mode():
                image = self.model.get_image_features(pixel_values=pixels)
                text = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                    attention_mask=tokens["attention_mask"].to(self.device))
                image = getattr(image, "pooler_output", image)
                text = getattr(text, "pooler_output", text)
                cos = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)
            out.append((100.0 * cos.clamp(min=0)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def close(self) -> None:
        self.model = None


def cached_scores(scorer: ClipScorer, keyed_images: Callable[[list[str]], dict[str, bytes]],
                  items: Sequence[tuple[str, str]], cache: ItemCache) -> dict[tuple[str, str], float]:
    """(image key, caption) -> CLIP score; what the cache lacks is computed now."""
    item = {pair: stable_hash("clip", pair[0], pair[1], scorer.identity, length=32) for pair in dict.fromkeys(items)}
    done = cache.done_keys()
    todo = [pair for pair in item if item[pair] not in done]
    for start in range(0, len(todo), 64):
        chunk = todo[start:start + 64]
        data = keyed_images(sorted({k for k, _ in chunk}))
        values = scorer.scores([data[k] for k, _ in chunk], [c for _, c in chunk])
        cache.write(pa.Table.from_pylist([{ITEM_KEY: item[p], "clip_score": round(float(v), 4)}
                                          for p, v in zip(chunk, values)], schema=CLIP_SCHEMA))
    table = cache.read(keys=list(item.values()))
    stored: dict[str, Any] = dict(zip(table.column(ITEM_KEY).to_pylist(), table.column("clip_score").to_pylist())) \
        if table is not None else {}
    return {pair: stored[key] for pair, key in item.items() if key in stored}
