"""The Diffusion-DPO trainer of the user adapter (SPEC 5), on accelerate.

One optimizer step = ``gradient_accumulation`` micro-batches inside ONE ``accelerator.accumulate``
context each. A micro-batch of pairs runs:

1. cached latents of chosen and rejected (same crop, same flip), cached text embeddings (the
   caption dropped to "" with p = caption_dropout, for policy and reference alike);
2. one noise and one timestep per pair, shared by both images;
3. the policy UNet (adapter on) over [chosen; rejected] with gradients, the reference (the same
   frozen UNet, adapter disabled) without;
4. z = -(beta/2) * ((l_pol(w) - l_pol(l)) - (l_ref(w) - l_ref(l))), loss = -mean(log sigmoid z).

Only the adapter trains; its weights stay float32 (master weights) while the frozen UNet, VAE and
text encoders run in bf16 under autocast on GPU (float32 on CPU). Randomness comes from one
``torch.Generator`` (seeded by ``train.seed``) whose state is checkpointed with the adapter,
optimizer, scheduler, python/numpy/torch RNG states (accelerate) and the data position, so a
resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sage_builder.errors import SageError
from sage_builder.runtime import resolve_device
from sage_builder.adapter import UserAdapter
from sage_builder.stages.train.data import (
    LatentCache,
    PreferenceData,
    PreferenceRecord,
    TextCache,
    load_image,
    prepare_pixels,
)

if TYPE_CHECKING:
    from sage_builder.stages.train.config import TrainConfig

log = logging.getLogger("sage.train")
CHECKPOINT_PREFIX = "step-"


# Implicit accuracy of a model that cannot tell chosen from rejected (ties count half).
CHANCE_LEVEL = 0.5


def implicit_accuracy(z: np.ndarray | torch.Tensor) -> float:
    """Share of pairs the policy prefers as labelled (z > 0), a tie (z == 0) counting as half."""
    values = np.asarray(z, dtype=np.float64)
    if values.size == 0:
        return float("nan")
    return float(((values > 0).sum() + 0.5 * (values == 0).sum()) / values.size)


def accuracy_summary(zs: list[float]) -> dict[str, Any]:
    values = np.asarray(zs, dtype=np.float64)
    return {"records": int(values.size), "implicit_accuracy": implicit_accuracy(values),
            "ties": int((values == 0).sum()), "reward_margin": float(values.mean()) if values.size else 0.0}


def grouped_accuracy(zs: list[float], groups: list[str]) -> dict[str, dict[str, Any]]:
    """``accuracy_summary`` per group (the label's reason, or the category), groups in sorted order."""
    out = {}
    for name in sorted(set(groups)):
        out[name] = accuracy_summary([z for z, g in zip(zs, groups) if g == name])
    return out


class TrainingError(SageError):
    """Training cannot continue (NaN loss, incompatible checkpoint)."""


class FrozenDiffusion:
    """The base pipeline's frozen parts: text encoders, VAE, UNet and the training noise schedule."""

    def __init__(self, pipeline: Any, backbone: str, model_id: str, device: torch.device, weight_dtype: torch.dtype):
        from diffusers import DDPMScheduler

        self.pipeline = pipeline
        self.backbone = backbone
        self.model_id = model_id
        self.device = device
        self.weight_dtype = weight_dtype
        self.unet = pipeline.unet
        self.vae = pipeline.vae
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        for module in self._frozen_modules():
            module.requires_grad_(False)
            module.eval()
        # The VAE encodes in float32 when the checkpoint asks for it (SDXL's VAE overflows in fp16).
        vae_dtype = torch.float32 if getattr(self.vae.config, "force_upcast", False) else weight_dtype
        self.vae.to(device, vae_dtype)
        self.unet.to(device, weight_dtype)
        for encoder in self._text_encoders():
            encoder.to(device, weight_dtype)
        # Pixels per latent pixel: 8 for SD1.5/SDXL, 2 for the tiny test VAE.
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _text_encoders(self) -> list[nn.Module]:
        encoders = [self.pipeline.text_encoder]
        if self.backbone == "sdxl":
            encoders.append(self.pipeline.text_encoder_2)
        return encoders

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, *self._text_encoders()]

    @property
    def vae_id(self) -> str:
        return f"{self.model_id}#vae"

    @property
    def text_id(self) -> str:
        return f"{self.model_id}#text/{self.backbone}"

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.backbone == "sdxl":
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=captions, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            return {"embeds": embeds, "pooled": pooled}
        embeds, _ = self.pipeline.encode_prompt(captions, self.device, 1, False)
        return {"embeds": embeds}

    def added_cond(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        if self.backbone != "sdxl":
            return None
        return {"text_embeds": pooled, "time_ids": time_ids}

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise SageError(f"{self.model_id}: prediction type {kind!r} is not supported for training")


class PolicyUNet(nn.Module):
    """The trainable model accelerate wraps: user embeddings -> tokens -> UNet with the adapter on.

    The frozen UNet is held outside the module tree so distributed wrappers only see (and
    all-reduce) the adapter's parameters.
    """

    def __init__(self, adapter: UserAdapter, unet: nn.Module):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "_unet", unet)

    def forward(self, user_embedding: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                text_embeds: torch.Tensor, added_cond: dict[str, torch.Tensor] | None) -> torch.Tensor:
        tokens = self.adapter(user_embedding)
        return self._unet(noisy, timesteps, encoder_hidden_states=text_embeds, added_cond_kwargs=added_cond,
                          cross_attention_kwargs=self.adapter.attention_kwargs(tokens), return_dict=False)[0]


