"""Stage 5 (publish) configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from sage_builder.config_base import StrictModel, execution


def repo_id_problem(value: str) -> str | None:
    """Why ``value`` is not a usable ``ORG/NAME`` dataset repo id (None if it is): the Hub's own rule
    (``huggingface_hub.utils.validate_repo_id``), with the namespace required."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if value.count("/") != 1:
        return "expected ORG/NAME (letters, digits, '-', '_', '.'; e.g. my-org/sage)"
    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        return str(exc).split(": '")[0].rstrip(".")  # the Hub's reason, without repeating the value
    return None


class PublishConfig(StrictModel):
    repo_id: str | None = Field(None, description="ORG/NAME of the dataset repo on the Hub; "
                                "unset: the stage only writes a dry-run plan (no network)")
    private: bool = Field(True, description="create the repo private (the default; --public overrides)")
    gated: Literal[False, "auto", "manual"] = Field(
        False, description="gate access requests on the repo: auto (approved automatically) or manual")
    revision: str = Field("main", description="branch to commit to (created from main if missing)")
    license: str = Field("cc-by-nc-4.0", description="the dataset card's license id")
    include_manifests: bool = Field(True, description="also push the stage manifests (lineage) as manifests/*.json")
    commit_message: str = Field("Publish Sage dataset with sage-builder", description="summary of the commit")
    allow_stale: bool = execution(False, description="push a label dataset that is stale (its config or an "
                                  "input stage changed since it was built) instead of refusing")
    num_threads: int = execution(5, ge=1, le=64, description="parallel LFS uploads")
    max_rate_limit_wait_s: float = execution(
        60.0, ge=0.0, description="longest wait honoured from a 429's Retry-After before retrying")
    rate_limit_retries: int = execution(5, ge=0, le=20, description="retries of a create/commit call after a 429")

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is not None and (problem := repo_id_problem(value)) is not None:
            raise ValueError(f"'{value}': {problem}")
        return value
