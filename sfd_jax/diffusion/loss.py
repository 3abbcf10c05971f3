"""The SFD objective: weighted velocity MSE + cosine velocity loss + REPA, as the official
`Transport.training_losses` and `train.py` compute it.

`loss_terms` takes every random draw as an argument (for parity with the official code); `sfd_loss` draws them
per sample from `fold_in(rng, sample position)`, so a sample's noise, time and label drop do not depend on how the
batch is split over devices or micro-batches. The schedule (`diffusion.schedule`) turns each base time into the
streams' times; SFD's `Offset` gives the official loss. A `Learned` schedule is trained with the
schedule-corrected objective: each stream's squared error weighted by its stop-gradient rate sg(ṫ_k(t)), plus,
while its parameters are being probed, a kinetic term λ·‖ṫ_k·v_k‖² that favours trajectories few solver steps
resolve (after "Learning When to Denoise"; the cosine loss and REPA are kept as in SFD).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sfd_jax.diffusion import schedule as schedule_lib
from sfd_jax.diffusion.time import interpolate, sample_base_time
from sfd_jax.errors import UserError

REPA_MODES = ("cos", "mse", "cos_mse")
TIME_KEY = 1 << 20  # folded into a sample's key for the schedule's own draws (random_offset's Δ)


def _norm_clamped(x, eps):
  """‖x‖ over the last axis, clamped below at eps in value only, as torch's `cosine_similarity` (its clamp runs
  under no_grad); the norm's gradient is 0 at x = 0 as torch's. A zero velocity (every fresh model outputs
  one) thus gets the finite gradient the official code gets, not NaN."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  return norm + jax.lax.stop_gradient(jnp.maximum(norm, eps) - norm)


def cosine_similarity(a, b, eps: float = 1e-8):
  """Cosine similarity over the last axis: sum((a / max(‖a‖, eps)) · (b / max(‖b‖, eps))), as torch."""
  return jnp.sum((a / _norm_clamped(a, eps)) * (b / _norm_clamped(b, eps)), axis=-1)


def repa_loss(z, dino, mode: str = "cos"):
  """Per-sample alignment of projected hidden states z (B, N, D) with DINO tokens (B, N, D), as the official
  `repa_mode`s: 'cos' (the default): the mean over tokens of 1 − cos; 'mse': the mean of (dino − z)² over tokens
  and channels; 'cos_mse': the mean of the two, (cos + mse) / 2 (the 80-epoch recipe's, at weight 0.5).
  """
  if mode not in REPA_MODES:
    raise ValueError(f"repa_mode {mode!r} is not one of {REPA_MODES}")
  cos = jnp.mean(1.0 - cosine_similarity(z, dino), axis=-1)
  mse = jnp.mean((dino - z) ** 2, axis=(1, 2))
  return {"cos": cos, "mse": mse, "cos_mse": (cos + mse) / 2}[mode]


def _check_repa_targets(dino, shape) -> None:
  """The REPA targets must be the batch's DINO tokens, one per projected DiT token."""
  if dino is None:
    raise UserError("REPA is on but the batch has no 'dino' tokens: give batch['dino'] of shape "
                    f"{tuple(shape)} (batch, DiT tokens, model.repa_z_dim), or build the model with use_repa=False")
  if getattr(dino, "shape", None) != tuple(shape):
    raise UserError(f"batch['dino'] has shape {getattr(dino, 'shape', type(dino).__name__)} but the REPA projector "
                    f"gives {tuple(shape)} (batch, DiT tokens, model.repa_z_dim): extract the tokens on the DiT's "
                    "token grid with a DINOv2 of that width")


