"""The three-phase SFD sampler: one ODE over global time τ ∈ [0, 1+Δ] from noise (τ=0) to data.

At τ the model sees `t_sem = min(τ, 1)` and `t_tex = max(τ−Δ, 0)`, and its velocity is masked: texture channels
move only where τ ≥ Δ, semantic channels only where τ ≤ 1 (both inclusive, as the official code). The field is
therefore smooth inside each phase [0, Δ], [Δ, 1], [1, 1+Δ] and jumps at their ends.

- `dopri5`: diffrax Dopri5 with a PID controller, one solve per phase with that phase's constant mask, so no step
  ever straddles a jump and the model is never evaluated outside [0, 1+Δ]. The raw (unmasked) velocity at a phase
  end is carried into the next phase as its first-same-as-last stage (the model is continuous there; only the
  mask jumps). The first phase's first trial step is the whole phase: where the field is nearly linear in τ it
  costs 6 model calls, and a rejected trial still measures the error from which the controller picks the next
  step. Each later phase starts with the step the controller would have taken next. The error norm is an RMS
  over the channels that move, per sample (a sample's result does not depend on its batch-mates; the samples
  still share every model call, so the slowest sets the count) or over the whole batch (as torchdiffeq).
  A guidance interval (`guide`) makes the field jump at t = start too; those jumps are left to the controller.
- `euler` / `heun`: fixed steps on the official float32 grid (`time_grid`), which reproduce the official finals.

`velocity_fn(x, t_tex, t_sem, y) -> velocity` (NHWC, times (B,) float32) is any function: the plain model,
CFG or AutoGuidance (`model_velocity`, `cfg_velocity`, `autoguidance_velocity`). Those three return
`jax.tree_util.Partial`s whose arrays are traced, so `sample` compiles once per model and setting, not per
parameter value. `sample` is jitted (`equinox.filter_jit`) and works inside an outer `jax.jit`; arrays sharded
over the batch (`sharding.shard_batch`) stay sharded, and image i's noise and label depend only on (seed, i)
(`noise`, `balanced_labels`, `random_labels`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from sfd_jax import sharding as shd
from sfd_jax.models.layers import cast_kernels

METHODS = ("dopri5", "euler", "heun")
ERROR_NORMS = ("per_sample", "batch")
INTERVAL_MODES = ("both", "tex", "sem")


# --------------------------------------------------------------------------------------------------------------
# Time: phases, the official grid, the model's two times.


def model_times(tau, delta_t: float):
  """(t_tex, t_sem) at global time τ, float32: t_tex = max(τ−Δ, 0), t_sem = min(τ, 1)."""
  tau = jnp.asarray(tau, jnp.float32)
  return jnp.maximum(tau - np.float32(delta_t), 0.0), jnp.minimum(tau, 1.0)


def channel_mask(tex_on, sem_on, channels: int, semantic_channels: int):
  """(…, C) float32 mask: 1 on the texture channels [0, C−S) where `tex_on`, on the semantic ones where `sem_on`."""
  is_sem = np.arange(channels) >= channels - semantic_channels
  tex_on, sem_on = jnp.asarray(tex_on)[..., None], jnp.asarray(sem_on)[..., None]
  return jnp.where(is_sem, sem_on, tex_on).astype(jnp.float32)


def time_grid(delta_t: float, num_steps: int, shift: float = 0.0) -> np.ndarray:
  """The official float32 grid `torch.linspace(0, 1+Δ, num_steps)` bit for bit, then the timestep shift.

  torch fills the first half as start + step·i and the second as end − step·(N−1−i), each with one rounding (it
  compiles to an FMA), with step = (end − start)/(N−1) in float32. Computing in float64 and rounding once is
  exact here (every product fits in 53 bits). The shift maps u = t/(1+Δ) to s·u/(1+(s−1)·u), one float32
  operation at a time, as the official code.
  """
  if num_steps < 2:
    raise ValueError(f"num_steps={num_steps}: a fixed-step sampler needs at least 2 grid points (1 step)")
  end = np.float32(1.0 + delta_t)
  step = np.float64(np.float32(end / np.float32(num_steps - 1)))
  i = np.arange(num_steps, dtype=np.float64)
  t = np.where(i < num_steps // 2, step * i, np.float64(end) - step * (num_steps - 1 - i)).astype(np.float32)
  if shift > 0:
    f32 = np.float32
    u = t / end
    u = (f32(shift) * u) / (f32(1) + f32(shift - 1) * u)
    t = (u * end).astype(np.float32)
  return t


def _phases(delta_t: float) -> list[tuple[float, float, bool, bool]]:
  """(start, end, texture moves, semantic moves) of every non-empty phase, in order."""
  cuts = sorted({0.0, float(delta_t), 1.0, 1.0 + delta_t})
  out = []
  for a, b in zip(cuts[:-1], cuts[1:]):
    tex, sem = a >= delta_t, b <= 1.0
    if b > a and (tex or sem):
      out.append((a, b, tex, sem))
  return out


# --------------------------------------------------------------------------------------------------------------
# Velocity functions: the plain model and the two guidance rules, all 48 channels.


def _compute_weights(model, variables):
  """The weights in the model's compute dtype (a flax model with a `dtype` field), cast once here rather than
  in each of the solver's model calls."""
  dtype = getattr(model, "dtype", None)
  return variables if dtype is None else cast_kernels(variables, dtype)