def dpo_loss(policy_pred: torch.Tensor, reference_pred: torch.Tensor, target: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-DPO (SPEC 5) over a batch laid out as [chosen; rejected]; returns (loss, z per pair)."""
    dims = list(range(1, target.ndim))
    policy_mse = (policy_pred.float() - target.float()).pow(2).mean(dim=dims)
    reference_mse = (reference_pred.float() - target.float()).pow(2).mean(dim=dims)
    policy_w, policy_l = policy_mse.chunk(2)
    reference_w, reference_l = reference_mse.chunk(2)
    z = -0.5 * beta * ((policy_w - policy_l) - (reference_w - reference_l))
    return -F.logsigmoid(z).mean(), z


class TrainerState:
    """Data position, the training generator and the metrics rows so far, checkpointed through
    accelerate: a resumed run's metrics are the whole run's, not only the last invocation's."""

    def __init__(self, seed: int):
        self.step = 0
        self.position = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.metrics: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "position": self.position, "generator": self.generator.get_state(),
                "metrics": [dict(row) for row in self.metrics]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.position = int(state["position"])
        self.generator.set_state(state["generator"])
        self.metrics = [dict(row) for row in state.get("metrics", [])]
        if len(self.metrics) != self.step:
            log.warning("train: the checkpoint at step %d holds metrics for %d step(s) (made by an older version); "
                        "metrics.parquet will lack the others", self.step, len(self.metrics))


@dataclass
class Batch:
    user_embedding: torch.Tensor
    latents: torch.Tensor  # [chosen; rejected]
    text_embeds: torch.Tensor
    pooled: torch.Tensor | None
    time_ids: torch.Tensor | None
    noise: torch.Tensor
    timesteps: torch.Tensor


@dataclass
class TrainResult:
    adapter: UserAdapter
    step: int
    finished: bool
    metrics: list[dict[str, float]] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class AdapterTrainer:
    """Builds the caches, runs the optimisation loop, checkpoints and evaluates."""

    def __init__(self, config: TrainConfig, data: PreferenceData, work_dir: Path, fingerprint: str,
                 load_pipeline: Callable[[torch.dtype], Any], model_id: str):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.config = config
        self.data = data
        self.work_dir = Path(work_dir)
        self.fingerprint = fingerprint
        device = resolve_device(config.device, "train.device")
        if device == "cpu" and config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        precision = config.mixed_precision if device != "cpu" else "no"
        self.accelerator = Accelerator(
            cpu=device == "cpu", mixed_precision=precision, gradient_accumulation_steps=config.gradient_accumulation,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.work_dir), logging_dir=str(self.work_dir / "logs")))
        weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.frozen = FrozenDiffusion(load_pipeline(weight_dtype), config.backbone, model_id,
                                      self.accelerator.device, weight_dtype)
        cache_dtype = torch.float32 if precision == "no" else torch.float16
        self.latents = LatentCache(self.work_dir / "cache" / "latents", self.frozen.encode_images,
                                   self.frozen.vae_id, config.resolution, cache_dtype)
        self.texts = TextCache(self.work_dir / "cache" / "text", self.frozen.encode_text, self.frozen.text_id,
                               cache_dtype)
        with torch.random.fork_rng(devices=[]):  # the projection's initial weights depend on train.seed only
            torch.manual_seed(config.seed)
            self.adapter = UserAdapter.for_unet(self.frozen.unet, data.embedding_dim,
                                                n_tokens=config.n_user_tokens, scale=config.adapter_scale,
                                                backbone=config.backbone)
        self.adapter.to(self.accelerator.device, torch.float32)
        self.adapter.install(self.frozen.unet)
        if config.gradient_checkpointing:
            # Recomputes each block's activations in backward instead of keeping them; the user tokens
            # travel in the call (cross_attention_kwargs), so the recompute sees them too.
            self.frozen.unet.enable_gradient_checkpointing()
        self.state = TrainerState(config.seed)
        self._perm_cache: dict[int, np.ndarray] = {}

    # ----- data ---------------------------------------------------------------------------------
    def prepare_caches(self, records: list[PreferenceRecord]) -> dict[str, Any]:
        """Check every record and build the latent and text caches (a no-op for what is cached)."""
        first_record: dict[str, str] = {}
        wanted: list[tuple[str, str]] = []
        for rec in records:
            first_record.setdefault(rec.pair_id, rec.record_id)
            self.data.user_embedding(rec.user_id, rec.record_id)
            wanted.extend([(rec.pair_id, rec.chosen), (rec.pair_id, rec.rejected)])
        stats: dict[str, Any] = {}
        if self.config.cache_latents:
            with self.accelerator.main_process_first():
                stats["latents"] = self.latents.build(self.data, wanted, first_record=first_record)
        else:
            for pair_id, variant in dict.fromkeys(wanted):  # still fail early on unreadable images
                load_image(self.data.image_bytes(pair_id, variant), f"record {first_record[pair_id]}, pair {pair_id}")
        if self.config.cache_text:
            with self.accelerator.main_process_first():
                stats["text"] = self.texts.build([r.caption for r in records] + [""])
        return stats

    def _permutation(self, epoch: int, n: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.config.seed, epoch]).permutation(n)}
        return self._perm_cache[epoch]

    def micro_batch_records(self, records: list[PreferenceRecord], position: int) -> list[PreferenceRecord]:
        """The records of micro-batch ``position`` for this process (a stream of epochs, each shuffled)."""
        size, world, rank = self.config.batch_size, self.accelerator.num_processes, self.accelerator.process_index
        out = []
        for j in range(size):
            index = (position * world + rank) * size + j
            epoch, offset = divmod(index, len(records))
            out.append(records[int(self._permutation(epoch, len(records))[offset])])
        return out

    def _pair_latents(self, rec: PreferenceRecord, flip: bool, top_left: Callable[[int, int], tuple[int, int]]
                      ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Chosen and rejected latents with the same flip and crop (on the latent grid), and SDXL's
        (original hw, crop top-left) ids. Uncached, the same crop is cut from the pixels and encoded."""
        factor = self.frozen.vae_scale_factor
        res = self.config.resolution // factor
        if self.config.cache_latents:
            entries = [self.latents.entry(rec.pair_id, v) for v in (rec.chosen, rec.rejected)]
            full = [e["latent_flipped" if flip else "latent"] for e in entries]
            original = [int(x) for x in entries[0]["original_size"]]
        else:
            full = []
            for variant in (rec.chosen, rec.rejected):
                image = load_image(self.data.image_bytes(rec.pair_id, variant),
                                   f"record {rec.record_id}, pair {rec.pair_id}")
                pixels, hw = prepare_pixels(image, self.config.resolution)
                full.append(pixels.flip(-1) if flip else pixels)
                original = list(hw)
        scale = 1 if self.config.cache_latents else factor
        if full[0].shape != full[1].shape:
            raise SageError(f"record {rec.record_id}: the two images of pair {rec.pair_id} differ in size")
        top, left = top_left(full[0].shape[-2] // scale - res, full[0].shape[-1] // scale - res)
        crop = (slice(None), slice(top * scale, (top + res) * scale), slice(left * scale, (left + res) * scale))
        chosen, rejected = full[0][crop], full[1][crop]
        if not self.config.cache_latents:
            chosen, rejected = self.frozen.encode_images(torch.stack([chosen, rejected])).cpu()
        return chosen, rejected, [*original, top * factor, left * factor]

    def make_batch(self, records: list[PreferenceRecord], gen: torch.Generator, augment: bool = True) -> Batch:
        """All randomness of a micro-batch, drawn in a fixed order from ``gen`` (augment=False: none
        but noise and timesteps: no flip, centre crop, no caption dropout, as for evaluation)."""
        cfg = self.config

        def top_left(spare_h: int, spare_w: int) -> tuple[int, int]:
            if augment and cfg.random_crop:
                return (int(torch.randint(0, spare_h + 1, (1,), generator=gen)),
                        int(torch.randint(0, spare_w + 1, (1,), generator=gen)))
            return spare_h // 2, spare_w // 2

        chosen, rejected, time_ids, captions = [], [], [], []
        for rec in records:
            flip = augment and cfg.random_flip and bool(torch.rand(1, generator=gen) < 0.5)
            w, lat_l, crop = self._pair_latents(rec, flip, top_left)
            chosen.append(w)
            rejected.append(lat_l)
            time_ids.append(crop + [cfg.resolution, cfg.resolution])
            drop = augment and cfg.caption_dropout > 0 and bool(torch.rand(1, generator=gen) < cfg.caption_dropout)
            captions.append("" if drop else rec.caption)
        latents = torch.stack(chosen + rejected).float()
        noise = torch.randn(latents[: len(records)].shape, generator=gen)
        timesteps = torch.randint(0, self.frozen.noise_scheduler.config.num_train_timesteps, (len(records),),
                                  generator=gen)
        if cfg.cache_text:
            texts = [self.texts.get(c) for c in captions]
            embeds = torch.stack([t["embeds"] for t in texts])
            pooled = torch.stack([t["pooled"] for t in texts]) if "pooled" in texts[0] else None
        else:
            out = self.frozen.encode_text(captions)
            embeds, pooled = out["embeds"], out.get("pooled")
        user = torch.from_numpy(np.stack([self.data.user_embedding(r.user_id, r.record_id) for r in records]))
        ids = torch.tensor(time_ids, dtype=torch.float32) if cfg.backbone == "sdxl" else None
        return Batch(user, latents, embeds, pooled, ids, noise, timesteps)

    # ----- one step -----------------------------------------------------------------------------
    def forward_losses(self, policy: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        device, dtype = self.accelerator.device, self.frozen.weight_dtype
        latents = batch.latents.to(device)
        noise = torch.cat([batch.noise, batch.noise]).to(device)
        timesteps = torch.cat([batch.timesteps, batch.timesteps]).to(device)
        noisy = self.frozen.noise_scheduler.add_noise(latents, noise, timesteps)
        target = self.frozen.target(latents, noise, timesteps)
        text = torch.cat([batch.text_embeds, batch.text_embeds]).to(device, dtype)
        added = None
        if batch.pooled is not None:
            added = self.frozen.added_cond(torch.cat([batch.pooled, batch.pooled]).to(device, dtype),
                                           torch.cat([batch.time_ids, batch.time_ids]).to(device, dtype))
        user = torch.cat([batch.user_embedding, batch.user_embedding]).to(device)
        with self.accelerator.autocast():
            policy_pred = policy(user, noisy.to(dtype), timesteps, text, added)
            with torch.no_grad():
                reference_pred = self.frozen.unet(noisy.to(dtype), timesteps, encoder_hidden_states=text,
                                                  added_cond_kwargs=added,
                                                  cross_attention_kwargs=self.adapter.reference_kwargs(),
                                                  return_dict=False)[0]
        return dpo_loss(policy_pred, reference_pred, target, self.config.beta)

    # ----- checkpoints --------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / "checkpoints"

    def checkpoints(self) -> list[Path]:
        if not self.checkpoint_dir.exists():
            return []
        return sorted(p for p in self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer.json").exists())

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.state.step:08d}"
        tmp = final.with_name(final.name + ".partial")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            follow_umask(tmp)
            (tmp / "trainer.json").write_text(json.dumps({"step": self.state.step, "position": self.state.position,
                                                         "fingerprint": self.fingerprint}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.checkpoints()[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def maybe_resume(self) -> None:
        found = self.checkpoints()
        if not self.config.resume:
            if found and self.accelerator.is_main_process:
                log.warning("train.resume=false: deleting %d checkpoint(s) in %s", len(found), self.checkpoint_dir)
                shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            return
        if not found:
            return
        latest = found[-1]
        meta = json.loads((latest / "trainer.json").read_text())
        if meta.get("fingerprint") != self.fingerprint:
            raise TrainingError(f"{latest}: checkpoint made with another train config or dataset; restore that "
                                f"config or start over with --set train.resume=false")
        self.accelerator.load_state(str(latest))
        log.info("train: resumed from %s (step %d)", latest, self.state.step)

    # ----- the loop -----------------------------------------------------------------------------
    def build_optimizer(self, params: list[nn.Parameter]) -> Any:
        cfg = self.config
        if cfg.optimizer == "adafactor":
            from transformers.optimization import Adafactor

            return Adafactor(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, scale_parameter=False,
                             relative_step=False, warmup_init=False)
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    def build_scheduler(self, optimizer: Any) -> Any:
        from diffusers.optimization import get_scheduler

        # accelerate steps a prepared scheduler once per process per optimizer step.
        world = self.accelerator.num_processes
        return get_scheduler(self.config.lr_scheduler, optimizer=optimizer,
                             num_warmup_steps=self.config.warmup_steps * world,
                             num_training_steps=self.config.max_steps * world)

    def train(self, records: list[PreferenceRecord], on_step: Callable[[dict[str, float]], None] | None = None
              ) -> TrainResult:
        from sage_builder.progress import progress

        cfg, acc = self.config, self.accelerator
        if not records:
            raise SageError(f"{self.data.source}: split '{cfg.train_split}' has no records to train on")
        started = time.time()
        cache_stats = self.prepare_caches(records)
        params = [p for p in self.adapter.parameters()]
        assert all(p.dtype == torch.float32 for p in params), "trainable weights must stay float32"
        optimizer = self.build_optimizer(params)
        scheduler = self.build_scheduler(optimizer)
        policy, optimizer, scheduler = acc.prepare(PolicyUNet(self.adapter, self.frozen.unet), optimizer, scheduler)
        acc.register_for_checkpointing(self.state)
        self.maybe_resume()
        if acc.is_main_process:
            acc.init_trackers("train", config={k: v for k, v in cfg.model_dump().items()
                                               if isinstance(v, (int, float, str, bool))})
        stop_at = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
        bar = progress(total=stop_at, desc="train", unit="step", initial=self.state.step)
        window: list[tuple[float, torch.Tensor]] = []
        tick, images = time.time(), 0
        policy.train()
        while self.state.step < stop_at:
            batch_records = self.micro_batch_records(records, self.state.position)
            batch = self.make_batch(batch_records, self.state.generator)
            with acc.accumulate(policy):
                loss, z = self.forward_losses(policy, batch)
                if not torch.isfinite(loss):
                    raise TrainingError(f"step {self.state.step + 1} (micro-batch {self.state.position}): loss is "
                                        f"{loss.item()}; lower train.learning_rate or train.beta, or resume from "
                                        f"the last checkpoint in {self.checkpoint_dir}")
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            self.state.position += 1
            images += 2 * len(batch_records) * acc.num_processes
            window.append((loss.detach().float().item(), z.detach().float().cpu()))
            if not acc.sync_gradients:
                continue
            self.state.step += 1
            zs = torch.cat([w[1] for w in window])
            now = time.time()
            row = {"step": self.state.step, "loss": float(np.mean([w[0] for w in window])),
                   "implicit_accuracy": implicit_accuracy(zs.numpy()), "reward_margin": float(zs.mean()),
                   "lr": float(scheduler.get_last_lr()[0]), "images_per_s": images / max(now - tick, 1e-9)}
            window, tick, images = [], now, 0
            self.state.metrics.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['implicit_accuracy']:.2f}", lr=f"{row['lr']:.2e}")
            if self.state.step % cfg.log_every == 0 or self.state.step == stop_at:
                acc.log({k: v for k, v in row.items() if k != "step"}, step=self.state.step)
            if on_step is not None:
                on_step(row)
            if self.state.step % cfg.checkpoint_every == 0 or self.state.step == cfg.stop_at_step:
                self.save_checkpoint()
        bar.close()
        acc.end_training()
        return TrainResult(self.adapter, self.state.step, self.state.step >= cfg.max_steps, list(self.state.metrics),
                           cache_stats, time.time() - started)

    @torch.no_grad()
    def evaluate(self, records: list[PreferenceRecord], draws: int | None = None, seed: int = 1234
                 ) -> dict[str, Any]:
        """Implicit accuracy on held-out records: z from losses averaged over ``draws`` noise/timestep draws.

        A tie (z = 0: the adapter changes nothing, as an untrained one does) counts as half right, so
        chance reads 0.5, not 0.0; the result also splits by the label's reason and by category."""
        draws = draws or self.config.eval_noise_draws
        if not records:
            return {"records": 0}
        if self.config.cache_latents:
            self.prepare_caches(records)
        policy = PolicyUNet(self.adapter, self.frozen.unet)
        zs = []
        for i, rec in enumerate(records):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            z_sum = torch.zeros(())
            for _ in range(draws):
                _, z = self.forward_losses(policy, self.make_batch([rec], gen, augment=False))
                z_sum += z.float().cpu().sum()
            zs.append(float(z_sum / draws))
        return {**accuracy_summary(zs), "chance_level": CHANCE_LEVEL, "draws": draws,
                "by_reason": grouped_accuracy(zs, [r.reason or "unknown" for r in records]),
                "by_category": grouped_accuracy(zs, [r.category or "unknown" for r in records]),
                "z": zs}

    def close(self) -> None:
        self.adapter.remove()
        if self.config.gradient_checkpointing:
            self.frozen.unet.disable_gradient_checkpointing()
        if self.accelerator.num_processes == 1:
            reset_accelerate()


def follow_umask(directory: Path) -> None:
    """Give the files under ``directory`` the mode the user's umask gives new files: accelerate saves
    weights with safetensors' ``save_file``, which creates them 0600 whatever the umask."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for path in Path(directory).rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~mask)


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state so that another trainer can start in this process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def load_base_pipeline(backbone: str, model: str, revision: str | None = None,
                       dtype: torch.dtype = torch.float32) -> Any:
    """The frozen base pipeline (hub id or local folder), offline-friendly."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from sage_builder.logs import quiet_libraries

    quiet_libraries()  # no loading bars or library warnings on the console unless -v
    try:
        if backbone == "sdxl":
            return StableDiffusionXLPipeline.from_pretrained(model, revision=revision, dtype=dtype)
        return StableDiffusionPipeline.from_pretrained(model, revision=revision, dtype=dtype,
                                                       safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as exc:
        raise SageError(f"train.model {model}: cannot load the {backbone} pipeline "
                        f"({str(exc).splitlines()[0][:200]}); check the path or download it first") from None
