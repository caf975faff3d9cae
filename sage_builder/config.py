"""The pipeline configuration: one pydantic model tree, loaded from YAML, the single source of truth.

Every stage's section lives beside that stage (``sage_builder/stages/<stage>/config.py``) and is
assembled here. Fields built with :func:`execution` (batch sizes, concurrency, workers) say *how*
work runs, not *what* it produces: they are left out of every hash, so changing them never
invalidates finished items.

Relative paths in a YAML file are resolved against the folder that holds that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from sage_builder.config_base import (ConfigPath, ModelRef, OptionalModelRef, StrictModel, execution,  # noqa: F401
                                      hashable_dump, model_identity, project_file, unknown_key_hint)
from sage_builder.errors import ConfigError
from sage_builder.executors.config import RayConfig
from sage_builder.stages.eval.config import EvalConfig
from sage_builder.stages.label.config import LabelConfig
from sage_builder.stages.profiles.config import ProfilesConfig
from sage_builder.stages.prompts.config import PromptsConfig
from sage_builder.stages.publish.config import PublishConfig
from sage_builder.stages.render.config import RenderConfig
from sage_builder.stages.train.config import TrainConfig

DEFAULT_CATEGORIES = ["Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking", "Propaganda"]


class LLMConfig(StrictModel):
    """Which LLM answers the stage's requests, and how it samples."""

    backend: Literal["transformers", "openai", "vllm"] = Field(
        "transformers", description="transformers (in-process), vllm (in-process engine, gpu extra) or openai "
        "(any OpenAI-compatible server, e.g. vllm serve)")
    model: ModelRef = Field(description="hub id (e.g. Qwen/Qwen2.5-7B-Instruct) or a local model folder")
    revision: str | None = Field(None, description="hub revision (commit) to pin; recorded in manifests")
    gguf_file: str | None = Field(None, description="transformers backend: load this GGUF file inside `model`")
    base_url: str | None = execution(None, description="openai backend: the endpoint, e.g. http://host:8000/v1")
    api_key_env: str = execution("OPENAI_API_KEY", description="environment variable holding the API key")
    served_model_name: str | None = Field(None, description="openai backend: model name to send (default: model)")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_new_tokens: int = Field(256, ge=1, le=8192, description="token limit per reply (a cut reply is "
                                "rejected as truncated)")
    seed: int = Field(0, description="base sampling seed; each request's seed derives from it and the item key")
    max_attempts: int = Field(3, ge=1, le=20, description="tries per item before it goes to the rejects table")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = execution(
        "auto", description="weights dtype (auto: bfloat16 on GPU, float32 on CPU)")
    device: str = execution("auto", description="transformers backend: cpu, cuda, cuda:1 or auto")
    concurrency: int = execution(8, ge=1, le=4096, description="openai backend: requests in flight")
    request_timeout_s: float = execution(120.0, gt=0, description="openai backend: seconds per request")
    max_retries: int = execution(6, ge=0, le=50, description="openai backend: transport retries on 429, 5xx, "
                                 "timeouts and dropped connections before the request counts as failed")
    retry_backoff_s: float = execution(1.0, ge=0.0, description="openai backend: first retry wait, doubling "
                                       "up to 60 s (a longer Retry-After header wins)")
    batch_size: int = execution(16, ge=1, description="transformers backend: prompts per generate() call")
    decoder: Literal["cached", "generate"] = execution(
        "cached", description="transformers backend: cached = own decoding loop, shared-prompt-prefix KV reuse "
        "and a pre-allocated KV cache; generate = transformers' generate() (the earlier path, for comparison)")
    threads: int | None = execution(None, ge=1, description="transformers backend on CPU: torch threads (null: "
                                    "the cores idle when the model loads, from /proc/stat)")
    tensor_parallel_size: int = execution(1, ge=1, description="vllm backend: GPUs per engine")
    gpu_memory_utilization: float = execution(0.9, gt=0.0, le=1.0, description="vllm backend: share of GPU "
                                              "memory the engine may take")
    max_model_len: int | None = execution(None, ge=64, description="vllm backend: context length (null: "
                                          "the model's)")


