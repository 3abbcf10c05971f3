"""The asynchronous schedule: one object that says when each stream is denoised, for training and sampling.

A schedule maps a global time τ ∈ [0, end] (noise at 0, data at `end`) to each stream's own time
(t_tex, t_sem) ∈ [0, 1]², non-decreasing in τ, from (0, 0) to (1, 1). Training draws a base time t ∈ (0, 1) per
example and uses τ = end·t (`train_times`); the sampler integrates dx_k/dτ = ṫ_k(τ)·v_k from τ = 0 to `end`,
phase by phase between the `breakpoints` (where ṫ jumps), so no solver step straddles a kink and no stream is
ever evaluated outside [0, 1].

Built in:
- `Offset(delta)`: SFD. t_sem = min(τ, 1), t_tex = max(τ − Δ, 0) on [0, 1+Δ]; Δ = 0 is synchronous flow matching.
  The numbers are the official code's (`a = (1+Δ)t`, clamp `a` and `a − Δ`).
- `RandomOffset(low, high, delta)`: SeFi-Image's variant: each training example draws its own Δ ~ U[low, high];
  sampling uses the fixed `delta`.
- `PiecewiseLinear(taus, tex, sem)`: any monotone piecewise-linear map through the given knots.
- `Function(fn, end, breakpoints)`: any monotone map τ → (t_tex, t_sem) in pure JAX.
- `Learned(raw)`: a convex, monotone texture progress on `cells` uniform cells of τ ∈ [0, 1], the semantic one
  its mirror (t_sem(τ) = 1 − t_tex(1 − τ), concave, so semantics are never behind texture), contains SFD's Δ
  exactly when Δ·cells/(1+Δ) is a whole number (Δ = 0.3 with 13 cells). Its parameters are trained by a short
  probe with the schedule-corrected objective (`loss_weights` and `kinetic_weight` in `diffusion.loss`) and then
  frozen (`training`).

Schedules are equinox modules: their arrays are pytree leaves (traced: a new Δ or a new learned map reuses the
compiled sampler), the rest is static. `to_metadata` / `from_metadata` store one as JSON in a run's config and
export, so a run is always sampled with the schedule it was trained with.
"""
from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.errors import UserError

KINDS = ("offset", "random_offset", "piecewise_linear", "learned")


class Schedule(eqx.Module):
  """The interface; see the module docstring."""

  #: True where ṫ is constant between breakpoints (the sampler then carries the model's velocity across them).
  constant_rates = True

  def end(self):
    """The global time at which both streams reach data."""
    raise NotImplementedError

  def times(self, tau):
    """(t_tex, t_sem) at global time τ (any shape), float32."""
    raise NotImplementedError

  def breakpoints(self):
    """(P+1,) float32 phase ends from 0 to `end()`, non-decreasing; a static count for each kind of schedule."""
    raise NotImplementedError

  def rates(self, tau, start, stop):
    """(ṫ_tex, ṫ_sem) = d(t_tex, t_sem)/dτ at τ inside the phase [start, stop] (one-sided at its ends)."""
    inside = (start + stop) / 2 if self.constant_rates else jnp.clip(tau, start + 1e-6 * (stop - start),
                                                                        stop - 1e-6 * (stop - start))
    return jax.jvp(self.times, (inside,), (jnp.ones_like(inside),))[1]

  def grid_rates(self, tau):
    """(ṫ_tex, ṫ_sem) at a point of a fixed-step grid: the slope of the phase that starts at τ (the last phase's at
    the end)."""
    points = self.breakpoints()
    i = jnp.clip(jnp.searchsorted(points, tau, side="right") - 1, 0, points.shape[0] - 2)
    return self.rates(tau, points[i], points[i + 1])

  def train_times(self, t, key=None):
    """(t_tex, t_sem) of training examples with base times t ∈ (0, 1) (and, where the schedule draws, `key`)."""
    del key
    return self.times(self.end() * t)

  def train_rates(self, t):
    """(dt_tex/dt, dt_sem/dt) at base time t: the change-of-variables weights of the schedule-corrected loss."""
    return jax.jvp(self.train_times, (t,), (jnp.ones_like(t),))[1]

  def to_metadata(self) -> dict:
    """The JSON a run stores, for `from_metadata`."""
    raise UserError(f"a {type(self).__name__} schedule cannot be stored with a run: give a piecewise_linear one "
                    "through the config (loss.schedule.knots) to train with it from the command line")


def _f32(x):
  return jnp.asarray(x, jnp.float32)


