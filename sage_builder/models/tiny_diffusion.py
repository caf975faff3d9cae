"""Tiny random-weight SDXL and SD1.5 pipelines, built in code (sizes as in diffusers' own tests).

They run the real diffusers code paths (tokenizers, text encoders, UNet with cross-attention,
VAE, scheduler) in about a second on a CPU, and are saved as ordinary pipeline folders so that the
stages load them through ``from_pretrained`` exactly like real checkpoints. Their images are noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# 64 px images = 32 px latents with the two-block VAE below.
TINY_RESOLUTION = 64


def _char_tokenizer() -> Any:
    """A character-level CLIP tokenizer: the byte-level alphabet, each also as a word end."""
    from transformers import CLIPTokenizer

    from sage_builder.models.clip_tokenizer import byte_alphabet

    alphabet = byte_alphabet()
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    for char in alphabet:
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>")


def _text_config(tokenizer: Any, with_projection: bool) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, projection_dim=32, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4, sample_size=TINY_RESOLUTION,
    )


def _scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing="leading")


def _tiny_unet(**extra: Any) -> Any:
    """The two-block UNet of diffusers' own tests; ``extra`` adds the backbone's conditioning."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=TINY_RESOLUTION // 2,
        in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), norm_num_groups=32, **extra,
    )


def build_tiny_sdxl_pipeline(seed: int = 0, clip_tokenizer: Path | None = None) -> Any:
    """A StableDiffusionXLPipeline with ~2 M random parameters (deterministic for a seed).

    ``clip_tokenizer``: the folder of the real CLIP BPE (``save_clip_tokenizer``), so that prompts are
    tokenized and cut at 77 tokens exactly as by SDXL (its text encoders then have 49,408 embeddings,
    ~5 M parameters more); without it, a character tokenizer (77 characters) for in-code tests.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = _tiny_unet(use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                      cross_attention_dim=64)
    torch.manual_seed(seed + 1)
    vae = _vae()
    if clip_tokenizer is not None:
        tokenizer = CLIPTokenizer.from_pretrained(Path(clip_tokenizer) / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(Path(clip_tokenizer) / "tokenizer_2")
    else:
        tokenizer, tokenizer_2 = _char_tokenizer(), _char_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer, False))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, True))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler(),
    )


def build_tiny_sd15_pipeline(seed: int = 0) -> Any:
    """A StableDiffusionPipeline (SD1.5 layout) with random weights and no safety checker."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = _tiny_unet(cross_attention_dim=32)
    torch.manual_seed(seed + 1)
    vae = _vae()
    tokenizer = _char_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer, False))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _save(build: Any, out: Path, vocab_size: int | None = None) -> Path:
    """Save ``build()`` as a pipeline folder, unless one with a tokenizer of ``vocab_size`` is there
    (a folder from an earlier version, with the character tokenizer, is rebuilt)."""
    import json
    import shutil

    out = Path(out)
    if (out / "model_index.json").exists():
        saved = out / "tokenizer" / "tokenizer.json"
        if vocab_size is None or (saved.exists() and len(json.loads(saved.read_text("utf-8"))["model"]["vocab"])
                                  == vocab_size):
            return out
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build().save_pretrained(tmp)
    tmp.rename(out)
    return out


CLIP_VOCAB_SIZE = 49408


def save_tiny_sdxl(out: Path, clip_tokenizer: Path | None = None) -> Path:
    return _save(lambda: build_tiny_sdxl_pipeline(clip_tokenizer=clip_tokenizer), out,
                 CLIP_VOCAB_SIZE if clip_tokenizer is not None else None)


def save_tiny_sd15(out: Path) -> Path:
    return _save(build_tiny_sd15_pipeline, out)


def build_random_sdxl_base(device: str, dtype: Any, vae_dtype: Any = None) -> Any:
    """The SDXL base 1.0 architecture (published configs) with random weights, built on ``device``.

    For GPU benchmarks without hub access: random weights do not change speed. ``vae_dtype``
    defaults to ``dtype``. The tokenizers are the character-level ones of the tiny pipelines.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = _char_tokenizer(), _char_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, use_linear_projection=True, norm_num_groups=32,
        ).to(dtype)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
        ).to(vae_dtype or dtype)
        common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                    num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu",
                                                    **common)).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
            projection_dim=1280, hidden_act="gelu", **common)).to(dtype)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
