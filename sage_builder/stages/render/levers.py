"""Render speed levers: how fast the same images come out, never what they are.

Every lever here only reorders or fuses floating-point work: fused QKV projections (one matmul
instead of three), ``torch.compile`` of the UNet and of the VAE decode (modes and the inductor
flags of diffusers' "accelerate inference" guide), channels-last memory, and the SDPA kernel.
Within bf16 noise they give the same images (``tests/test_render_levers.py`` checks each against
the eager path on CPU), so they are execution-only settings and stay out of image keys, like
``batch_size``. Their bits are not guaranteed equal: a run resumed with other levers mixes both
roundings, and the manifest records the levers each run used.

A compiled worker sees one shape per model: batches are padded to ``render.batch_size`` and the
VAE decodes one image at a time, so each worker compiles once per shape and a resume pays that
once per worker again (inductor's on-disk cache makes a rerun on the same machine cheaper).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sage_builder.errors import StageInputError

# diffusers' "accelerate inference of text-to-image diffusion models" guide, for SDXL.
INDUCTOR_FLAGS = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
                  "coordinate_descent_check_all_directions": True}


@dataclass(frozen=True)
class RenderLevers:
    """The speed levers of one worker (from the render config's execution-only fields)."""

    compile: bool = False
    compile_mode: str = "default"
    compile_vae: bool = False
    inductor_flags: bool = False
    fuse_qkv: bool = False
    sdpa_backend: str = "auto"

    @classmethod
    def from_config(cls, config: Any) -> RenderLevers:
        return cls(compile=config.compile, compile_mode=config.compile_mode, compile_vae=config.compile_vae,
                   inductor_flags=config.inductor_flags, fuse_qkv=config.fuse_qkv, sdpa_backend=config.sdpa_backend)

    @property
    def compiled(self) -> bool:
        return self.compile or self.compile_vae

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def apply_levers(pipe: Any, levers: RenderLevers, device: str) -> Any:
    """Fuse, lay out and compile ``pipe``'s UNet and VAE decode as ``levers`` say; returns ``pipe``."""
    check_levers(levers, device)
    fuse_projections(pipe, levers)
    return compile_pipeline(pipe, levers, device)


def check_levers(levers: RenderLevers, device: str) -> None:
    if levers.sdpa_backend in ("cudnn", "efficient") and not device.startswith("cuda"):
        raise StageInputError(f"render.sdpa_backend: '{levers.sdpa_backend}' needs CUDA, the device is {device}; "
                              "use auto, math or flash")
    if levers.compile_mode == "reduce-overhead" and levers.compiled and not device.startswith("cuda"):
        raise StageInputError(f"render.compile_mode: 'reduce-overhead' is CUDA graphs, the device is {device}; "
                              "use default or max-autotune")


def fuse_projections(pipe: Any, levers: RenderLevers) -> None:
    if levers.fuse_qkv:
        pipe.fuse_qkv_projections()  # diffusers' own: FusedAttnProcessor2_0 on the UNet and the VAE


def compile_pipeline(pipe: Any, levers: RenderLevers, device: str) -> Any:
    """``torch.compile`` the UNet and/or the VAE decode, channels-last on CUDA; returns ``pipe``."""
    import torch

    if not levers.compiled:
        return pipe
    if levers.inductor_flags:
        for name, value in INDUCTOR_FLAGS.items():
            setattr(torch._inductor.config, name, value)
    cuda = device.startswith("cuda")
    # dynamic=False: padded batches give one shape, so another shape is a recompile, never a slower
    # dynamic-shape graph.
    options: dict[str, Any] = {"mode": levers.compile_mode, "dynamic": False}
    if levers.compile:
        if cuda:
            pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, **options)
    if levers.compile_vae:
        if cuda:
            pipe.vae.to(memory_format=torch.channels_last)
        pipe.vae.decode = torch.compile(pipe.vae.decode, **options)
    return pipe
