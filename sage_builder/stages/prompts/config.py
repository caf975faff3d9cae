"""Stage 2 (prompts) configuration."""

from __future__ import annotations

from pydantic import Field

from sage_builder.config import ConfigPath, StrictModel, execution, project_file


class PromptsConfig(StrictModel):
    seed_concepts: ConfigPath = execution(project_file("prompts", "seed_concepts.csv"),
                                          description="seed concepts per category (content is hashed)")
    concepts_per_category: int = Field(120, ge=1, description="target pool size per category")
    pairs_per_concept: int = Field(10, ge=2, description="N; index N is reserved for the test splits")
    max_clip_tokens: int = Field(77, ge=8, le=77)
