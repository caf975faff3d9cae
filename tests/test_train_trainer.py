"""The Diffusion-DPO trainer on the tiny SDXL: exact resume, NaN stop, and the stage end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sage_builder.config  # noqa: F401  (loads the config tree before the stage section)
from sage_builder.stages.train.config import TrainConfig
from sage_builder.stages.train.data import load_preference_data
from sage_builder.stages.train.synthetic import write_synthetic_dataset
from sage_builder.stages.train.trainer import AdapterTrainer, TrainingError, load_base_pipeline


def _config(**overrides) -> TrainConfig:
    values = dict(resolution=64, max_steps=4, batch_size=2, gradient_accumulation=2, optimizer="adamw",
                  learning_rate=1e-3, warmup_steps=2, lr_scheduler="constant_with_warmup", beta=500.0,
                  caption_dropout=0.5, random_flip=True, random_crop=True, device="cpu", checkpoint_every=2,
                  eval_split=None, grid={"enabled": False})
    values.update(overrides)
    return TrainConfig(**values)


def _trainer(config: TrainConfig, data, work: Path, models_dir: Path) -> AdapterTrainer:
    return AdapterTrainer(config, data, work, "test-fingerprint",
                          lambda dtype: load_base_pipeline("sdxl", str(models_dir / "tiny-sdxl"), dtype=dtype),
                          "tiny-sdxl")


def _train(config, data, work, models_dir):
    trainer = _trainer(config, data, work, models_dir)
    try:
        result = trainer.train(data.splits["train"])
        return {k: v.clone() for k, v in trainer.adapter.state_dict().items()}, result
    finally:
        trainer.close()


@pytest.mark.slow
def test_resume_is_bitwise_identical(tmp_path, models_dir):
    data = load_preference_data(write_synthetic_dataset(tmp_path / "ds", n_train_pairs=3, n_val_pairs=0), ["train"])
    straight, result = _train(_config(), data, tmp_path / "straight", models_dir)
    assert result.finished and result.step == 4 and len(result.metrics) == 4
    assert set(result.metrics[0]) >= {"loss", "implicit_accuracy", "reward_margin", "lr", "images_per_s"}
    assert result.metrics[0]["lr"] == pytest.approx(5e-4)  # warmup: step 1 of 2

    # The split run also recomputes activations in backward (train.gradient_checkpointing, an
    # execution setting: a resume may switch it); on CPU that changes no bit of the weights.
    _, first = _train(_config(stop_at_step=2, gradient_checkpointing=True), data, tmp_path / "split", models_dir)
    assert not first.finished and first.step == 2
    assert [p.name for p in (tmp_path / "split" / "checkpoints").iterdir()] == ["step-00000002"]
    resumed, second = _train(_config(resume=True, gradient_checkpointing=True), data, tmp_path / "split", models_dir)
    # The metrics rows of the first invocation come back from the checkpoint.
    assert second.finished and [m["step"] for m in second.metrics] == [1, 2, 3, 4]
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert untimed(second.metrics) == untimed(result.metrics)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(v.abs().sum() > 0 for k, v in straight.items() if "to_v" in k)  # it did train
    assert (tmp_path / "split" / "logs").exists()  # TensorBoard events

    with pytest.raises(TrainingError, match="another train config"):
        _resume_with_other_fingerprint(data, tmp_path / "split", models_dir)


def _resume_with_other_fingerprint(data, work, models_dir):
    trainer = AdapterTrainer(_config(resume=True), data, work, "another-fingerprint",
                             lambda dtype: load_base_pipeline("sdxl", str(models_dir / "tiny-sdxl"), dtype=dtype),
                             "tiny-sdxl")
    try:
        trainer.train(data.splits["train"])
    finally:
        trainer.close()


@pytest.mark.slow
def test_nan_loss_stops_with_the_step(tmp_path, models_dir, monkeypatch):
    from sage_builder.stages.train import trainer as trainer_module

    data = load_preference_data(write_synthetic_dataset(tmp_path / "ds", n_train_pairs=2, n_val_pairs=0), ["train"])
    real = trainer_module.dpo_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, z = real(*args, **kwargs)
        return (loss * float("nan"), z) if calls["n"] == 3 else (loss, z)

    monkeypatch.setattr(trainer_module, "dpo_loss", poisoned)
    with pytest.raises(TrainingError, match=r"step 2 \(micro-batch 2\): loss is nan"):
        _train(_config(), data, tmp_path / "work", models_dir)