class Offset(Schedule):
  """SFD: semantics run Δ ahead of texture."""
  delta: float | jax.Array = 0.3

  def end(self):
    return 1.0 + self.delta

  def times(self, tau):
    tau = _f32(tau)
    return jnp.maximum(tau - self.delta, 0.0), jnp.minimum(tau, 1.0)

  def train_times(self, t, key=None):
    del key
    a = (1.0 + self.delta) * t  # the official order of operations
    return jnp.maximum(a - self.delta, 0.0), jnp.minimum(a, 1.0)

  def breakpoints(self):
    delta, one = _f32(self.delta), jnp.float32(1.0)
    return jnp.stack([jnp.float32(0.0), jnp.minimum(delta, one), jnp.maximum(delta, one), one + delta])

  def grid_rates(self, tau):
    """The official masks at a grid point: texture moves where τ ≥ Δ, semantics where τ ≤ 1 (both inclusive)."""
    return (tau >= self.delta).astype(jnp.float32), (tau <= 1.0).astype(jnp.float32)

  def to_metadata(self):
    return {"kind": "offset", "delta": float(self.delta)}


class RandomOffset(Offset):
  """Offset whose Δ is drawn per training example from U[low, high]; `delta` is the one used for sampling."""
  low: float | jax.Array = 0.0
  high: float | jax.Array = 0.6

  def train_times(self, t, key=None):
    if key is None:
      raise ValueError("RandomOffset.train_times draws each example's Δ: give one key per example")
    delta = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, self.low, self.high))(key)
    a = (1.0 + delta) * t
    return jnp.maximum(a - delta, 0.0), jnp.minimum(a, 1.0)

  def train_rates(self, t):
    raise UserError("random_offset draws Δ per example: its loss is the plain SFD loss, without change-of-variables "
                    "weights")

  def to_metadata(self):
    return {"kind": "random_offset", "delta": float(self.delta), "low": float(self.low), "high": float(self.high)}


def _interp(tau, xs, ys):
  """Piecewise-linear interpolation through (xs, ys) with xs non-decreasing; empty cells are skipped, and τ is
  held inside [xs[0], xs[-1]]."""
  tau = jnp.clip(_f32(tau), xs[0], xs[-1])
  i = jnp.clip(jnp.searchsorted(xs, tau, side="right") - 1, 0, xs.shape[0] - 2)
  x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
  width = x1 - x0
  frac = jnp.where(width > 0, (tau - x0) / jnp.where(width > 0, width, 1.0), 1.0)
  return y0 + frac * (y1 - y0)


class PiecewiseLinear(Schedule):
  """Linear between knots (τ_i, t_tex_i, t_sem_i): τ from 0 to end, both times from 0 to 1, non-decreasing."""
  taus: jax.Array
  tex: jax.Array
  sem: jax.Array

  def __check_init__(self):
    _check_knots(self.taus, self.tex, self.sem)

  def end(self):
    return self.taus[-1]

  def times(self, tau):
    return _interp(tau, self.taus, self.tex), _interp(tau, self.taus, self.sem)

  def breakpoints(self):
    return _f32(self.taus)

  def to_metadata(self):
    return {"kind": "piecewise_linear", "knots": np.stack([self.taus, self.tex, self.sem], 1).tolist()}


def piecewise_linear(knots) -> PiecewiseLinear:
  """A PiecewiseLinear from ((τ, t_tex, t_sem), ...) knots."""
  knots = np.asarray(knots, np.float32)
  if knots.ndim != 2 or knots.shape[1] != 3 or knots.shape[0] < 2:
    raise UserError(f"schedule knots must be at least two (τ, t_tex, t_sem) triples, got shape {knots.shape}")
  return PiecewiseLinear(jnp.asarray(knots[:, 0]), jnp.asarray(knots[:, 1]), jnp.asarray(knots[:, 2]))


def _check_knots(taus, tex, sem):
  if any(isinstance(x, jax.core.Tracer) for x in (taus, tex, sem)):
    return
  taus, tex, sem = (np.asarray(x, np.float64) for x in (taus, tex, sem))
  problems = []
  if taus[0] != 0 or taus[-1] <= 0:
    problems.append(f"τ must run from 0 to a positive end (got {taus[0]} … {taus[-1]})")
  for name, values in (("τ", taus), ("t_tex", tex), ("t_sem", sem)):
    if np.any(np.diff(values) < 0):
      problems.append(f"{name} must be non-decreasing")
  for name, values in (("t_tex", tex), ("t_sem", sem)):
    if values[0] != 0 or values[-1] != 1:
      problems.append(f"{name} must run from 0 to 1 (got {values[0]} … {values[-1]})")
  if problems:
    raise UserError(f"schedule knots: {'; '.join(problems)}")