class PipelineConfig(StrictModel):
    name: str = Field(description="a short name for the run configuration")
    seed: int = Field(2025, description="global seed; every per-item seed derives from it and the item's key")
    categories: list[str] = Field(default_factory=lambda: list(DEFAULT_CATEGORIES), min_length=1,
                                  description="the harm categories (the paper's seven)")
    executor: Literal["local", "ray"] = execution(
        "local", description="where stages 1-3 run: local (this process, render.workers processes) or "
        "ray (LLM engine actors and one render actor per GPU on a Ray cluster; see the `ray` section)")
    ray: RayConfig = Field(default_factory=RayConfig, json_schema_extra={"execution": True},
                           description="executor: ray only (scheduling, never hashed)")
    llm: LLMConfig = Field(description="the LLM of stages 1 and 2")
    profiles: ProfilesConfig = Field(default_factory=ProfilesConfig, description="stage 1: users, banned "
                                     "categories, embeddings, splits")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="stage 2: concepts and "
                                   "safe/unsafe prompt pairs")
    render: RenderConfig = Field(default_factory=RenderConfig, description="stage 3: one image per prompt")
    label: LabelConfig = Field(default_factory=LabelConfig, description="stage 4: per-user preference "
                               "records, the Hub dataset layout")
    publish: PublishConfig = Field(default_factory=PublishConfig, description="stage 5: the Hub dataset "
                                   "repo")
    train: TrainConfig = Field(default_factory=TrainConfig, description="stage 6: the user-conditioned "
                               "adapter (Diffusion-DPO)")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="stage 7: the adapter evaluated against "
                             "base and prompt-based methods")
    source: Path | None = execution(None, description="the YAML file this was loaded from (set by the loader)")

    @field_validator("categories")
    @classmethod
    def _unique_categories(cls, value: list[str]) -> list[str]:
        seen = set()
        for name in value:
            if not name.strip():
                raise ValueError("a category name is empty")
            if name.lower() in seen:
                raise ValueError(f"category '{name}' is listed twice")
            seen.add(name.lower())
        return value


def _format_error(source: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            hint = unknown_key_hint(PipelineConfig, [str(p) for p in err["loc"]])
            msg = f"unknown key ({hint or 'check the spelling'}; see `sage config-schema`)"
        problems.append(f"{key}: {msg}")
    return f"{source}: " + "; ".join(problems)


def config_from_dict(data: dict[str, Any], base_dir: Path | None = None, source: str = "<config>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        if node.get(key) is None:  # an absent section, or one written as a bare `section:` in YAML
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def load_config(path: Path | str, overrides: list[str] | None = None) -> PipelineConfig:
    """Load and validate a pipeline YAML; ``overrides`` are ``dotted.key=yaml-value`` strings."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such pipeline file (the shipped ones are in pipelines/)")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; --config takes a pipeline YAML file (e.g. pipelines/demo.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (binary content); --config takes a pipeline YAML file") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{path}: cannot read it ({reason}); check its permissions") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for key, field in PipelineConfig.model_fields.items():
        # A section whose keys are all commented out reads as None: it means "the defaults".
        if key in data and data[key] is None and isinstance(field.annotation, type) \
                and issubclass(field.annotation, BaseModel):
            data[key] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set profiles.n_users=20")
        key, raw = item.split("=", 1)
        problem = unknown_key_hint(PipelineConfig, key.strip().split("."))
        if problem:  # the command line's typo, not the YAML file's
            raise ConfigError(f"--set {key.strip()}: {problem} (see `sage config-schema`)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({str(exc).splitlines()[0]}); quote "
                              f"strings and close brackets, e.g. --set {key.strip()}='[1, 2]'") from None
        _set_dotted(data, key.strip(), value)
    config = config_from_dict(data, base_dir=path.resolve().parent, source=str(path))
    config.source = path.resolve()
    return config


def dump_config(config: PipelineConfig) -> str:
    """YAML of the resolved config (absolute paths), as saved into each run directory."""
    data = config.model_dump(mode="json", exclude={"source"})
    return yaml.safe_dump(data, sort_keys=False)