def loss_terms(apply_fn, params, x1, x0, t, y, drop_mask, dino, *, schedule, semantic_weight, repa_weight,
               num_classes, use_cosine_loss=True, repa_mode="cos", semantic_channels=16, time_keys=None,
               kinetic_weight=0.0):
  """The official loss for fixed draws (for a `Learned` schedule, the schedule-corrected one).

  apply_fn(params, x, t_tex, t_sem, y, return_repa=True) -> (v, z); x1, x0 NHWC; dino (B, N, D) or None when
  repa_weight is 0; t (B,) base time before the schedule; drop_mask (B,) bool, True = label → num_classes;
  `time_keys` (B,) keys for schedules that draw per example (`RandomOffset`).
  Returns per-sample `mse`, `cos`, `repa`, `kinetic` (B,) and the scalar `total` = the sum of their means.
  """
  t_tex, t_sem = schedule.train_times(t, time_keys)
  x_t = interpolate(x1, x0, t_tex, t_sem, semantic_channels)
  target = x1 - x0
  labels = jnp.where(drop_mask, num_classes, y)
  use_repa = repa_weight != 0
  if use_repa:
    v, z = apply_fn(params, x_t, t_tex, t_sem, labels, return_repa=True)
    _check_repa_targets(dino, z.shape)
  else:
    v = apply_fn(params, x_t, t_tex, t_sem, labels)
  is_sem = jnp.arange(x1.shape[-1]) >= x1.shape[-1] - semantic_channels
  weights = jnp.where(is_sem, semantic_weight, 1.0)
  kinetic = None
  if isinstance(schedule, schedule_lib.Learned):
    r_tex, r_sem = schedule.train_rates(t)
    rates = jnp.where(is_sem, r_sem[:, None, None, None], r_tex[:, None, None, None])
    weights = weights * jax.lax.stop_gradient(rates)
    kinetic = kinetic_weight * jnp.mean((rates * v) ** 2, axis=(1, 2, 3))
  mse = jnp.mean(weights * (v - target) ** 2, axis=(1, 2, 3))
  zeros = jnp.zeros_like(mse)
  kinetic = zeros if kinetic is None else kinetic
  cos = jnp.mean(1.0 - cosine_similarity(v, target), axis=(1, 2)) if use_cosine_loss else zeros
  repa = repa_weight * repa_loss(z, dino.astype(z.dtype), repa_mode) if use_repa else zeros
  total = jnp.mean(mse) + jnp.mean(cos) + jnp.mean(repa) + jnp.mean(kinetic)
  return {"mse": mse, "cos": cos, "repa": repa, "kinetic": kinetic, "total": total, "t_tex": t_tex, "t_sem": t_sem}


def sample_draws(rng, positions, x_shape, cfg):
  """Per-sample (x0, t, drop_mask), each from `fold_in(rng, position)`: independent of how the batch is split."""
  def one(position):
    k_noise, k_time, k_drop = jax.random.split(jax.random.fold_in(rng, position), 3)
    x0 = jax.random.normal(k_noise, x_shape[1:], jnp.float32)
    t = sample_base_time(k_time, (), cfg.time_sampling, cfg.logit_mean, cfg.logit_std)
    drop = jax.random.uniform(k_drop, ()) < cfg.class_dropout
    return x0, t, drop
  return jax.vmap(one)(positions)


def sfd_loss(apply_fn, params, batch, rng, cfg, num_classes: int, positions=None, use_repa: bool = True,
             schedule=None, kinetic_weight=0.0):
  """(total, metrics) of one batch {'x': (B,H,W,C) normalised latents, 'y': (B,), 'dino': (B,N,D) with REPA}.

  `cfg` is the `loss` config (delta_t, schedule, semantic_weight, ...); `schedule` overrides the config's (the
  training loop passes a learned one with its current parameters, and the probe's `kinetic_weight`); `positions`
  are the samples' indices within the global batch (default arange(B)), which seed their draws.
  `use_repa=False` (a model built without the REPA projector) drops the REPA term whatever cfg.repa_weight says.
  """
  x1 = batch["x"].astype(jnp.float32)
  if positions is None:
    positions = jnp.arange(x1.shape[0])
  if schedule is None:
    schedule = schedule_lib.from_config(cfg)
  x0, t, drop = sample_draws(rng, positions, x1.shape, cfg)
  time_keys = jax.vmap(lambda p: jax.random.fold_in(jax.random.fold_in(rng, p), TIME_KEY))(positions)
  terms = loss_terms(apply_fn, params, x1, x0, t, batch["y"], drop, batch.get("dino"), schedule=schedule,
                     semantic_weight=cfg.semantic_weight, repa_weight=cfg.repa_weight if use_repa else 0.0,
                     num_classes=num_classes, use_cosine_loss=cfg.use_cosine_loss, repa_mode=cfg.repa_mode,
                     semantic_channels=cfg.semantic_channels, time_keys=time_keys, kinetic_weight=kinetic_weight)
  metrics = {f"loss_{k}": jnp.mean(terms[k]) for k in ("mse", "cos", "repa")}
  if isinstance(schedule, schedule_lib.Learned):
    metrics["loss_kinetic"] = jnp.mean(terms["kinetic"])
  metrics["loss"] = terms["total"]
  return terms["total"], metrics
