"""Stage 3 (render) configuration.

Everything that changes the pixels or the stored bytes (model, scheduler, steps, guidance, size,
precision, encoding) is hashed into each image's key; batch size, device, workers and the speed
levers (compile, fused QKV, SDPA backend: see ``levers.py``) only change how fast the same images
come out (within float rounding).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sage_builder.config_base import ModelRef, StrictModel, execution
from sage_builder.safety.config import ScreenConfig

# Scheduler names a config may use -> (diffusers class, extra config). "default" keeps the model's own.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "default": ("", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}
SchedulerName = Literal["default", "euler", "euler_a", "ddim", "ddpm", "pndm", "lms", "heun", "unipc",
                        "dpmpp_2m", "dpmpp_2m_karras"]

# Published diffusers figure (SPEC §3): SDXL 1024x1024, 30 steps, bf16 + SDPA + compile, A100 80GB.
REFERENCE_SECONDS_PER_IMAGE = 2.5
REFERENCE_STEPS = 30
REFERENCE_PIXELS = 1024 * 1024


class RenderConfig(StrictModel):
    backbone: Literal["sdxl", "sd15"] = Field("sdxl", description="sdxl: StableDiffusionXLPipeline; "
                                              "sd15: StableDiffusionPipeline")
    model: ModelRef = Field("stabilityai/stable-diffusion-xl-base-1.0",
                            description="hub id (read from the local HF cache when offline) or a local folder")
    revision: str | None = Field(None, description="hub revision (commit) to pin; recorded with every image")
    scheduler: SchedulerName = Field("default", description="'default' keeps the model's scheduler")
    steps: int = Field(30, ge=1, description="denoising steps per image")
    guidance: float = Field(7.5, ge=0.0, description="classifier-free guidance scale")
    height: int = Field(1024, ge=8, description="image height in pixels")
    width: int = Field(1024, ge=8, description="image width in pixels")
    negative_prompt: str = Field("", description="the same negative prompt for every image")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU (the resolved one enters the image key)")
    encoding: Literal["jpeg", "webp", "png"] = Field("jpeg", description="webp and png are lossless")
    quality: int = Field(95, ge=1, le=100, description="JPEG quality (ignored for lossless encodings)")
    shard_mb: int = Field(256, ge=1, description="target size of one output shard in MB (the Hub suggests "
                          "Parquet files of a few hundred MB)")
    screen: ScreenConfig = Field(default_factory=ScreenConfig, description="score both images of every pair "
                                 "after rendering; rerender or drop pairs whose safe image is flagged")
    batch_size: int = execution(4, ge=1, description="images per pipeline call (does not change pixels)")
    device: str = execution("auto", description="auto (CUDA if available), cpu, cuda")
    workers: int | None = execution(None, ge=1, description="executor local: worker processes; default one per "
                                    "visible GPU (1 on CPU); each takes a disjoint set of image keys (executor "
                                    "ray: see ray.render_workers)")
    threads: int | None = execution(None, ge=1, description="CPU: torch threads per worker (default: torch's "
                                    "choice; on a shared machine, at most the idle cores)")
    compile: bool = execution(False, description="torch.compile the UNet (pays off on long GPU runs)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = execution(
        "default", description="torch.compile mode of the UNet and VAE decode: reduce-overhead and max-autotune "
        "use CUDA graphs; max-autotune also benchmarks kernels (minutes of warm-up per shape)")
    compile_vae: bool = execution(False, description="torch.compile the VAE decode (channels-last on CUDA)")
    inductor_flags: bool = execution(False, description="when compiling: conv_1x1_as_mm, coordinate-descent "
                                     "tuning, no epilogue fusion (diffusers' accelerate-inference guide)")
    fuse_qkv: bool = execution(False, description="fuse each attention's q/k/v projections into one matmul "
                               "(diffusers fuse_qkv_projections)")
    sdpa_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = execution(
        "auto", description="scaled_dot_product_attention kernel (auto: torch's choice; flash, cudnn and "
        "efficient need CUDA)")
    seconds_per_image: float | None = execution(
        None, gt=0, description="for `sage plan`; default 2.5 s (SDXL 1024 px 30 steps, A100) scaled by "
        "steps and pixels")

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} is not divisible by 8 (the VAE works on 8x smaller latents); "
                             f"use e.g. {value // 8 * 8 or 8}")
        return value

    @model_validator(mode="after")
    def _lossless_quality(self) -> RenderConfig:
        # Lossless encodings have no quality knob; pin it so it does not split image keys.
        if self.encoding != "jpeg" and self.quality != 100:
            object.__setattr__(self, "quality", 100)
        return self

    def estimated_seconds_per_image(self) -> float:
        if self.seconds_per_image is not None:
            return self.seconds_per_image
        scale = (self.steps / REFERENCE_STEPS) * (self.height * self.width / REFERENCE_PIXELS)
        return REFERENCE_SECONDS_PER_IMAGE * scale
