"""The user adapter: clean install/remove, zero-init = base model, save/load, the DPO formula."""

from __future__ import annotations

import math

import pytest
import torch

from sage_builder.errors import SageError
from sage_builder.adapter import UserAdapter, UserAttnProcessor, cross_attention_layers
from sage_builder.stages.train.trainer import dpo_loss


@pytest.fixture(scope="module")
def tiny_sdxl():
    from sage_builder.models.tiny_diffusion import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe, prompts=("a cat", "a dog"), kwargs=None):
    with torch.no_grad():
        return pipe(list(prompts), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np", height=64, width=64, cross_attention_kwargs=kwargs).images


def test_install_remove_leaves_unet_unchanged(tiny_sdxl):
    unet = tiny_sdxl.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    adapter = UserAdapter.for_unet(unet, embedding_dim=16, n_tokens=4)
    adapter.install(unet)
    installed = unet.attn_processors
    cross = {name for name, _ in cross_attention_layers(unet)}
    assert cross and all(isinstance(installed[n], UserAttnProcessor) for n in cross)
    assert all(not isinstance(p, UserAttnProcessor) for n, p in installed.items() if n not in cross)  # self-attn
    assert unet.state_dict().keys() == before.keys()  # the adapter's weights never enter the UNet
    adapter.remove()
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors


@pytest.mark.slow
def test_zero_init_adapter_output_equals_base_exactly(tiny_sdxl):
    base = _render(tiny_sdxl)
    adapter = UserAdapter.for_unet(tiny_sdxl.unet, embedding_dim=16, n_tokens=4)
    adapter.install(tiny_sdxl.unet)
    try:
        zero_init = _render(tiny_sdxl, kwargs=adapter.attention_kwargs(adapter(torch.randn(1, 16))))
        assert (zero_init == base).all()
        for branch in adapter.branches.values():
            torch.nn.init.normal_(branch.to_v.weight, std=0.1)
            torch.nn.init.normal_(branch.to_k.weight, std=0.1)
        trained = _render(tiny_sdxl, kwargs=adapter.attention_kwargs(adapter(torch.randn(1, 16))))
        assert not (trained == base).all()
        # The DPO reference: exactly the base UNet.
        assert (_render(tiny_sdxl, kwargs=adapter.reference_kwargs()) == base).all()
        adapter.set_scale(0.0)
        assert (_render(tiny_sdxl, kwargs=adapter.attention_kwargs(adapter(torch.randn(1, 16)))) == base).all()
    finally:
        adapter.remove()
    assert (_render(tiny_sdxl) == base).all()


def test_forward_without_user_tokens_is_an_error(tiny_sdxl):
    adapter = UserAdapter.for_unet(tiny_sdxl.unet, embedding_dim=16)
    adapter.install(tiny_sdxl.unet)
    try:
        with pytest.raises(SageError, match="without user tokens"):
            _render(tiny_sdxl, ("x",))
    finally:
        adapter.remove()


@pytest.mark.slow
def test_save_load_roundtrip_onto_saved_sdxl_and_sd15(tmp_path, models_dir):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    for backbone, cls, folder in (("sdxl", StableDiffusionXLPipeline, "tiny-sdxl"),
                                  ("sd15", StableDiffusionPipeline, "tiny-sd15")):
        pipe = cls.from_pretrained(models_dir / folder)
        pipe.set_progress_bar_config(disable=True)
        adapter = UserAdapter.for_unet(pipe.unet, embedding_dim=8, n_tokens=2, backbone=backbone)
        assert adapter.config.cross_attention_dim == pipe.unet.config.cross_attention_dim
        for branch in adapter.branches.values():
            torch.nn.init.normal_(branch.to_v.weight, std=0.1)
        adapter.save(tmp_path / backbone)
        loaded = UserAdapter.load(tmp_path / backbone)
        assert loaded.config.n_tokens == 2 and loaded.config.backbone == backbone
        assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), loaded.state_dict().values()))
        embedding = torch.randn(1, 8)
        outputs = []
        for candidate in (adapter, loaded):
            candidate.install(pipe.unet)
            with torch.no_grad():
                outputs.append(pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                                    output_type="np", height=64, width=64,
                                    cross_attention_kwargs=candidate.attention_kwargs(candidate(embedding))).images)
            candidate.remove()
        assert (outputs[0] == outputs[1]).all()


def test_single_token_is_available_and_recorded(tiny_sdxl, tmp_path):
    adapter = UserAdapter.for_unet(tiny_sdxl.unet, embedding_dim=4, n_tokens=1)
    assert adapter(torch.randn(3, 4)).shape == (3, 1, tiny_sdxl.unet.config.cross_attention_dim)
    adapter.save(tmp_path)
    assert UserAdapter.load(tmp_path).config.n_tokens == 1


def test_dpo_loss_matches_the_formula():
    torch.manual_seed(0)
    target = torch.randn(4, 4, 2, 2)  # [chosen x2; rejected x2]
    policy, reference = target + 0.1 * torch.randn_like(target), target + 0.1 * torch.randn_like(target)
    loss, z = dpo_loss(policy, reference, target, beta=5000.0)
    mse = lambda a: ((a - target) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    lp, lr = mse(policy), mse(reference)
    expected_z = -2500.0 * ((lp[:2] - lp[2:]) - (lr[:2] - lr[2:]))
    assert torch.allclose(z, expected_z)
    assert math.isclose(loss.item(), float(-torch.nn.functional.logsigmoid(expected_z).mean()), rel_tol=1e-6)
    zero_loss, zero_z = dpo_loss(reference, reference, target, beta=5000.0)
    assert torch.all(zero_z == 0) and math.isclose(zero_loss.item(), math.log(2), rel_tol=1e-6)
