"""The user adapter (SPEC 5): a projection of the user embedding into tokens, and decoupled
cross-attention over those tokens in every cross-attention layer of the UNet (IP-Adapter style).

- ``UserProjection``: Linear(embedding dim -> n_tokens x D) then LayerNorm(D), D = the UNet's
  cross-attention dim.
- ``UserAttnProcessor``: a diffusers attention processor. The text path is exactly
  ``AttnProcessor2_0``; the user path attends with the *same* queries over the user tokens through
  new, zero-initialised key/value projections, and its output times the layer's ``scale`` is added
  before the output projection. Self-attention layers keep their own processors.
- The processors are plain objects (not ``nn.Module``) that point at this adapter's weights, so
  installing them never adds parameters to the UNet's ``state_dict`` and never changes its dtype.
  ``remove`` puts the original processors back.
- The attention math is ``adapter_standalone.decoupled_attention``: ``adapter_standalone.py`` imports
  nothing of this package and is copied into every adapter folder as ``sage_user_adapter.py``, so
  plain diffusers users load the same adapter with the same code (docs/adapter.md).

How user tokens reach the processors: through the call, as diffusers' IP-Adapter processors get
their extra tokens. The UNet is called with ``cross_attention_kwargs=adapter.attention_kwargs(tokens)``
(the policy) or ``adapter.reference_kwargs()`` (every processor behaves exactly like the base
layer: the reference model of Diffusion-DPO); a pipeline takes the same ``cross_attention_kwargs``.
diffusers hands these kwargs down every block to every attention processor, and a gradient-
checkpointed block recomputes its forward pass from the arguments it was called with, so the tokens
are there again during the recompute (``train.gradient_checkpointing``). There is no shared state:
a forward pass without either kwarg is an error, so a missing user can never silently become
"no user". The kwarg's name is ``ip_hidden_states``, the one diffusers reserves for IP-Adapter
tokens: its self-attention processors ignore it without a warning.

Batch rule: the tokens' batch B_u must equal the UNet batch B, or divide it, in which case the
tokens are tiled. Classifier-free guidance concatenates [unconditional; conditional], so tiling
gives the unconditional branch the *same* user tokens as the conditional one. That is the
documented choice: training drops the caption (``caption_dropout``) but never the user, so the
empty-caption-plus-user input is one the adapter was trained on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sage_builder.errors import SageError
from sage_builder.adapter_standalone import (
    ADAPTER_OFF,
    CONFIG_NAME,
    TOKENS_KWARG,
    WEIGHTS_NAME,
    _AdapterOff,
    decoupled_attention,
    tile_user_tokens,
)

FORMAT_VERSION = 1
# Copied into every adapter folder: loads it into plain diffusers without this package (docs/adapter.md).
STANDALONE_NAME = "sage_user_adapter.py"
CARD_NAME = "README.md"


@dataclass
class AdapterConfig:
    embedding_dim: int
    cross_attention_dim: int
    n_tokens: int = 4
    scale: float = 1.0
    layers: list[str] = field(default_factory=list)
    layer_dims: list[int] = field(default_factory=list)
    backbone: str = "sdxl"
    # Portable references (issue 16): a hub id, or a local folder's name and content identity, never a path.
    base_model: str | None = None
    base_model_identity: str | None = None
    base_model_revision: str | None = None
    # A hub id; or "label/dataset" with dataset_base "run": relative to the run dir (the adapter's ../..).
    dataset: str | None = None
    dataset_base: str | None = None
    dataset_identity: str | None = None
    embedding_model: str | None = None
    uncond_user_input: str = "same user tokens as the conditional branch"
    format_version: int = FORMAT_VERSION
    training: dict[str, Any] = field(default_factory=dict)


class UserProjection(nn.Module):
    def __init__(self, embedding_dim: int, n_tokens: int, dim: int):
        super().__init__()
        self.n_tokens = n_tokens
        self.dim = dim
        self.linear = nn.Linear(embedding_dim, n_tokens * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        tokens = self.linear(embedding).reshape(embedding.shape[0], self.n_tokens, self.dim)
        return self.norm(tokens)


class UserBranch(nn.Module):
    """The new weights of one cross-attention layer: user key and value projections."""

    def __init__(self, cross_attention_dim: int, inner_dim: int):
        super().__init__()
        self.to_k = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        nn.init.zeros_(self.to_k.weight)
        nn.init.zeros_(self.to_v.weight)


class UserAttnProcessor:
    """AttnProcessor2_0 plus attention over the user tokens (cross-attention layers only)."""

    def __init__(self, name: str, branch: UserBranch, scale: float):
        self.name = name
        self.branch = branch
        self.scale = scale

    @staticmethod
    def _user_tokens(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
        try:
            return tile_user_tokens(tokens, batch_size)
        except ValueError as exc:
            raise SageError(str(exc)) from None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, ip_hidden_states: torch.Tensor | _AdapterOff | None = None, **kwargs: Any
                 ) -> torch.Tensor:
        if ip_hidden_states is None:
            raise SageError("user adapter: UNet called without user tokens; pass cross_attention_kwargs="
                            "adapter.attention_kwargs(tokens), or adapter.reference_kwargs() for the base model")
        if ip_hidden_states is not ADAPTER_OFF:
            batch = (hidden_states.shape[0] if encoder_hidden_states is None else encoder_hidden_states.shape[0])
            ip_hidden_states = self._user_tokens(ip_hidden_states, batch)
        return decoupled_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                   ip_hidden_states, self.branch.to_k, self.branch.to_v, self.scale)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors' own serialisation, with its JSON header rewritten in sorted key order.

    The library writes ``__metadata__`` from a hash map whose order changes from process to process,
    so two saves of equal tensors could differ in bytes. Key order does not change the data offsets
    (they are relative to the data section), and the header stays padded to 8 bytes with spaces, as
    the library pads it.
    """
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little"))
        handle.write(header)
        handle.write(memoryview(raw)[8 + size:])


