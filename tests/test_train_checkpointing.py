"""Gradient checkpointing (`train.gradient_checkpointing`) on the tiny SDXL: same loss and gradients.

The user tokens travel in the UNet call (`cross_attention_kwargs`), so a checkpointed block that
recomputes its forward pass during backward attends to them again. With the tokens in shared state
(the old design) the recompute ran outside the forward's context and failed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import sage_builder.config  # noqa: F401  (loads the config tree before the stage section)
from sage_builder import adapter as adapter_module
from sage_builder.stages.train.config import TrainConfig
from sage_builder.stages.train.data import load_preference_data
from sage_builder.stages.train.synthetic import write_synthetic_dataset
from sage_builder.stages.train.trainer import AdapterTrainer, load_base_pipeline


def _trainer(tmp_path: Path, models_dir: Path, data, checkpointing: bool) -> AdapterTrainer:
    config = TrainConfig(resolution=64, batch_size=2, gradient_accumulation=1, optimizer="adamw", device="cpu",
                         eval_split=None, grid={"enabled": False}, gradient_checkpointing=checkpointing)
    return AdapterTrainer(config, data, tmp_path / f"work-{checkpointing}", "fp",
                          lambda dtype: load_base_pipeline("sdxl", str(models_dir / "tiny-sdxl"), dtype=dtype),
                          "tiny-sdxl")


def _loss_and_grads(trainer: AdapterTrainer, records) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, int]:
    """(loss, adapter gradients, processor calls in forward, processor calls in backward)."""
    from sage_builder.stages.train.trainer import PolicyUNet

    with torch.random.fork_rng(devices=[]):  # non-zero user branches, the same in both trainers
        torch.manual_seed(3)
        for branch in trainer.adapter.branches.values():
            torch.nn.init.normal_(branch.to_k.weight, std=0.05)
            torch.nn.init.normal_(branch.to_v.weight, std=0.05)
    trainer.prepare_caches(records)
    batch = trainer.make_batch(records[:2], torch.Generator().manual_seed(0))
    calls = {"n": 0}
    real = adapter_module.UserAttnProcessor.__call__

    @functools.wraps(real)  # diffusers passes a processor only the kwargs its signature names
    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    adapter_module.UserAttnProcessor.__call__ = counted
    try:
        loss, _ = trainer.forward_losses(PolicyUNet(trainer.adapter, trainer.frozen.unet), batch)
        forward_calls = calls["n"]
        loss.backward()
    finally:
        adapter_module.UserAttnProcessor.__call__ = real
    grads = {k: p.grad.detach().clone() for k, p in trainer.adapter.named_parameters()}
    return loss.detach(), grads, forward_calls, calls["n"] - forward_calls


@pytest.mark.slow
def test_checkpointing_gives_the_same_loss_and_gradients(tmp_path, models_dir):
    data = load_preference_data(write_synthetic_dataset(tmp_path / "ds", n_train_pairs=2, n_val_pairs=0), ["train"])
    results = {}
    for checkpointing in (False, True):
        trainer = _trainer(tmp_path, models_dir, data, checkpointing)
        try:
            assert trainer.frozen.unet.is_gradient_checkpointing == checkpointing
            results[checkpointing] = _loss_and_grads(trainer, data.splits["train"])
        finally:
            trainer.close()
        assert not trainer.frozen.unet.is_gradient_checkpointing  # close() leaves the pipeline as it was
    (loss, grads, fwd, bwd), (loss_ckpt, grads_ckpt, fwd_ckpt, bwd_ckpt) = results[False], results[True]
    # Policy + reference passes in forward; only the checkpointed run calls the processors again in
    # backward (the recompute of the policy pass, with the user tokens it was called with).
    assert fwd == fwd_ckpt > 0 and bwd == 0 and bwd_ckpt == fwd_ckpt // 2
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-8, msg=name)
    # The gradient reached the projection, i.e. through the user tokens of the recomputed blocks.
    assert grads_ckpt["projection.linear.weight"].abs().sum() > 0