def _apply(model, variables, x, t_tex, t_sem, y):
  return model.apply(variables, x, t_tex, t_sem, y)


def model_velocity(model, variables):
  """velocity_fn of an unguided flax model: `model.apply(variables, x, t_tex, t_sem, y)`.

  The velocity functions hold the matmul weights in the model's compute dtype (`_compute_weights`).
  """
  return Partial(_apply, model, _compute_weights(model, variables))


def _check_interval_mode(mode: str):
  if mode not in INTERVAL_MODES:
    raise ValueError(f"guidance interval mode {mode!r} is not one of {INTERVAL_MODES}")


def guide(cond, uncond, t_tex, t_sem, scale_tex, scale_sem, interval_start: float = 0.0,
          interval_mode: str = "both", semantic_channels: int = 16):
  """u + s·(c − u) per stream (texture with `scale_tex`, semantic with `scale_sem`).

  The interval rule of the official wrappers: in modes 'both'/'tex' the texture stream is the conditional
  velocity while t_tex < start, in modes 'both'/'sem' the semantic stream while t_sem < start (strict; start 0
  switches it off). The official code tests sample 0's time; the sampler gives every sample the same time.
  """
  _check_interval_mode(interval_mode)
  is_sem = np.arange(cond.shape[-1]) >= cond.shape[-1] - semantic_channels
  scale = jnp.where(is_sem, jnp.asarray(scale_sem, cond.dtype), jnp.asarray(scale_tex, cond.dtype))
  guided = uncond + scale * (cond - uncond)
  per_sample = lambda t: jnp.asarray(t).reshape(-1, *([1] * (cond.ndim - 1)))
  cond_only_tex = per_sample(t_tex < interval_start) & (interval_mode in ("both", "tex"))
  cond_only_sem = per_sample(t_sem < interval_start) & (interval_mode in ("both", "sem"))
  return jnp.where(jnp.where(is_sem, cond_only_sem, cond_only_tex), cond, guided)


def _cfg(model, variables, scale, null_label, interval_start, interval_mode, semantic_channels, x, t_tex, t_sem, y):
  b = x.shape[0]
  both = model.apply(variables, jnp.concatenate([x, x]), jnp.concatenate([t_tex, t_tex]),
                     jnp.concatenate([t_sem, t_sem]), jnp.concatenate([y, jnp.full_like(y, null_label)]))
  return guide(both[:b], both[b:], t_tex, t_sem, scale, scale, interval_start, interval_mode, semantic_channels)


def cfg_velocity(model, variables, scale, null_label: int, interval_start: float = 0.0,
                 interval_mode: str = "both", semantic_channels: int = 16):
  """Classifier-free guidance: one forward of the doubled batch [y | null], then `guide` with one scale."""
  _check_interval_mode(interval_mode)
  return Partial(_cfg, model, _compute_weights(model, variables), scale, null_label, interval_start, interval_mode, semantic_channels)


def _autoguidance(model, variables, guide_model, guide_variables, scale_tex, scale_sem, interval_start,
                  interval_mode, semantic_channels, x, t_tex, t_sem, y):
  cond = model.apply(variables, x, t_tex, t_sem, y)
  weak = guide_model.apply(guide_variables, x, t_tex, t_sem, y)
  return guide(cond, weak, t_tex, t_sem, scale_tex, scale_sem, interval_start, interval_mode, semantic_channels)


def autoguidance_velocity(model, variables, guide_model, guide_variables, scale_tex, scale_sem,
                          interval_start: float = 0.0, interval_mode: str = "both", semantic_channels: int = 16):
  """AutoGuidance: a weaker model guides, receiving the *conditional* label; separate texture/semantic scales."""
  _check_interval_mode(interval_mode)
  return Partial(_autoguidance, model, _compute_weights(model, variables), guide_model,
                 _compute_weights(guide_model, guide_variables), scale_tex, scale_sem,
                 interval_start, interval_mode, semantic_channels)


# --------------------------------------------------------------------------------------------------------------
# Per-image noise and labels: functions of (key, image index) only, whatever the batch or device count.


