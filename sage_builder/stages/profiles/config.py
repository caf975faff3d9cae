"""Stage 1 (profiles) configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sage_builder.config import ConfigPath, OptionalModelRef, StrictModel, execution, project_file


class SplitSizes(StrictModel):
    """Users per split at 1,000 users; other counts are scaled proportionally."""

    train: int = Field(900, ge=0)
    val: int = Field(50, ge=0)
    test_unseen: int = Field(50, ge=0)
    test_seen: int = Field(50, ge=0, description="taken from the train users")


class ProfilesConfig(StrictModel):
    n_users: int = Field(1000, gt=0)
    sampler: Literal["psalign", "config"] = "psalign"
    demographics: ConfigPath = execution(project_file("profiles", "demographics.yaml"),
                                         description="distributions and realism rules (content is hashed)")
    add_permissive_user: bool = True
    labeller: Literal["llm", "rules"] = "llm"
    ban_template: ConfigPath = execution(project_file("prompts", "ban_categories.txt"))
    statement_template: ConfigPath = execution(project_file("prompts", "user_statement.txt"))
    embedding_model: OptionalModelRef = Field(None, description="default: llm.model")
    embedding_pooling: Literal["mean"] = "mean"
    n_clusters: int = Field(5, ge=1)
    splits: SplitSizes = Field(default_factory=SplitSizes)
    tsne_perplexity: float = Field(30.0, gt=0)
    embedding_batch_size: int = execution(8, ge=1)
