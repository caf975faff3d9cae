"""Stage 3 (render) configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sage_builder.config import ModelRef, StrictModel, execution


class RenderConfig(StrictModel):
    backbone: Literal["sdxl", "sd15"] = "sdxl"
    model: ModelRef = "stabilityai/stable-diffusion-xl-base-1.0"
    revision: str | None = None
    steps: int = Field(30, ge=1)
    guidance: float = Field(7.5, ge=0.0)
    height: int = Field(1024, ge=8)
    width: int = Field(1024, ge=8)
    batch_size: int = execution(4, ge=1)
