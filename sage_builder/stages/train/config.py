"""Stage 6 (train) configuration."""

from __future__ import annotations

from pydantic import Field

from sage_builder.config import StrictModel


class TrainConfig(StrictModel):
    n_user_tokens: int = Field(4, ge=1)
    beta: float = Field(5000.0, gt=0)
    max_steps: int = Field(5000, ge=1)
    learning_rate: float = Field(5e-6, gt=0)
