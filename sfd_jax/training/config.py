"""The defaults of every training knob, as locked `ml_collections` configs.

Each field of the official YAMLs and train.py has a named field here with the official value as default.
`configs/*.py` start from `base_config()` and change what their recipe changes; configs are locked,
so a typo in an override is an error that names the field.
"""
from __future__ import annotations

import ml_collections

from sfd_jax import sharding as shd
from sfd_jax.diffusion import schedule as schedule_lib
from sfd_jax.errors import UserError
from sfd_jax.models.dit import LightningDiT, lightningdit, preset_fields


def model_config(preset: str = "XL", **overrides) -> ml_collections.ConfigDict:
  """The LightningDiT-SFD fields for an official size (the official values for the rest)."""
  fields = dict(input_size=16, patch_size=1, in_channels=48, **preset_fields(preset), mlp_ratio=4.0, num_classes=1000,
                dual_timestep=True, use_repa=True, repa_depth=2, repa_projector_dim=2048, repa_z_dim=768,
                remat_policy="dots_with_no_batch_dims_saveable", scan_unroll=1, dtype="float32",
                attention="auto",           # auto | xla | pallas (TPU) | cudnn (NVIDIA, compute capability ≥ 8.0)
                matmul_precision="default")  # default | high | highest: of every matmul and conv of the DiT
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def dino_config() -> ml_collections.ConfigDict:
  """The frozen DINOv2 a run computes tokens with (SemVAE training; SFD on datasets that store no tokens)."""
  return ml_collections.ConfigDict(dict(
      path="",                   # exported DINOv2 (cli.convert), Hugging Face directory, or facebookresearch .pth
      dtype="float32",           # compute dtype of the frozen DINOv2
      random_init=False,         # tests and smoke runs only: a random-weight DINOv2 with `random_fields`, no file
      random_fields=dict(image_size=224, hidden_size=32, depth=1, num_heads=2),
  ))