def cross_attention_layers(unet: Any) -> list[tuple[str, int]]:
    """(processor name, inner dim) of every cross-attention layer, in ``attn_processors`` order."""
    from diffusers.models.attention_processor import Attention

    modules = dict(unet.named_modules())
    layers = []
    for name in unet.attn_processors:
        module = modules[name.removesuffix(".processor")]
        if isinstance(module, Attention) and module.is_cross_attention:
            layers.append((name, module.to_q.out_features))
    return layers


def _key(layer_name: str) -> str:
    return layer_name.removesuffix(".processor").replace(".", "__")


class UserAdapter(nn.Module):
    """Projection + per-layer user branches; installs itself on a UNet as attention processors."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        if len(config.layers) != len(config.layer_dims) or not config.layers:
            raise SageError("user adapter config: `layers` and `layer_dims` must list the same cross-attention layers")
        self.config = config
        self.projection = UserProjection(config.embedding_dim, config.n_tokens, config.cross_attention_dim)
        self.branches = nn.ModuleDict({_key(name): UserBranch(config.cross_attention_dim, dim)
                                       for name, dim in zip(config.layers, config.layer_dims)})
        self.scales = {name: float(config.scale) for name in config.layers}
        self._installed: tuple[Any, dict[str, Any]] | None = None

    @classmethod
    def for_unet(cls, unet: Any, embedding_dim: int, n_tokens: int = 4, scale: float = 1.0, **extra: Any
                 ) -> UserAdapter:
        layers = cross_attention_layers(unet)
        if not layers:
            raise SageError("user adapter: this UNet has no cross-attention layers")
        config = AdapterConfig(embedding_dim=embedding_dim, cross_attention_dim=int(unet.config.cross_attention_dim),
                               n_tokens=n_tokens, scale=scale, layers=[n for n, _ in layers],
                               layer_dims=[d for _, d in layers], **extra)
        return cls(config)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """User embeddings (B, embedding_dim) -> user tokens (B, n_tokens, D)."""
        return self.projection(embedding)

    def set_scale(self, scale: float | dict[str, float]) -> None:
        """One scale for every layer, or {layer name: scale} for some."""
        updates = scale if isinstance(scale, dict) else {name: float(scale) for name in self.scales}
        unknown = set(updates) - set(self.scales)
        if unknown:
            raise SageError(f"user adapter: no cross-attention layer named {sorted(unknown)[0]}")
        self.scales.update(updates)
        if self._installed is not None:
            for name, processor in self._installed[0].attn_processors.items():
                if isinstance(processor, UserAttnProcessor) and processor.branch is self.branches[_key(name)]:
                    processor.scale = self.scales[name]

    def install(self, unet: Any) -> None:
        if self._installed is not None:
            raise SageError("user adapter: already installed on a UNet; remove it first")
        original = dict(unet.attn_processors)
        missing = [name for name in self.config.layers if name not in original]
        if missing:
            raise SageError(f"user adapter: the UNet has no layer {missing[0]} (adapter made for another backbone?)")
        processors = dict(original)
        for name in self.config.layers:
            processors[name] = UserAttnProcessor(name, self.branches[_key(name)], self.scales[name])
        unet.set_attn_processor(dict(processors))  # set_attn_processor pops from the dict it is given
        self._installed = (unet, original)

    def remove(self) -> None:
        if self._installed is None:
            return
        unet, original = self._installed
        unet.set_attn_processor(dict(original))
        self._installed = None

    def attention_kwargs(self, tokens: torch.Tensor) -> dict[str, Any]:
        """``cross_attention_kwargs`` for a UNet or pipeline call that attends to these user tokens
        (B_u, n_tokens, D)."""
        return {TOKENS_KWARG: tokens}

    @staticmethod
    def reference_kwargs() -> dict[str, Any]:
        """``cross_attention_kwargs`` for a call that is exactly the base UNet's (the DPO reference)."""
        return {TOKENS_KWARG: ADAPTER_OFF}

    def save(self, directory: Path | str, **training: Any) -> Path:
        from sage_builder.store import atomic_path, atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            write_safetensors(tmp, state, {"format": "pt", "sage_adapter": str(FORMAT_VERSION)})
        config = asdict(self.config)
        if training:
            config["training"] = {**config.get("training", {}), **training}
        atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
        standalone = Path(__file__).parent / "adapter_standalone.py"
        atomic_write_text(directory / STANDALONE_NAME, standalone.read_text())
        return directory

    @classmethod
    def load(cls, directory: Path | str) -> UserAdapter:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists() or not (directory / WEIGHTS_NAME).exists():
            raise SageError(f"{directory}: not a user adapter folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        data = json.loads((directory / CONFIG_NAME).read_text())
        known = set(AdapterConfig.__dataclass_fields__)
        adapter = cls(AdapterConfig(**{k: v for k, v in data.items() if k in known}))
        state = load_file(str(directory / WEIGHTS_NAME))
        missing, unexpected = adapter.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SageError(f"{directory / WEIGHTS_NAME}: weights do not match {CONFIG_NAME} "
                            f"(missing {missing[:1]}, unexpected {unexpected[:1]})")
        return adapter
