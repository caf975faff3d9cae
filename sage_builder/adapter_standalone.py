"""Load a sage-builder user adapter into a plain diffusers pipeline: torch, diffusers and safetensors only.

This file imports nothing of sage-builder. Stage 6 copies it into every adapter folder as
``sage_user_adapter.py``, so an adapter folder is usable on its own (see docs/adapter.md)::

    import sys; sys.path.insert(0, "path/to/adapter")
    from diffusers import StableDiffusionXLPipeline
    from sage_user_adapter import load_user_adapter

    pipe = StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    adapter = load_user_adapter(pipe.unet, "path/to/adapter")
    embedding = ...  # the user's float32 vector: the `embedding` column of the dataset's `users` config
    image = pipe("a prompt", cross_attention_kwargs=adapter.kwargs(embedding)).images[0]

The adapter (SPEC 5): ``tokens = LayerNorm(Linear(embedding).reshape(n_tokens, D))``; in every
cross-attention layer, attention of the layer's queries over the user tokens through the adapter's own
key/value projections is added, times ``scale``, to the text attention output before the output
projection. ``adapter.kwargs(None)`` (or scale 0) is the base model exactly.

sage-builder's own adapter (``sage_builder/adapter.py``) runs the same
``decoupled_attention`` below, so the two cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
TOKENS_KWARG = "ip_hidden_states"  # the cross_attention_kwargs name diffusers reserves for IP-Adapter tokens


class _AdapterOff:
    """The value of ``TOKENS_KWARG`` that switches the user branch off (the base UNet, exactly)."""

    def __repr__(self) -> str:
        return "ADAPTER_OFF"


ADAPTER_OFF = _AdapterOff()


def tile_user_tokens(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Tokens for a UNet batch: as they are, or tiled when they divide it (classifier-free guidance
    concatenates [unconditional; conditional], which then both get the same user)."""
    if tokens.shape[0] == batch_size:
        return tokens
    if batch_size % tokens.shape[0] == 0:
        return tokens.repeat(batch_size // tokens.shape[0], 1, 1)
    raise ValueError(f"user adapter: {tokens.shape[0]} user rows cannot condition a batch of {batch_size}")


def decoupled_attention(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                        attention_mask: torch.Tensor | None, temb: torch.Tensor | None, tokens: Any,
                        to_k: nn.Module, to_v: nn.Module, scale: float) -> torch.Tensor:
    """diffusers' ``AttnProcessor2_0`` plus the user branch (``tokens`` is a (B_u, n, D) tensor or ADAPTER_OFF)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    inner_dim = key.shape[-1]
    head_dim = inner_dim // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                   dropout_p=0.0, is_causal=False)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)

    if tokens is not ADAPTER_OFF:
        tokens = tile_user_tokens(tokens, batch_size)
        user_key = to_k(tokens.to(to_k.weight.dtype)).to(query.dtype)
        user_value = to_v(tokens.to(to_v.weight.dtype)).to(query.dtype)
        user_key = user_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        user_value = user_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        user_states = F.scaled_dot_product_attention(query, user_key, user_value, dropout_p=0.0, is_causal=False)
        user_states = user_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states + scale * user_states.to(query.dtype)

    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class _Processor:
    def __init__(self, to_k: nn.Module, to_v: nn.Module, adapter: StandaloneUserAdapter):
        self.to_k, self.to_v, self.adapter = to_k, to_v, adapter

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 ip_hidden_states: Any = None, **kwargs: Any) -> torch.Tensor:
        tokens = ADAPTER_OFF if ip_hidden_states is None else ip_hidden_states
        return decoupled_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, tokens,
                                   self.to_k, self.to_v, self.adapter.scale)


class StandaloneUserAdapter(nn.Module):
    """The adapter's weights, installed on a UNet as attention processors of its cross-attention layers."""

    def __init__(self, config: dict[str, Any], state: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.scale = float(config.get("scale", 1.0))
        dim, n_tokens = int(config["cross_attention_dim"]), int(config["n_tokens"])
        self.n_tokens, self.dim = n_tokens, dim
        self.linear = nn.Linear(int(config["embedding_dim"]), n_tokens * dim)
        self.norm = nn.LayerNorm(dim)
        self.linear.load_state_dict({"weight": state["projection.linear.weight"],
                                     "bias": state["projection.linear.bias"]})
        self.norm.load_state_dict({"weight": state["projection.norm.weight"], "bias": state["projection.norm.bias"]})
        self.to_k = nn.ModuleDict()
        self.to_v = nn.ModuleDict()
        for layer, inner in zip(config["layers"], config["layer_dims"]):
            key = layer.removesuffix(".processor").replace(".", "__")
            for part, table in (("to_k", self.to_k), ("to_v", self.to_v)):
                linear = nn.Linear(dim, int(inner), bias=False)
                linear.load_state_dict({"weight": state[f"branches.{key}.{part}.weight"]})
                table[key] = linear

    def install(self, unet: Any) -> None:
        processors = dict(unet.attn_processors)
        for layer in self.config["layers"]:
            if layer not in processors:
                raise ValueError(f"the UNet has no layer {layer}: this adapter was made for the "
                                 f"{self.config.get('backbone')} backbone {self.config.get('base_model')}")
            key = layer.removesuffix(".processor").replace(".", "__")
            processors[layer] = _Processor(self.to_k[key], self.to_v[key], self)
        unet.set_attn_processor(dict(processors))  # set_attn_processor pops from the dict it is given

    @torch.no_grad()
    def tokens(self, embedding: Any) -> torch.Tensor:
        """User embedding(s), (embedding_dim,) or (B, embedding_dim) -> user tokens (B, n_tokens, D)."""
        vector = torch.as_tensor(embedding, dtype=torch.float32, device=self.linear.weight.device)
        vector = vector[None] if vector.ndim == 1 else vector
        return self.norm(self.linear(vector).reshape(vector.shape[0], self.n_tokens, self.dim))

    def kwargs(self, embedding: Any) -> dict[str, Any]:
        """``cross_attention_kwargs`` for a pipeline call for this user (None: the base model)."""
        return {TOKENS_KWARG: ADAPTER_OFF if embedding is None else self.tokens(embedding)}


def load_user_adapter(unet: Any, directory: str | Path, scale: float | None = None) -> StandaloneUserAdapter:
    """Read ``adapter_config.json`` + ``adapter.safetensors`` and install the adapter on ``unet``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    adapter = StandaloneUserAdapter(config, load_file(str(directory / WEIGHTS_NAME)))
    if scale is not None:
        adapter.scale = float(scale)
    adapter.to(unet.device)
    adapter.install(unet)
    return adapter
