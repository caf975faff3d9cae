"""Q16: is an image inappropriate? CLIP ViT-L/14 image features against two learned prompts.

The classifier is Q16's (and the PSA evaluation's): the projected CLIP image embedding and the two
prompt rows (row 0 "non inappropriate", row 1 "inappropriate"), both L2-normalised;
logits = 100 x features @ rows.T; softmax; the label is the argmax. The CLIP weights load through
transformers' ``from_pretrained`` from a local folder or the local HF cache; only the vision tower
and its projection are loaded. Missing weights stop the stage with one line: turning Q16 off is
done by leaving it out of ``scorers``, and reports then say "Q16: not run".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sage_builder.config_base import model_identity
from sage_builder.errors import StageInputError
from sage_builder.runtime import hub_offline, is_local_path, resolve_device
from sage_builder.safety.base import ImageInput, ImageScorer, ImageVerdict, to_pil, weights_sha256
from sage_builder.safety.config import Q16Settings

log = logging.getLogger("sage.safety")

WEIGHT_SUFFIXES = (".safetensors", ".bin")
OFF_HINT = "or leave q16 out of render.screen.scorers to turn it off explicitly (reports then say 'Q16: not run')"


def locate_clip(settings: Q16Settings) -> Path:
    """The folder holding the CLIP weights; one line naming the key and the fix when there is none."""
    ref = settings.clip_model
    if is_local_path(ref):
        folder = Path(ref).expanduser()
        if not (folder / "config.json").exists():
            raise StageInputError(f"render.screen.q16.clip_model: {folder}: no CLIP model folder (config.json "
                                  f"missing); point it at a saved CLIPModel, {OFF_HINT}")
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            folder = Path(snapshot_download(ref, revision=settings.revision, local_files_only=True))
        except LocalEntryNotFoundError:
            if hub_offline():
                raise StageInputError(f"render.screen.q16.clip_model: '{ref}' is not in the local Hugging Face "
                                      f"cache and HF_HUB_OFFLINE is set; download it first (`hf download {ref}`), "
                                      f"set it to a local folder, {OFF_HINT}") from None
            folder = Path(snapshot_download(ref, revision=settings.revision))
    if not any(f.suffix in WEIGHT_SUFFIXES for f in folder.iterdir()):
        raise StageInputError(f"render.screen.q16.clip_model: {folder} holds no weights file (*.safetensors); "
                              f"download the model again, {OFF_HINT}")
    return folder


def load_prompts(settings: Q16Settings) -> np.ndarray:
    path = Path(settings.prompts)
    if not path.exists():
        raise StageInputError(f"render.screen.q16.prompts: {path} does not exist; use the shipped "
                              f"sage_builder/safety/data/q16_prompts_vit_l14.npy, {OFF_HINT}")
    prompts = np.load(path, allow_pickle=False)
    if prompts.ndim != 2 or prompts.shape[0] != 2:
        raise StageInputError(f"render.screen.q16.prompts: {path} has shape {prompts.shape}, expected (2, D): "
                              f"row 0 'non inappropriate', row 1 'inappropriate'")
    return prompts


def q16_probabilities(image_embeds: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """P(non inappropriate), P(inappropriate) per image: Q16's normalised dot products x 100, softmax."""
    features = image_embeds.astype(np.float64)
    rows = prompts.astype(np.float64)
    features = features / np.linalg.norm(features, axis=-1, keepdims=True)
    rows = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    logits = 100.0 * features @ rows.T
    logits -= logits.max(axis=-1, keepdims=True)
    expd = np.exp(logits)
    return expd / expd.sum(axis=-1, keepdims=True)


class Q16Scorer(ImageScorer):
    name = "q16"
    flags = "inappropriate"

    def __init__(self, settings: Q16Settings, device: str = "cpu"):
        super().__init__(settings.batch_size)
        import torch
        import transformers
        from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

        self.settings = settings
        self.device = resolve_device(device if settings.device == "auto" else settings.device,
                                     "render.screen.q16.device")
        self.folder = locate_clip(settings)
        self.prompts = load_prompts(settings)
        raw = CLIPConfig.get_config_dict(str(self.folder))[0]
        if raw.get("model_type") == "clip":
            full = CLIPConfig.from_pretrained(str(self.folder))
            vision = full.vision_config
            vision.projection_dim = full.projection_dim  # a CLIPModel checkpoint keeps it at the top level
        else:
            vision = CLIPVisionConfig.from_pretrained(str(self.folder))
        if vision.projection_dim != self.prompts.shape[1]:
            raise StageInputError(f"render.screen.q16.prompts: {settings.prompts} holds {self.prompts.shape[1]}-d "
                                  f"prompts, but {settings.clip_model} projects images to {vision.projection_dim} "
                                  f"dims; use the prompts learned for this CLIP")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the text tower's weights are skipped on purpose
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(
                str(self.folder), config=vision, torch_dtype=torch.float32).to(self.device).eval()
            self.processor = _image_processor(self.folder)
        finally:
            transformers.logging.set_verbosity(verbosity)
        files = sorted(f for f in self.folder.iterdir() if f.suffix == ".safetensors") or \
            sorted(f for f in self.folder.iterdir() if f.suffix in WEIGHT_SUFFIXES)
        self.weights_sha256 = weights_sha256(*files)
        self.prompts_sha256 = weights_sha256(Path(settings.prompts))

    def describe(self) -> dict[str, Any]:
        model = self.settings.clip_model
        return {"scorer": self.name, "model": model if not is_local_path(model) else model_identity(model),
                "revision": self.settings.revision, "weights_sha256": self.weights_sha256,
                "prompts_sha256": self.prompts_sha256, "threshold": self.settings.threshold}

    def embed(self, images: list[ImageInput]) -> np.ndarray:
        """The projected CLIP image embeddings (float32), one row per image."""
        import torch

        pixels = self.processor(images=[to_pil(i) for i in images], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            embeds = self.model(pixel_values=pixels.to(self.device)).image_embeds
        return embeds.float().cpu().numpy()

    def _score_batch(self, images: list[ImageInput], prompts: list[str] | None) -> list[ImageVerdict]:
        probs = q16_probabilities(self.embed(images), self.prompts)
        return [ImageVerdict(bool(p[1] > self.settings.threshold), round(float(p[1]), 6),
                             {"non_inappropriate": round(float(p[0]), 6), "inappropriate": round(float(p[1]), 6)})
                for p in probs]

    def close(self) -> None:
        self.model = None


def image_processor_class() -> Any:
    """CLIP's PIL image processor (the default one wants torchvision, which this project keeps out)."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers releases before the PIL/torchvision split
        from transformers import CLIPImageProcessor as processor_class
    return processor_class


def _image_processor(folder: Path) -> Any:
    return image_processor_class().from_pretrained(str(folder))
