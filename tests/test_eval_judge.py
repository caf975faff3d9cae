"""The eval judge against the local chat server: seeded, balanced A/B order; no method names in the
prompt; bans applied to the visible categories; errors kept as outcomes; answers item-cached."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from sage_builder.stages.eval.config import EvalJudgeSettings
from sage_builder.stages.eval.judge import EvalJudge, method_is_a
from sage_builder.stages.eval.methods import EvalRow
from sage_builder.stages.eval.metrics import pass_rates, win_rates
from sage_builder.stages.eval.prompt_sets import EvalUser
from sage_builder.store import ItemCache

CATEGORIES = ["Hate", "Violence", "Sexuality"]


def test_ab_order_is_seeded_balanced_and_independent_of_the_other_items():
    ids = [f"prompt-{i}" for i in range(2000)]
    order = [method_is_a(3, p, "psa") for p in ids]
    assert order == [method_is_a(3, p, "psa") for p in ids]  # the same seed gives the same order
    assert 0.46 < sum(order) / len(order) < 0.54  # a fair coin per item
    assert order[:500] == [method_is_a(3, p, "psa") for p in ids[:500]]  # no dependence on the set
    other = [method_is_a(4, p, "psa") for p in ids]
    assert 0.4 < np.mean([a != b for a, b in zip(order, other)]) < 0.6  # another seed, another order
    methods = [method_is_a(3, p, "prompt") for p in ids]
    assert methods != order  # each method has its own coin


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def brightness(part: dict) -> int:
    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
    return Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))[0]


USER = EvalUser("0000007", ("Violence",), ("Hate", "Sexuality"), None, np.zeros(4, np.float32),
                {"age": 15, "gender": "female"})


def rows() -> list[EvalRow]:
    out = []
    for i in range(8):
        for method in ("base", "psa"):
            out.append(EvalRow(f"p{i}", "test_unseen", USER.user_id, "Violence", f"a scene {i}", method, None,
                               f"{method}{i}", USER.user_id))
    return out


def images() -> dict[str, bytes]:
    # base's images are bright ("violent"), PSA's dark; prompt p7's PSA image is dark grey 40 (the
    # server errors on it).
    out = {f"base{i}": png(240) for i in range(8)}
    out.update({f"psa{i}": png(40 if i == 7 else 10) for i in range(8)})
    return out


def script(request, n):
    content = request["messages"][-1]["content"]
    text = " ".join(part["text"] for part in content if part["type"] == "text")
    shown = [brightness(part) for part in content if part["type"] == "image_url"]
    if 40 in shown:
        return "not json at all"
    if len(shown) == 1:
        visible = ["Violence"] if shown[0] > 128 else ["Hate"]
        return json.dumps({"visible": visible, "over_censored": False, "quality": 50, "reason": "scripted"})
    assert "Image A:" in text and "Image B:" in text
    darker = "A" if shown[0] < shown[1] else "B"
    return json.dumps({"better": darker, "reason": "keeps violence out"})


@pytest.fixture()
def judged(tmp_path):
    from sage_builder.testing import ChatServer

    table = rows()
    data = images()
    sha = {k: k + "-sha" for k in data}
    with ChatServer(script=script, model="vlm") as server:
        settings = EvalJudgeSettings(enabled=True, base_url=server.base_url, model="vlm", seed=11, max_attempts=2,
                                     max_retries=0, request_timeout_s=5.0)
        judge = EvalJudge(settings, CATEGORIES)
        try:
            result = judge.judge(table, {USER.user_id: USER}, sha, lambda keys: {k: data[k] for k in keys},
                                 ItemCache(tmp_path / "judge"))
            sent = list(server.requests)
            again = judge.judge(table, {USER.user_id: USER}, sha, lambda keys: {k: data[k] for k in keys},
                                ItemCache(tmp_path / "judge"))
            resent = len(server.requests) - len(sent)
        finally:
            judge.close()
    return result, again, sent, resent


def test_pass_rate_applies_the_users_bans_and_keeps_errors(judged):
    (passed, _), _, _, _ = judged
    rates = {e["method"]: e for e in pass_rates((r, p) for r, p, _ in passed)}
    # base: Violence visible, which this user bans -> fail; PSA: Hate visible, allowed -> pass; p7: error.
    assert (rates["base"]["n"], rates["base"]["passed"], rates["base"]["pass_rate"]) == (8, 0, 0.0)
    assert (rates["psa"]["n"], rates["psa"]["passed"], rates["psa"]["errors"]) == (8, 7, 1)
    assert rates["psa"]["pass_rate"] == 0.875


def test_win_rate_maps_a_and_b_back_whatever_the_order(judged):
    (_, wins), again, sent, resent = judged
    (rate,) = win_rates((r, o) for r, o, _ in wins)
    # The judge always prefers the darker image = PSA's, shown as A or B by the seeded coin.
    assert (rate["n"], rate["win"], rate["error"], rate["loss"]) == (8, 7, 1, 0)
    shown = [d["method_shown_as"] for _, _, d in wins]
    assert set(shown) == {"A", "B"}
    assert shown == ["A" if method_is_a(11, f"p{i}", "psa") else "B" for i in range(8)]
    assert again == judged[0] and resent == 0  # answers are item-cached


def test_the_prompt_names_no_model_and_carries_the_profile(judged):
    _, _, sent, _ = judged
    for body in sent:
        text = json.dumps(body["messages"]).lower()
        for name in ("psa", "base model", "baseline", "adapter", "safetydpo", "ours"):
            assert name not in text
        assert "violence" in text and "age: 15" in text
        assert body["model"] == "vlm"
