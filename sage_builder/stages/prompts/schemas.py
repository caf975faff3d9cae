"""JSON schemas of the LLM replies this stage asks for (sent as structured-output constraints)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConceptDescription(_Reply):
    description: str = Field(min_length=1, max_length=240)
    refused: bool


class NewConcept(_Reply):
    concept: str = Field(min_length=1, max_length=80)
    description: str = Field(min_length=1, max_length=240)


class ConceptExpansion(_Reply):
    concepts: list[NewConcept] = Field(max_length=100)
    refused: bool


class ImagePrompt(_Reply):
    """p_h or p_s: ~30 words fit in 400 characters; the bound also caps a runaway small model."""

    prompt: str = Field(min_length=1, max_length=400)
    refused: bool