def noise(key, indices, shape: Sequence[int]):
  """(n, *shape) standard normal float32; image i's noise is `normal(fold_in(key, i), shape)`."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), tuple(shape), jnp.float32))(
      jnp.asarray(indices))


def random_labels(key, indices, num_classes: int):
  """Uniform class labels, image i's from `fold_in(key, i)`."""
  return jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, num_classes))(
      jnp.asarray(indices))


def balanced_labels(key, indices, fid_num: int, num_classes: int):
  """The official balanced list: `fid_num // num_classes` images per class in class order, then one each for
  classes 0..r−1 (r = fid_num mod num_classes); indices ≥ fid_num get random labels."""
  indices = jnp.asarray(indices)
  per_class = fid_num // num_classes
  full = per_class * num_classes
  listed = jnp.where(indices < full, indices // max(per_class, 1), indices - full)
  return jnp.where(indices < fid_num, listed, random_labels(key, indices, num_classes)).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------------------
# Solvers.


class _PhaseTerm(diffrax.AbstractTerm):
  """dx/dτ = mask ⊙ F(τ, x). `vf` is the raw velocity F, which the solver's first-same-as-last stage carries
  from one phase into the next (F is continuous across the jumps; only the mask changes); `prod` masks it."""
  velocity: Callable
  mask: jax.Array

  def vf(self, t, y, args):
    return self.velocity(t, y)

  def contr(self, t0, t1, **kwargs):
    return t1 - t0

  def prod(self, vf, control):
    return self.mask * vf * control


class _ActiveRMS(eqx.Module):
  """RMS over the elements that move in this phase (frozen channels have exactly zero error)."""
  active_fraction: jax.Array

  def __call__(self, x):
    return jnp.sqrt(jnp.sum(jnp.square(x)) / (x.size * self.active_fraction))


def _next_step(step_ends, start, inv_error):
  """The step the controller would take after a phase's last accepted step (had the phase gone on): its length
  times min(10, max(1, 0.9·error^(−1/5))). It is the next phase's first trial step."""
  n = jnp.sum(jnp.isfinite(step_ends))
  last = step_ends[n - 1] - jnp.where(n > 1, step_ends[jnp.maximum(n - 2, 0)], start)
  return last * jnp.clip(0.9 * inv_error ** (1 / 5), 1.0, 10.0)


def _fresh_starts(phases) -> np.ndarray:
  """Whether each phase must evaluate the velocity at its start (the previous phase did not end there)."""
  return np.array([i == 0 or phases[i - 1][1] != phases[i][0] for i in range(len(phases))])


def _dopri5(velocity_fn, z, y, delta_t, rtol, atol, semantic_channels, max_steps):
  """One solve per phase over the batch z; returns (final, (P, 2) accepted and rejected steps per phase)."""
  def velocity(tau, x):
    t_tex, t_sem = model_times(jnp.full((x.shape[0],), tau, jnp.float32), delta_t)
    return velocity_fn(x, t_tex, t_sem, y)

  phases = _phases(delta_t)
  masks = channel_mask(np.array([p[2] for p in phases]), np.array([p[3] for p in phases]), z.shape[-1],
                       semantic_channels)
  xs = (jnp.asarray([p[0] for p in phases], jnp.float32), jnp.asarray([p[1] for p in phases], jnp.float32),
        masks, jnp.asarray(_fresh_starts(phases)))

  def phase(carry, xs):
    x, f, proposal = carry
    a, b, mask, fresh = xs
    f = jax.lax.cond(fresh, lambda: velocity(a, x), lambda: f)
    norm = _ActiveRMS(jnp.mean(mask))
    steps_at = diffrax.SubSaveAt(steps=True, fn=lambda t, y, args: None)
    sol = diffrax.diffeqsolve(
        _PhaseTerm(velocity, mask), diffrax.Dopri5(scan_kind="lax"), a, b, jnp.minimum(b - a, proposal), x,
        solver_state=(jnp.array(False), f),
        saveat=diffrax.SaveAt(subs=[diffrax.SubSaveAt(t1=True), steps_at], solver_state=True,
                              controller_state=True),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, norm=norm),
        max_steps=max_steps, adjoint=diffrax.ForwardMode())
    steps = jnp.stack([sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"]])
    return (sol.ys[0][0], sol.solver_state[1], _next_step(sol.ts[1], a, sol.controller_state[0])), steps

  # One traced solve serves every phase (a scan), so the model is compiled into it once.
  carry = (z, jnp.zeros_like(z), jnp.array(jnp.inf, jnp.float32))
  (final, _, _), steps = jax.lax.scan(phase, carry, xs)
  return final, steps


def _fixed_grid(velocity_fn, z, y, grid: np.ndarray, delta_t, method, semantic_channels):
  """Euler / Heun on `grid`, with the masks and times of the left (and, for Heun, right) grid point."""
  channels = z.shape[-1]
  f32 = np.float32

  def drift(tau, x):
    t_tex, t_sem = model_times(jnp.full((x.shape[0],), tau, jnp.float32), delta_t)
    mask = channel_mask(tau >= f32(delta_t), tau <= 1.0, channels, semantic_channels)
    return velocity_fn(x, t_tex, t_sem, y) * mask

  def step(x, xs):
    t0, t1, dt = xs
    k1 = drift(t0, x)
    if method == "euler":
      return x + dt * k1, None
    k2 = drift(t1, x + dt * k1)
    return x + dt * 0.5 * (k1 + k2), None

  xs = (jnp.asarray(grid[:-1]), jnp.asarray(grid[1:]), jnp.asarray(np.diff(grid).astype(f32)))
  final, _ = jax.lax.scan(step, z, xs)
  return final


def _batch_axes(batch: int):
  """The mesh axes the per-sample solves are split over: those of the batch when a mesh is in context
  (`sharding.traced_with_mesh`), so that the vmapped model stays sharded (and the TPU attention kernel runs on
  each device's samples)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or batch % shd.batch_devices(mesh) else shd.BATCH_AXES


def _check(z, y, delta_t, method, num_steps, error_norm, semantic_channels):
  if method not in METHODS:
    raise ValueError(f"sampling method {method!r} is not one of {METHODS}")
  if error_norm not in ERROR_NORMS:
    raise ValueError(f"error_norm {error_norm!r} is not one of {ERROR_NORMS}")
  if method != "dopri5" and num_steps is None:
    raise ValueError(f"method {method!r} needs num_steps (grid points, as the official num_sampling_steps)")
  if delta_t < 0:
    raise ValueError(f"delta_t={delta_t} must be ≥ 0 (0 is the ordinary sampler)")
  if z.ndim != 4 or not 0 < semantic_channels <= z.shape[-1]:
    raise ValueError(f"z must be NHWC latents (B, H, W, C) with C ≥ semantic_channels={semantic_channels}, "
                     f"got shape {z.shape}")
  if y.shape != z.shape[:1]:
    raise ValueError(f"y must hold one label per sample: shape ({z.shape[0]},), got {y.shape}")


@eqx.filter_jit
def sample(velocity_fn, z, y, delta_t: float = 0.3, method: str = "dopri5", num_steps: int | None = None,
           shift: float = 0.0, rtol: float = 1e-3, atol: float = 1e-6, *, error_norm: str = "per_sample",
           semantic_channels: int = 16, max_steps: int = 4096):
  """Integrates the masked three-phase ODE from noise `z` (τ = 0) to τ = 1+Δ; returns (final, stats).

  `method`: 'dopri5' (adaptive; `rtol`, `atol`, `error_norm` 'per_sample' or 'batch', at most `max_steps`
  steps per phase) or 'euler' / 'heun' on `time_grid(delta_t, num_steps, shift)`. `stats`: `model_calls` (the
  number of velocity_fn evaluations, each on the whole batch), and per sample `accepted_steps` and
  `rejected_steps`.
  """
  z = jnp.asarray(z, jnp.float32)
  y = jnp.asarray(y)
  _check(z, y, delta_t, method, num_steps, error_norm, semantic_channels)
  b = z.shape[0]
  if method != "dopri5":
    grid = time_grid(delta_t, num_steps, shift)
    final = _fixed_grid(velocity_fn, z, y, grid, delta_t, method, semantic_channels)
    steps = num_steps - 1
    calls = steps if method == "euler" else 2 * steps
    return final, {"model_calls": jnp.asarray(calls, jnp.int32),
                   "accepted_steps": jnp.full((b,), steps, jnp.int32), "rejected_steps": jnp.zeros((b,), jnp.int32)}
  solve = lambda z_, y_: _dopri5(velocity_fn, z_, y_, delta_t, rtol, atol, semantic_channels, max_steps)
  if error_norm == "batch":
    final, steps = solve(z, y)
    steps = jnp.broadcast_to(steps, (b, *steps.shape))
  else:
    final, steps = jax.vmap(lambda zi, yi: solve(zi[None], yi[None]), spmd_axis_name=_batch_axes(b))(z, y)
    final = final[:, 0]
  # Per phase: the velocity at its start where the previous phase did not end there, and 6 stages per attempted
  # step. The samples step together (one batched call per stage), so the slowest sample of a phase sets its count.
  phases = _phases(delta_t)
  attempts = jnp.max(steps.sum(-1), axis=0)
  calls = int(_fresh_starts(phases).sum()) + 6 * jnp.sum(attempts)
  return final, {"model_calls": calls.astype(jnp.int32), "accepted_steps": steps[..., 0].sum(-1),
                 "rejected_steps": steps[..., 1].sum(-1)}
