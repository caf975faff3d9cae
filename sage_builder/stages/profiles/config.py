"""Stage 1 (profiles) configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sage_builder.config_base import ConfigPath, OptionalModelRef, StrictModel, execution, project_file


class SplitSizes(StrictModel):
    """Users per split at 1,000 users; other counts are scaled proportionally."""

    train: int = Field(900, ge=0)
    val: int = Field(50, ge=0)
    test_unseen: int = Field(50, ge=0)
    test_seen: int = Field(50, ge=0, description="taken from the train users")


class ProfilesConfig(StrictModel):
    n_users: int = Field(1000, gt=0)
    sampler: Literal["psalign", "config"] = Field(
        "psalign", description="psalign: the authors' procedure and NumPy legacy stream (bit-exact with the "
                               "published users at seed 2025); config: the same YAML with np.random.default_rng")
    demographics: ConfigPath = execution(project_file("profiles", "demographics.yaml"),
                                         description="distributions and realism rules (content is hashed)")
    add_permissive_user: bool = Field(True, description="add the fully permissive reference user as user n+1")
    labeller: Literal["llm", "rules"] = Field(
        "llm", description="llm: ask `llm` (the authors' method); rules: apply the four rules deterministically")
    on_rejected: Literal["fail", "exclude"] = Field(
        "fail", description="a user whose LLM labelling was rejected after llm.max_attempts: fail the stage "
                            "(listing them; rejects.parquet says why) or exclude the user (counted in the report)")
    ban_template: ConfigPath = execution(project_file("prompts", "ban_categories.txt"))
    statement_template: ConfigPath = execution(project_file("prompts", "user_statement.txt"))
    embedding_model: OptionalModelRef = Field(None, description="default: llm.model")
    embedding_pooling: Literal["mean"] = "mean"
    n_clusters: int = Field(5, ge=1)
    splits: SplitSizes = Field(default_factory=SplitSizes)
    tsne_perplexity: float = Field(30.0, gt=0)
    embedding_batch_size: int = execution(8, ge=1)