class Function(Schedule):
  """Any monotone map `fn(τ) -> (t_tex, t_sem)` in pure JAX on [0, end], smooth between `breakpoints` (the
  sampler splits its phases there). `fn` is static: use a module-level function (a new lambda compiles again)."""
  fn: Callable = eqx.field(static=True)
  stop: float | jax.Array = 1.0
  kinks: tuple = ()
  constant_rates = False

  def end(self):
    return self.stop

  def times(self, tau):
    t_tex, t_sem = self.fn(_f32(tau))
    return jnp.clip(_f32(t_tex), 0.0, 1.0), jnp.clip(_f32(t_sem), 0.0, 1.0)

  def breakpoints(self):
    return jnp.concatenate([jnp.zeros(1), jnp.sort(_f32(jnp.asarray(self.kinks, jnp.float32).reshape(-1))),
                            _f32(self.stop).reshape(1)])


class Learned(PiecewiseLinear):
  """A learned schedule (after "Learning When to Denoise"): on τ ∈ [0, 1] with `cells` uniform cells, t_tex has
  slopes s_j = Σ_{i≤j} softplus(raw_i) normalised to mean 1 (non-decreasing: convex and monotone), and
  t_sem(τ) = 1 − t_tex(1 − τ). `raw` (cells,) are the trainable parameters."""
  raw: jax.Array = None

  def __init__(self, raw):
    self.raw = _f32(raw)
    self.taus, self.tex, self.sem = learned_knots(self.raw)

  def to_metadata(self):
    return {"kind": "learned", "raw": np.asarray(self.raw, np.float64).tolist()}


def learned_knots(raw):
  """(τ, t_tex, t_sem) knots of the learned parametrisation."""
  cells = raw.shape[0]
  slopes = jnp.cumsum(jax.nn.softplus(raw))
  slopes = slopes / jnp.mean(slopes)
  tex = jnp.concatenate([jnp.zeros(1), jnp.cumsum(slopes) / cells])
  tex = tex / tex[-1]  # exactly 1 at the end
  taus = jnp.linspace(0.0, 1.0, cells + 1, dtype=jnp.float32)
  sem = 1.0 - tex[::-1]
  return taus, tex, sem


def learned_init(delta: float = 0.3, cells: int = 13, floor: float = 1e-3) -> jax.Array:
  """`raw` of the Learned schedule closest to SFD's Δ: texture frozen for the first Δ/(1+Δ) of τ, then a constant
  slope; every increment at least `floor`, so that each cell gets a gradient."""
  kink = int(round(delta / (1.0 + delta) * cells))
  increments = np.full(cells, floor, np.float64)
  increments[kink] = 1.0
  return jnp.asarray(np.log(np.expm1(increments)), jnp.float32)  # softplus⁻¹


def from_metadata(meta: dict) -> Schedule:
  """The schedule a run stored with `to_metadata`."""
  kind = meta.get("kind")
  if kind == "offset":
    return Offset(float(meta["delta"]))
  if kind == "random_offset":
    return RandomOffset(float(meta["delta"]), float(meta["low"]), float(meta["high"]))
  if kind == "piecewise_linear":
    return piecewise_linear(meta["knots"])
  if kind == "learned":
    return Learned(jnp.asarray(meta["raw"], jnp.float32))
  raise UserError(f"stored schedule kind {kind!r} is not one of {KINDS}: the run was saved by another version")


def from_config(loss_cfg, learned_raw=None) -> Schedule:
  """The schedule of a `loss` config: `loss.schedule.kind` with Δ = `loss.delta_t` (the offset; for random_offset
  the Δ used for sampling). A learned schedule takes its parameters from the train state (`learned_raw`), or starts
  at `learned_init(delta_t, schedule.cells)`."""
  spec = loss_cfg.schedule
  delta = loss_cfg.delta_t
  if spec.kind == "offset":
    return Offset(delta)
  if spec.kind == "random_offset":
    low, high = spec.delta_range
    if not 0 <= low <= high:
      raise UserError(f"config.loss.schedule.delta_range={tuple(spec.delta_range)} must be 0 ≤ low ≤ high")
    return RandomOffset(delta, low, high)
  if spec.kind == "piecewise_linear":
    return piecewise_linear(spec.knots)
  if spec.kind == "learned":
    return Learned(learned_init(delta, spec.cells) if learned_raw is None else learned_raw)
  raise UserError(f"config.loss.schedule.kind={spec.kind!r} is not one of {KINDS}")
