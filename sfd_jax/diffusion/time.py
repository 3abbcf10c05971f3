"""Training time for SFD: the base time t ∈ (0, 1) (t = 0 is noise, t = 1 is data) and the linear interpolant of
each stream at its own time (the schedule, `diffusion.schedule`, turns t into the streams' times)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

TIME_SAMPLINGS = ("logit_normal", "uniform")


def sample_base_time(rng, shape, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0):
  """t ∈ (0, 1): sigmoid of N(mean, std) (the official `use_lognorm`), or U(0, 1)."""
  if kind == "logit_normal":
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape, jnp.float32))
  if kind == "uniform":
    return jax.random.uniform(rng, shape, jnp.float32)
  raise ValueError(f"time sampling {kind!r} is not one of {TIME_SAMPLINGS}")


def interpolate(x1, x0, t_tex, t_sem, semantic_channels: int):
  """x_t = t·x1 + (1−t)·x0 per stream; NHWC with channels [texture | semantic (last `semantic_channels`)]."""
  c = x1.shape[-1] - semantic_channels
  t_tex, t_sem = t_tex[:, None, None, None], t_sem[:, None, None, None]
  tex = t_tex * x1[..., :c] + (1 - t_tex) * x0[..., :c]
  sem = t_sem * x1[..., c:] + (1 - t_sem) * x0[..., c:]
  return jnp.concatenate([tex, sem], axis=-1)
