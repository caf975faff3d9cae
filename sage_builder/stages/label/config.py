"""Stage 4 (label) configuration."""

from __future__ import annotations

from pydantic import Field

from sage_builder.config import StrictModel


class LabelConfig(StrictModel):
    pairs_per_category: int = Field(3, ge=1, description="K pairs per category per user")