def base_config() -> ml_collections.ConfigDict:
  """The official SFD-XL recipe for the objective, optimiser and EMA; machine settings for one host."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""             # a new run's params and EMA from this training workdir's newest checkpoint
  c.model = model_config("XL")
  # On an accelerator, the first step compares model.attention's kernel with XLA's attention on a slice of the
  # batch (forward and gradients) and stops if they differ beyond bfloat16 rounding; False skips the check.
  c.attention_check = True
  c.loss = dict(
      delta_t=0.3,               # semfirst_delta_t: how far semantics run ahead (offset; random_offset's for sampling)
      # When each stream is denoised (sfd_jax.diffusion.schedule): offset (SFD, Δ = delta_t) | random_offset (Δ
      # per training example from delta_range) | piecewise_linear (through knots) | learned (probed, then frozen).
      schedule=dict(
          kind="offset",
          delta_range=(0.0, 0.6),  # random_offset: Δ ~ U[low, high] per training example
          knots=(),                # piecewise_linear: ((τ, t_tex, t_sem), ...) from (0, 0, 0) to (end, 1, 1)
          cells=13,                # learned: uniform cells of τ ∈ [0, 1]; starts at Δ = delta_t
          probe_steps=500,         # learned: steps during which the schedule trains with the model, then frozen
          lr=1e-2,                 # learned: Adam learning rate of the schedule's parameters
          kinetic_weight=0.1,      # learned: λ of the kinetic term during the probe
      ),
      semantic_channels=16,      # the last channels of the latent are semantic; 0 is the plain LightningDiT
                                 # (with model.in_channels = the texture's, delta_t=0, model.dual_timestep=False)
      semantic_weight=2.0,       # β, inside the mean over all channels
      use_cosine_loss=True,
      repa_weight=1.0,           # λ, > 0 where model.use_repa; a run without REPA sets model.use_repa=False
                                 # (no REPA term, no projector); repa_weight=0 alone is an error saying so
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
      warmup_start_factor=0.0,   # the warmup's first LR, a fraction of lr (torch LinearLR's start_factor)
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
      method="dopri5",           # adaptive: dopri5 | tsit5 | bosh3 | adaptive_heun; official grid: euler | heun
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
  c.eval_every = 0               # steps between evaluations during training (0: never); the last step too
  c.eval = dict(                 # metrics of EMA samples decoded with sample.texture_vae (training.evaluation)
      num_samples=10_000,        # fixed noise and balanced labels: the same images at every evaluation
      batch_size=256,            # global, split over every device
      features="inception",      # inception: FID, sFID, IS, precision, recall with the FID Inception | task: the
                                 # task's own metrics (the demo's digit classifier: FD and class accuracy)
      reference="",              # ADM reference batch (.npz with arr_0 and/or mu, sigma, mu_s, sigma_s)
      inception="",              # FID Inception weights; empty: $SFD_INCEPTION_WEIGHTS or the default path
      cfg_scales=(1.0,),         # one evaluation per classifier-free guidance scale; 1 is unguided
      cfg_interval_start=0.0,
      method="dopri5",           # adaptive: dopri5 | tsit5 | bosh3 | adaptive_heun; official grid: euler | heun
      num_steps=250,
      shift=0.0,
      rtol=1e-3,
      atol=1e-6,
      seed=0,
  )
  c.mesh = dict(data=-1, fsdp=1)
  # (regex on the param path, spec): the first match wins; () replicates, ("fsdp_largest",) shards the largest
  # dimension divisible by the fsdp size; tensors under min_size elements are replicated.
  c.sharding = dict(rules=shd.DEFAULT_RULES, min_size=2 ** 14)
  c.lock()
  return c


def build_model(model_cfg) -> LightningDiT:
  """The LightningDiT a `model` config describes: `models.dit.lightningdit` (the one builder) of its fields; fields
  that cannot build a network are a user error naming the field."""
  model = lightningdit(**model_cfg)
  try:
    model.check_fields()
  except ValueError as e:
    raise UserError(f"config.model: {e}") from None
  return model


# (field, lowest, highest) allowed: None is no bound. A field a config does not have is skipped, so the SFD and
# SemVAE configs share the table.
VALUE_RANGES = (
    ("batch_size", 1, None), ("eval_batch_size", 1, None), ("total_steps", 0, None), ("log_every", 1, None),
    ("ckpt_every", 1, None), ("keep_checkpoints", 1, None), ("keep_period", 0, None), ("sample_every", 0, None),
    ("sample.num_images", 1, None), ("sample.num_steps", 2, None), ("sample.rtol", 0.0, None),
    ("sample.atol", 0.0, None), ("sample.shift", 0.0, None), ("sample.cfg_scale", 0.0, None),
    ("sample.cfg_interval_start", 0.0, 1.0),
    ("eval_every", 0, None), ("eval.num_samples", 4, None), ("eval.batch_size", 1, None), ("eval.num_steps", 2, None),
    ("eval.rtol", 0.0, None), ("eval.atol", 0.0, None), ("eval.shift", 0.0, None),
    ("eval.cfg_interval_start", 0.0, 1.0),
    ("optim.lr", 0.0, None), ("optim.b1", 0.0, 1.0), ("optim.b2", 0.0, 1.0), ("optim.eps", 0.0, None),
    ("optim.weight_decay", 0.0, None), ("optim.warmup_steps", 0, None), ("optim.warmup_start_factor", 0.0, 1.0),
    ("optim.constant_steps", 0, None),
    ("optim.decay_steps", 0, None), ("optim.end_lr", 0.0, None), ("optim.max_grad_norm", 0.0, None),
    ("optim.grad_accum_steps", 1, None), ("optim.ema_decay", 0.0, 1.0),
    ("loss.delta_t", 0.0, 1.0), ("loss.semantic_channels", 0, None), ("loss.semantic_weight", 0.0, None),
    ("loss.repa_weight", 0.0, None), ("loss.logit_std", 0.0, None), ("loss.class_dropout", 0.0, 1.0),
    ("loss.mse_weight", 0.0, None), ("loss.l1_weight", 0.0, None), ("loss.cos_weight", 0.0, None),
    ("loss.kl_weight", 0.0, None), ("loss.schedule.cells", 1, None), ("loss.schedule.probe_steps", 0, None),
    ("loss.schedule.lr", 0.0, None), ("loss.schedule.kinetic_weight", 0.0, None),
    ("data.synthetic_records", 1, None), ("data.num_workers", 0, None), ("data.prefetch", 1, None),
    ("data.heldout_images", 0, None), ("data.resolution", 1, None),
    ("model.input_size", 1, None), ("model.patch_size", 1, None), ("model.in_channels", 1, None),
    ("model.hidden_size", 1, None), ("model.depth", 1, None), ("model.num_heads", 1, None),
    ("model.mlp_ratio", 0.0, None), ("model.num_classes", 1, None), ("model.repa_depth", 1, None),
    ("model.scan_unroll", 1, None),
    ("model.repa_projector_dim", 1, None), ("model.repa_z_dim", 1, None), ("model.latent_channels", 1, None),
    ("model.encoder_depth", 0, None), ("model.decoder_depth", 0, None),
    ("sharding.min_size", 0, None),
)


def check_values(cfg) -> None:
  """A config value outside its range (e.g. --config.batch_size=0), or SFD fields that contradict each other, is a
  user error naming the field."""
  for name, low, high in VALUE_RANGES:
    node, *path = name.split(".")
    value = cfg
    for key in (node, *path):
      if key not in value:
        break
      value = value[key]
    else:
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"config.{name}={value!r} must be a number")
      if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        raise UserError(f"config.{name}={value} must be {bounds}")
  if "loss" in cfg and "semantic_channels" in cfg.loss:
    _check_sfd_fields(cfg.model, cfg.loss)


def _check_sfd_fields(model, loss) -> None:
  """Field combinations that cannot train what they say: each is a user error naming the fix."""
  if loss.semantic_channels >= model.in_channels:
    raise UserError(f"config.loss.semantic_channels={loss.semantic_channels} leaves no texture channel of "
                    f"model.in_channels={model.in_channels}: the latent is [texture | semantic]")
  if loss.semantic_channels == 0 and (loss.delta_t != 0 or model.dual_timestep):
    raise UserError("config.loss.semantic_channels=0 (the plain LightningDiT) has no semantic stream to run ahead: "
                    "set --config.loss.delta_t=0 --config.model.dual_timestep=False")
  if "schedule" in loss:
    schedule_lib.from_config(loss)  # a bad kind, range or knots: one sentence now, not at the first step
    if loss.semantic_channels == 0 and loss.schedule.kind != "offset":
      raise UserError(f"config.loss.schedule.kind={loss.schedule.kind!r} needs a semantic stream: the plain "
                      "LightningDiT (loss.semantic_channels=0) trains with kind 'offset' and delta_t=0")
  if model.use_repa and loss.repa_weight == 0:
    raise UserError("config.loss.repa_weight=0 with model.use_repa=True would train an unused REPA projector: for "
                    "a run without REPA set --config.model.use_repa=False")
