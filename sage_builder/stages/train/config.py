"""Stage 6 (train) configuration: the user adapter, the Diffusion-DPO objective and the optimiser.

The defaults of the full pipeline (``pipelines/sage-sdxl.yaml``) are the published SDXL run
(SPEC 5): lr 5e-6 constant after 500 warmup steps, 5,000 steps, bf16, Adafactor, per-GPU batch
2 x 16 accumulation, caption dropout 0.2, beta 5000.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sage_builder.config_base import ModelRef, OptionalModelRef, StrictModel, execution


class GridConfig(StrictModel):
    """The levels x prompts PNG rendered with the trained adapter at the end of the stage."""

    enabled: bool = Field(True, description="draw grid.png at the end of the stage")
    prompts: list[str] = Field(default_factory=lambda: [
        "a crowded city street at night", "a portrait of a soldier", "a hospital corridor"],
        description="the grid's columns")
    steps: int = Field(20, ge=1, description="denoising steps per grid image")
    guidance: float = Field(5.0, ge=0.0, description="classifier-free guidance of the grid images")
    scale: float = Field(1.0, description="adapter scale used for the grid")
    seed: int = Field(0, description="noise seed of the grid (the same for every cell)")


class TrainConfig(StrictModel):
    backbone: Literal["sdxl", "sd15"] = Field("sdxl", description="the base pipeline's architecture")
    model: ModelRef = Field("stabilityai/stable-diffusion-xl-base-1.0",
                            description="base pipeline: hub id or local folder (frozen; the reference model)")
    revision: str | None = Field(None, description="hub revision (commit) of the base model to pin")
    dataset: OptionalModelRef = Field(None, description="stage-4 dataset: local folder or hub repo id "
                                      "(default: RUN/label/dataset)")
    train_split: str = Field("train", description="the dataset split trained on")
    eval_split: str | None = Field("validation", description="held-out split for implicit accuracy (null: none; "
                                  "`val`, the name before issue 16, reads an older dataset's held-out split)")
    eval_records: int = Field(256, ge=0, description="held-out records evaluated at the end (0: all)")
    eval_noise_draws: int = Field(4, ge=1, description="noise/timestep draws averaged per held-out record")

    n_user_tokens: int = Field(4, ge=1, description="user tokens appended after the text tokens (1 = the "
                               "published adapter: softmax over one key is constant, see SPEC 5)")
    adapter_scale: float = Field(1.0, description="default per-layer scale of the user branch")

    resolution: int = Field(1024, ge=8, description="training crop size in pixels (multiple of 8)")
    random_crop: bool = Field(True, description="random crop on the latent grid (8 px for SD/SDXL), the same for both images")
    random_flip: bool = Field(True, description="horizontal flip with p=0.5 (same for both images)")
    caption_dropout: float = Field(0.2, ge=0.0, le=1.0, description="probability a caption becomes \"\"")

    beta: float = Field(5000.0, gt=0, description="Diffusion-DPO beta (KL strength against the frozen "
                                                  "base)")
    max_steps: int = Field(5000, ge=1, description="optimizer steps (after gradient accumulation)")
    batch_size: int = Field(2, ge=1, description="pairs per GPU per micro-batch")
    gradient_accumulation: int = Field(16, ge=1, description="micro-batches per optimizer step")
    optimizer: Literal["adafactor", "adamw"] = Field("adafactor", description="optimizer of the adapter's "
                                                     "parameters")
    learning_rate: float = Field(5e-6, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled weight decay")
    lr_scheduler: Literal["constant_with_warmup", "constant", "linear", "cosine"] = Field(
        "constant_with_warmup", description="learning-rate schedule (diffusers' get_scheduler)")
    warmup_steps: int = Field(500, ge=0, description="optimizer steps of linear warm-up")
    max_grad_norm: float | None = Field(1.0, description="clip the adapter's gradient norm (null: no clipping)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "bf16", description="autocast for the frozen model; trainable weights stay float32 (forced to 'no' on CPU)")
    seed: int = Field(0, description="training RNG seed (noise, timesteps, order, crops, flips, dropout)")

    grid: GridConfig = Field(default_factory=GridConfig, description="the levels x prompts picture of the "
                             "trained adapter")

    checkpoint_every: int = execution(500, ge=1, description="steps between checkpoints in RUN/train/checkpoints")
    keep_checkpoints: int = execution(2, ge=1, description="checkpoints kept on disk (older ones deleted)")
    resume: bool = execution(True, description="continue from the latest checkpoint in RUN/train/checkpoints "
                             "(false: start over and delete them)")
    stop_at_step: int | None = execution(None, ge=1, description="stop after this step with a checkpoint, "
                                         "to split a run across jobs (the stage is then not done)")
    gradient_checkpointing: bool = execution(
        False, description="recompute the UNet's activations in backward instead of storing them: less GPU "
        "memory, a slower step, the same loss and gradients (to float tolerance)")
    cache_latents: bool = execution(True, description="VAE-encode each distinct image once (false: every step)")
    cache_text: bool = execution(True, description="encode each distinct caption once (false: every step)")
    log_every: int = execution(10, ge=1, description="optimizer steps between metric rows and log lines")
    device: str = execution("auto", description="cpu, cuda or auto (under `accelerate launch`: per process)")
    cpu_threads: int | None = execution(None, ge=1, description="torch threads when training on CPU (null: "
                                        "torch's default; 1 is much faster on a machine shared with other jobs)")
    embedding_model: OptionalModelRef = execution(
        None, description="`sage generate --profile`: the stage-1 LLM that embeds a new profile")
