"""NudeNet 3.0.8 (the version the paper's evaluation pins), batched, through onnxruntime.

``NudeDetector`` reads one image file per call, and its ``best.onnx`` has a fixed batch size of 1.
This scorer loads the same ``best.onnx`` from the installed wheel, makes its batch dimension free
(the five Reshape targets of the YOLOv8 head start with a literal 1; they become 0, "copy the
input's dimension"), and runs whole batches. Decoding, letterboxing and post-processing follow
``nudenet/nudenet.py`` line by line, so a batch gives the detections ``NudeDetector.detect`` gives
for each image alone (tests/test_safety_nudenet.py compares them). Like ``detect`` it keeps
detections scoring >= 0.2 whose box survives cv2's NMS (score cut-off 0.25, IoU 0.45).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from sage_builder.errors import StageInputError
from sage_builder.safety.base import ImageInput, ImageScorer, ImageVerdict, weights_sha256
from sage_builder.safety.config import NudeNetSettings

NUDENET_VERSION = "3.0.8"
INSTALL_HINT = "pip install 'sage-builder[eval]' (nudenet==3.0.8, onnxruntime)"
# nudenet/nudenet.py's constants: candidate score, then cv2.dnn.NMSBoxes(score, IoU) thresholds.
CANDIDATE_SCORE = 0.2
NMS_SCORE = 0.25
NMS_IOU = 0.45


def nudenet_files() -> tuple[Path, list[str]]:
    """(path of the wheel's best.onnx, its class labels); one line if nudenet is missing or another version."""
    try:
        from importlib import metadata

        version = metadata.version("nudenet")
        import nudenet.nudenet as module
    except ImportError:
        raise StageInputError(f"render.screen.scorers: nudenet is not installed; {INSTALL_HINT}") from None
    except metadata.PackageNotFoundError:
        raise StageInputError(f"render.screen.scorers: nudenet is not installed; {INSTALL_HINT}") from None
    if version != NUDENET_VERSION:
        raise StageInputError(f"render.screen.scorers: nudenet {version} is installed, but the paper's "
                              f"evaluation pins {NUDENET_VERSION} (another model); {INSTALL_HINT}")
    weights = Path(module.__file__).with_name("best.onnx")
    if not weights.exists():
        raise StageInputError(f"{weights}: missing from the nudenet wheel; reinstall it ({INSTALL_HINT})")
    return weights, list(vars(module)["__labels"])


@lru_cache(maxsize=2)
def batched_model(path: str, sha256: str) -> bytes:
    """best.onnx with a free batch dimension, serialized (``sha256`` keys the cache to the weights)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    graph = model.graph
    for value in (*graph.input, *graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    del graph.value_info[:]  # inferred shapes still say batch 1
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    initializers = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        target = node.input[1]
        if target in constants:
            attr = constants[target].attribute[0]
            shape = numpy_helper.to_array(attr.t).copy()
            if shape[0] == 1:
                shape[0] = 0
                attr.t.CopyFrom(numpy_helper.from_array(shape, attr.t.name))
        elif target in initializers:
            shape = numpy_helper.to_array(initializers[target]).copy()
            if shape[0] == 1:
                shape[0] = 0
                initializers[target].CopyFrom(numpy_helper.from_array(shape, target))
    return model.SerializeToString()


def letterbox(image_bgr: np.ndarray, size: int) -> tuple[np.ndarray, float, int, int]:
    """nudenet's ``_read_image`` after ``cv2.imread``: (CHW float32, resize factor, pad left, pad top)."""
    import cv2

    img = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    height, width = img.shape[:2]
    aspect = width / height
    if height > width:
        new_height, new_width = size, int(round(size * aspect))
    else:
        new_width, new_height = size, int(round(size / aspect))
    factor = math.sqrt((width ** 2 + height ** 2) / (new_width ** 2 + new_height ** 2))
    img = cv2.resize(img, (new_width, new_height))
    pad_x, pad_y = size - new_width, size - new_height
    # nudenet floors the pad before halving it: an odd pad loses a pixel, then the resize below fixes it.
    pad_top, pad_bottom = [int(i) for i in np.floor([pad_y, pad_y]) / 2]
    pad_left, pad_right = [int(i) for i in np.floor([pad_x, pad_x]) / 2]
    img = cv2.copyMakeBorder(img, pad_top, pad_bottom, pad_left, pad_right, cv2.BORDER_CONSTANT, value=[0, 0, 0])
    img = cv2.resize(img, (size, size))
    return np.transpose(img.astype("float32") / 255.0, (2, 0, 1)), factor, pad_left, pad_top


def detections(output: np.ndarray, labels: list[str], factor: float, pad_left: int, pad_top: int
               ) -> list[dict[str, Any]]:
    """nudenet's ``_postprocess`` for one image's (22, N) output: class, score, box (x, y, w, h)."""
    import cv2

    rows = np.transpose(output)
    boxes, scores, class_ids = [], [], []
    for row in rows:
        class_scores = row[4:]
        best = np.amax(class_scores)
        if best >= CANDIDATE_SCORE:
            x, y, w, h = row[0], row[1], row[2], row[3]
            boxes.append([int(round((x - w * 0.5 - pad_left) * factor)), int(round((y - h * 0.5 - pad_top) * factor)),
                          int(round(w * factor)), int(round(h * factor))])
            scores.append(best)
            class_ids.append(int(np.argmax(class_scores)))
    keep = cv2.dnn.NMSBoxes(boxes, scores, NMS_SCORE, NMS_IOU)
    return [{"class": labels[class_ids[i]], "score": float(scores[i]), "box": boxes[i]} for i in keep]


def decode_bgr(image: ImageInput) -> np.ndarray:
    """BGR uint8 pixels, decoded as ``cv2.imread`` decodes a file (so JPEG bytes match NudeDetector)."""
    import cv2

    if isinstance(image, (bytes, bytearray, memoryview)):
        pixels = cv2.imdecode(np.frombuffer(bytes(image), np.uint8), cv2.IMREAD_COLOR)
        if pixels is None:
            raise ValueError("not a decodable image")
        return pixels
    rgb = np.asarray(image.convert("RGB"))
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


class NudeNetScorer(ImageScorer):
    name = "nudenet"
    flags = "exposed genitalia"

    def __init__(self, settings: NudeNetSettings, device: str = "cpu"):
        super().__init__(settings.batch_size)
        import onnxruntime as ort

        self.settings = settings
        weights, self.labels = nudenet_files()
        unknown = [c for c in settings.classes if c not in self.labels]
        if unknown:
            raise StageInputError(f"render.screen.nudenet.classes: '{unknown[0]}' is not a NudeNet class "
                                  f"(one of {', '.join(self.labels)})")
        self.weights_sha256 = weights_sha256(weights)
        options = ort.SessionOptions()
        if settings.threads:
            options.intra_op_num_threads = settings.threads
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.providers = providers
        self.session = ort.InferenceSession(batched_model(str(weights), self.weights_sha256), options,
                                            providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.size = int(self.session.get_inputs()[0].shape[2])

    def describe(self) -> dict[str, Any]:
        return {"scorer": self.name, "model": f"nudenet=={NUDENET_VERSION}/best.onnx",
                "weights_sha256": self.weights_sha256, "threshold": self.settings.threshold,
                "classes": sorted(self.settings.classes)}

    def detect(self, images: list[ImageInput]) -> list[list[dict[str, Any]] | str]:
        """Per image, NudeDetector's detections, or the reason it could not be read."""
        prepared, meta, failed = [], [], {}
        for i, image in enumerate(images):
            try:
                chw, factor, left, top = letterbox(decode_bgr(image), self.size)
            except Exception as exc:  # noqa: BLE001 - one bad image must not sink its batch
                failed[i] = f"unreadable image ({exc.__class__.__name__})"
                continue
            prepared.append(chw)
            meta.append((i, factor, left, top))
        out: list[list[dict[str, Any]] | str] = [failed.get(i, []) for i in range(len(images))]
        if prepared:
            (raw,) = self.session.run(None, {self.input_name: np.stack(prepared)})
            for row, (i, factor, left, top) in enumerate(meta):
                out[i] = detections(raw[row], self.labels, factor, left, top)
        return out

    def _score_batch(self, images: list[ImageInput], prompts: list[str] | None) -> list[ImageVerdict]:
        verdicts = []
        flag_classes = set(self.settings.classes)
        for found in self.detect(images):
            if isinstance(found, str):
                verdicts.append(ImageVerdict(None, None, error=found))
                continue
            classes: dict[str, float] = {}
            for det in found:
                classes[det["class"]] = max(classes.get(det["class"], 0.0), round(det["score"], 6))
            hits = [s for c, s in classes.items() if c in flag_classes]
            top = max(hits, default=0.0)
            verdicts.append(ImageVerdict(top >= self.settings.threshold and bool(hits), top, classes,
                                         extra={"detections": len(found)}))
        return verdicts
