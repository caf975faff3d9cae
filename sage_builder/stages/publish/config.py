"""Stage 5 (publish) configuration."""

from __future__ import annotations

from pydantic import Field

from sage_builder.config import StrictModel


class PublishConfig(StrictModel):
    repo_id: str | None = Field(None, description="ORG/NAME of the dataset repo on the Hub")
    private: bool = True
    gated: bool = False
    license: str = "cc-by-nc-4.0"
