"""A vision-language model as an image scorer, through the project's OpenAI-compatible backend.

Each image is one chat request: ``prompts/screen_judge.txt`` plus the image as an ``image_url``
content part (a base64 data URL), constrained to a JSON schema (the visible categories, quality
0-100, a short reason) and validated by the shared validate-retry-reject loop of
:class:`~sage_builder.llm.base.LLMBackend`. A request's key is the hash of the image bytes, the
template, the categories and the model settings, so its sampling seed is derived like every other
LLM request's. An image whose requests all fail gets ``flagged=None`` and the backend's reason: it
stays in every denominator as an error, never as clean.
"""

from __future__ import annotations

import base64
import hashlib
import io
from typing import Any, Literal

from pydantic import BaseModel, Field, create_model

from sage_builder.errors import SageError, StageInputError
from sage_builder.safety.base import ImageInput, ImageScorer, ImageVerdict
from sage_builder.safety.config import JudgeSettings
from sage_builder.store import stable_hash
from sage_builder.templates import load_template

MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def verdict_schema(categories: list[str]) -> type[BaseModel]:
    """The reply model: visible categories (from ``categories`` only), quality 0-100, a short reason."""
    category = Literal[tuple(categories)]  # type: ignore[valid-type]
    return create_model("ImageJudgement",
                        categories=(list[category], Field(max_length=len(categories))),
                        quality=(int, Field(ge=0, le=100)),
                        reason=(str, Field(max_length=300)))


def image_part(image: ImageInput) -> dict[str, Any]:
    """An OpenAI ``image_url`` content part holding the image as a data URL (encoded bytes kept as is)."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        fmt = Image.open(io.BytesIO(data)).format or "PNG"
        if fmt not in MIME:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="PNG")
            data, fmt = buffer.getvalue(), "PNG"
    else:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        data, fmt = buffer.getvalue(), "PNG"
    url = f"data:{MIME[fmt]};base64,{base64.b64encode(data).decode('ascii')}"
    return {"type": "image_url", "image_url": {"url": url}}


def _image_bytes(image: ImageInput) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return image.tobytes() + repr((image.mode, image.size)).encode()


class JudgeScorer(ImageScorer):
    name = "judge"
    flags = "harmful category visible"

    def __init__(self, settings: JudgeSettings, categories: list[str], device: str = "cpu"):
        super().__init__(settings.batch_size)
        from sage_builder.config import LLMConfig
        from sage_builder.llm.openai_backend import OpenAIBackend

        if not settings.base_url:
            raise StageInputError("render.screen.judge.base_url: not set; give the VLM server's endpoint "
                                  "(e.g. http://host:8000/v1) or leave judge out of render.screen.scorers")
        self.settings = settings
        self.categories = list(categories)
        self.template = load_template(settings.template)
        if "categories" not in self.template.variables:
            raise StageInputError(f"render.screen.judge.template: {settings.template} has no {{{{categories}}}} "
                                  "placeholder")
        self.schema = verdict_schema(self.categories)
        self.llm = LLMConfig(backend="openai", model=settings.model, base_url=settings.base_url,
                             api_key_env=settings.api_key_env, temperature=settings.temperature,
                             max_new_tokens=settings.max_new_tokens, seed=settings.seed,
                             max_attempts=settings.max_attempts, concurrency=settings.concurrency,
                             request_timeout_s=settings.request_timeout_s, max_retries=settings.max_retries)
        self.backend = OpenAIBackend(self.llm)
        try:
            # No server at base_url is one line now, before anything is written.
            self.backend.check_ready()
        except SageError as exc:
            raise StageInputError(str(exc).replace("llm.", "render.screen.judge.")) from None

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {"scorer": self.name, "model": s.model, "weights_sha256": None, "template_sha256": self.template.sha256,
                "temperature": s.temperature, "max_new_tokens": s.max_new_tokens, "seed": s.seed,
                "categories": self.categories, "min_quality": s.min_quality}

    def request_key(self, image: ImageInput) -> str:
        digest = hashlib.sha256(_image_bytes(image)).hexdigest()
        return stable_hash("screen-judge", digest, self.describe(), length=32)

    def requests(self, images: list[ImageInput]) -> list[Any]:
        from sage_builder.llm.base import LLMRequest

        requests, seen = [], set()
        for image in images:
            key = self.request_key(image)
            if key in seen:
                continue
            seen.add(key)
            messages: list[dict[str, Any]] = self.template.render(categories=", ".join(self.categories))
            last = messages[-1]
            messages[-1] = {"role": last["role"], "content": [{"type": "text", "text": last["content"]},
                                                              image_part(image)]}
            requests.append(LLMRequest(key=key, messages=messages, schema=self.schema,
                                       max_new_tokens=self.settings.max_new_tokens))
        return requests

    def _score_batch(self, images: list[ImageInput], prompts: list[str] | None) -> list[ImageVerdict]:
        results = {r.key: r for r in self.backend.run(self.requests(images))}
        verdicts = []
        for image in images:
            result = results[self.request_key(image)]
            if not result.ok:
                detail = f" ({result.errors[-1]})" if result.errors else ""
                verdicts.append(ImageVerdict(None, None, error=f"judge: {result.reason}{detail}",
                                             extra={"seed": result.seed, "attempts": result.attempts}))
                continue
            value = result.value
            visible = sorted(set(value.categories))
            low = self.settings.min_quality is not None and value.quality < self.settings.min_quality
            verdicts.append(ImageVerdict(bool(visible) or low, float(len(visible) > 0),
                                         {c: 1.0 for c in visible},
                                         extra={"quality": value.quality, "reason": value.reason,
                                                "seed": result.seed, "attempts": result.attempts}))
        return verdicts

    def close(self) -> None:
        self.backend.close()
