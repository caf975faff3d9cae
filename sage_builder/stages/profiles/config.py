"""Stage 1 (profiles) configuration."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sage_builder.config_base import ConfigPath, OptionalModelRef, StrictModel, execution, project_file


class SplitSizes(StrictModel):
    """How users get their split roles. ``splits: psalign`` (or ``seeded``) is short for ``{method: ...}``."""

    method: Literal["seeded", "psalign"] = Field(
        "seeded", description="seeded: a shuffle drawn from `seed`, the sizes below scaled to n_users; psalign: "
                              "the published user -> split assignment in `file` (users 0000001-0001000)")
    train: int = Field(900, ge=0, description="seeded: users per split at 1,000 users, scaled for other counts")
    val: int = Field(50, ge=0, description="seeded: validation users at 1,000 users (scaled)")
    test_unseen: int = Field(50, ge=0, description="seeded: test users never seen in training, at 1,000 users "
                                                       "(scaled)")
    test_seen: int = Field(50, ge=0, description="taken from the train users")
    file: ConfigPath = execution(project_file("profiles", "published_splits.csv"),
                                 description="psalign: `user_id,split` rows (val, test_seen, test_unseen; every "
                                             "other user is train); content is hashed")

    @model_validator(mode="before")
    @classmethod
    def _name_means_method(cls, value: Any) -> Any:
        return {"method": value} if isinstance(value, str) else value


class ProfilesConfig(StrictModel):
    n_users: int = Field(1000, gt=0, description="simulated users (the paper: 1,000)")
    sampler: Literal["psalign", "config"] = Field(
        "psalign", description="psalign: the authors' procedure and NumPy legacy stream (bit-exact with the "
                               "published users at seed 2025); config: the same YAML with np.random.default_rng")
    demographics: ConfigPath = execution(project_file("profiles", "demographics.yaml"),
                                         description="distributions and realism rules (content is hashed)")
    add_permissive_user: bool = Field(True, description="add the fully permissive reference user as user n+1")
    labeller: Literal["llm", "rules", "file"] = Field(
        "llm", description="llm: ask `llm` (the authors' method); rules: apply the four rules deterministically; "
                           "file: banned lists from `labels_file` (the published users.csv format)")
    rules: Literal["enforce", "report"] = Field(
        "enforce", description="llm labeller: enforce builds the mandatory rules of the demographics file into "
                               "each request and its JSON schema (the LLM decides only the rest); report asks "
                               "freely, as the authors did; adherence is measured either way")
    labels_file: ConfigPath | None = execution(
        None, description="labeller file: CSV with Age, Age_Group, Gender, Religion, Physical_Condition, "
                          "Mental_Condition, Banned_Categories, Allowed_Categories; row i is user i+1 "
                          "(content is hashed)")
    on_rejected: Literal["fail", "exclude"] = Field(
        "fail", description="a user whose LLM labelling was rejected after llm.max_attempts: fail the stage "
                            "(listing them; rejects.parquet says why) or exclude the user (counted in the report)")
    ban_template: ConfigPath = execution(project_file("prompts", "ban_categories.txt"),
                                         description="rules: report (placeholders user, categories)")
    enforced_ban_template: ConfigPath = execution(
        project_file("prompts", "ban_categories_enforced.txt"),
        description="rules: enforce (placeholders user, rules, decided, categories)")
    statement_template: ConfigPath = execution(project_file("prompts", "user_statement.txt"),
                                               description="the profile -> statement text that is embedded; "
                                                           "content is hashed")
    embedding_model: OptionalModelRef = Field(None, description="default: llm.model")
    embedding_pooling: Literal["mean"] = Field("mean", description="how token states become one user "
                                               "embedding (mean over the statement's tokens)")
    n_clusters: int = Field(5, ge=1, description="k-means clusters of the user embeddings (report, t-SNE "
                                                 "colours)")
    splits: SplitSizes = Field(default_factory=SplitSizes, description="users' split roles (train, val, "
                               "test_seen, test_unseen)")
    tsne_perplexity: float = Field(30.0, gt=0, description="t-SNE perplexity of tsne.png (below the user "
                                                           "count)")
    embedding_batch_size: int = execution(8, ge=1, description="statements per embedding forward pass")

    @model_validator(mode="after")
    def _labels_file_with_file_labeller(self) -> ProfilesConfig:
        if self.labeller == "file" and self.labels_file is None:
            raise ValueError("labeller: file needs profiles.labels_file (a CSV in the published users.csv format)")
        return self
