"""The defaults of every training knob, as locked `ml_collections` configs.

Each field of the official YAMLs and train.py has a named field here with the official value as default
(spec §2). `configs/*.py` start from `base_config()` and change what their recipe changes; configs are locked,
so a typo in an override is an error that names the field.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from sfd_jax import sharding as shd
from sfd_jax.models.dit import LightningDiT, preset_fields


def model_config(preset: str = "XL", **overrides) -> ml_collections.ConfigDict:
  """The LightningDiT-SFD fields for an official size (spec §1.1 values for the rest)."""
  fields = dict(input_size=16, patch_size=1, in_channels=48, **preset_fields(preset), mlp_ratio=4.0, num_classes=1000,
                dual_timestep=True, use_repa=True, repa_depth=2, repa_projector_dim=2048, repa_z_dim=768,
                remat_policy="none", dtype="float32")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def dino_config() -> ml_collections.ConfigDict:
  """The frozen DINOv2 a run computes tokens with (SemVAE training; SFD on datasets that store no tokens)."""
  return ml_collections.ConfigDict(dict(
      path="",                   # exported DINOv2 (cli.convert), Hugging Face directory, or facebookresearch .pth
      dtype="float32",           # compute dtype of the frozen DINOv2
      trust_pickle=False,
      random_init=False,         # tests and smoke runs only: a random-weight DINOv2 with `random_fields`, no file
      random_fields=dict(image_size=224, hidden_size=32, depth=1, num_heads=2),
  ))


def base_config() -> ml_collections.ConfigDict:
  """The official SFD-XL recipe for the objective, optimiser and EMA; machine settings for one host."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config("XL")
  c.loss = dict(
      delta_t=0.3,               # semfirst_delta_t: how far semantics run ahead
      semantic_channels=16,      # the last channels of the latent are semantic
      semantic_weight=2.0,       # β, inside the mean over all channels
      use_cosine_loss=True,
      repa_weight=1.0,           # λ
      repa_mode="cos",           # cos | mse | cos_mse
      time_sampling="logit_normal",  # logit_normal | uniform
      logit_mean=0.0,
      logit_std=1.0,
      class_dropout=0.1,         # label → null label (num_classes) with this probability
  )
  c.optim = dict(
      lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      schedule="constant",       # constant | cosine (warmup → constant for constant_steps → cosine to end_lr)
      warmup_steps=0, constant_steps=0, decay_steps=0, end_lr=0.0,
      max_grad_norm=0.0,         # 0 = no clipping (official)
      grad_accum_steps=1,        # micro-batches per step
      ema_decay=0.9999,
  )
  c.batch_size = 256             # global, over all hosts and devices
  c.total_steps = 4_000_000
  c.nan_policy = "stop"          # stop | skip: what a non-finite loss does (the update is never applied)
  c.data = dict(
      source="latents",          # latents (a dataset written by cli.extract) | synthetic (in memory)
      path="",
      synthetic_records=4096,
      shuffle=True,
      flip=True,                 # pick the stored horizontally flipped copy with probability 1/2
      num_workers=0,             # grain worker processes (0: threads in the training process)
      prefetch=8,
  )
  # Only for datasets extracted without DINO tokens (--dino_dtype=none): the REPA targets are computed in the
  # train step from the stored images (one DINOv2 forward per sample).
  c.dino = dino_config()
  c.log_every = 100
  c.ckpt_every = 20_000
  c.keep_checkpoints = 3         # the newest N ...
  c.keep_period = 0              # ... plus every multiple of this step, kept for good (0: none)
  c.sample_every = 0             # steps between sample grids (0: never)
  c.sample = dict(               # the official inference settings (configs/sfd/*/inference.yaml)
      num_images=16,             # fixed noise and labels, drawn once per run
      labels=(),                 # class ids (cycled); empty: 0, 1, 2, ...
      method="dopri5",           # dopri5 | euler | heun
      num_steps=250,             # euler/heun grid points (num_sampling_steps)
      rtol=1e-3,
      atol=1e-6,
      shift=0.0,                 # timestep_shift of the euler/heun grid
      cfg_scale=1.0,             # > 1: classifier-free guidance with the null label
      cfg_interval_start=0.0,
      seed=0,
      texture_vae="",            # exported texture VAE (or official .ckpt): decode to a PNG grid; empty:
                                 # latent statistics and a picture of three texture channels
  )
  c.mesh = dict(data=-1, fsdp=1)
  # (regex on the param path, spec): the first match wins; () replicates, ("fsdp_largest",) shards the largest
  # dimension divisible by the fsdp size; tensors under min_size elements are replicated.
  c.sharding = dict(rules=shd.DEFAULT_RULES, min_size=2 ** 14)
  c.lock()
  return c


def build_model(model_cfg) -> LightningDiT:
  """The LightningDiT a `model` config describes."""
  fields = dict(model_cfg)
  fields["dtype"] = jnp.dtype(fields["dtype"])
  return LightningDiT(**fields)
