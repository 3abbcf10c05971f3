"""The SFD sampler: one ODE over the schedule's global time τ ∈ [0, end] from noise (τ=0) to data.

At τ the model sees the schedule's times (t_tex, t_sem) (`diffusion.schedule`), and each stream moves at its
time's rate: dx_k/dτ = ṫ_k(τ)·v_k. For SFD's offset Δ (the default, `Offset`) that is the official three-phase
sampler: t_sem = min(τ, 1), t_tex = max(τ−Δ, 0), texture channels move only where τ ≥ Δ, semantic channels only
where τ ≤ 1 (both inclusive, as the official code); the field is smooth inside each phase [0, Δ], [Δ, 1],
[1, 1+Δ] and jumps at their ends. Any schedule's phases are the cells between its `breakpoints` (`phases`).

The solver (`solver=` in `sample`, a name in `METHODS` or any explicit Runge–Kutta diffrax solver such as
`diffrax.Tsit5()`):
- adaptive ('dopri5', 'tsit5', 'bosh3', 'adaptive_heun', or a solver instance): one diffrax solve per phase
  with that phase's rates and a PID controller, so no step ever straddles a jump and the model is never
  evaluated outside [0, end]; a phase where nothing moves is skipped. For first-same-as-last solvers
  (Dopri5, Tsit5, Bosh3) and schedules with constant rates per phase (all but `schedule.Function`) the raw
  velocity at a phase end is carried into the next phase as its first stage (the model is continuous there; only
  the rates jump). The first phase's first trial step is the whole
  phase: where the field is nearly linear in τ it costs one step, and a rejected trial still measures the error
  from which the controller picks the next step. Each later phase starts with the step the controller would have
  taken next. The error norm is an RMS over the channels that move, per sample (a sample's result does not depend
  on its batch-mates; the samples still share every model call, so the slowest sets the count) or over the whole
  batch (as torchdiffeq). A guidance interval (`guide`) makes the field jump at t = start too; those jumps are
  left to the controller.
- 'euler' / 'heun': fixed steps on the official float32 grid (`time_grid`) with the official masks at the grid
  points, which reproduce the official finals (other schedules: the same grid over [0, end], each point with the
  rates of the phase it starts).
`method` is the name-only spelling of `solver` that configs and the CLI use (`sample.method`, `--method`).

`velocity_fn(x, t_tex, t_sem, y) -> velocity` (NHWC, times (B,) float32) is any function: the plain model,
CFG or AutoGuidance (`model_velocity`, `cfg_velocity`, `autoguidance_velocity`). Those three return
`jax.tree_util.Partial`s whose arrays (weights, guidance scales) are traced, so `sample` compiles once per model,
solver and shape, not per parameter value or scale; the schedule's numbers (Δ, knots, learned parameters) are
traced too, so a sweep over Δ does not recompile either.
A velocity function of your own should be a `Partial` of a module-level function for the same reason (a new
`lambda` is a new function, and `sample` compiles again for it). `sample` is jitted (`equinox.filter_jit`) and
works inside an outer `jax.jit`; arrays sharded over the batch (`sharding.shard_batch`) stay sharded, and image
i's noise and label depend only on (seed, i) (`noise`, `balanced_labels`, `random_labels`).
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
from sfd_jax.diffusion import schedule as schedule_lib
from sfd_jax.models.layers import cast_kernels

ERROR_NORMS = ("per_sample", "batch")
INTERVAL_MODES = ("both", "tex", "sem")


# --------------------------------------------------------------------------------------------------------------
# Time: phases, the official grid, the model's two times.


def time_grid(delta_t: float, num_steps: int, shift: float = 0.0) -> np.ndarray:
  """The official float32 grid `torch.linspace(0, 1+Δ, num_steps)` bit for bit, then the timestep shift.

  torch fills the first half as start + step·i and the second as end − step·(N−1−i), each with one rounding (it
  compiles to an FMA), with step = (end − start)/(N−1) in float32. Computing in float64 and rounding once is
  exact here (every product fits in 53 bits). The shift maps u = t/(1+Δ) to s·u/(1+(s−1)·u), one float32
  operation at a time, as the official code.
  """
  return _grid(np.float32(1.0 + delta_t), num_steps, shift)


def _grid(end: np.float32, num_steps: int, shift: float) -> np.ndarray:
  """`time_grid` over [0, end]."""
  if num_steps < 2:
    raise ValueError(f"num_steps={num_steps}: a fixed-step sampler needs at least 2 grid points (1 step)")
  step = np.float64(np.float32(end / np.float32(num_steps - 1)))
  i = np.arange(num_steps, dtype=np.float64)
  t = np.where(i < num_steps // 2, step * i, np.float64(end) - step * (num_steps - 1 - i)).astype(np.float32)
  if shift > 0:
    f32 = np.float32
    u = t / end
    u = (f32(shift) * u) / (f32(1) + f32(shift - 1) * u)
    t = (u * end).astype(np.float32)
  return t


def phases(schedule) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(starts, stops, texture rates, semantic rates) of the schedule's phases, each (P,): the cells between its
  breakpoints, with the rates inside each (exact for schedules with constant rates per phase). The count is static
  and the numbers traced, so one compiled sampler serves every Δ. A phase may be empty (Δ = 0: the first and
  last) or frozen (Δ > 1: nothing moves on [1, Δ]); the sampler skips both."""
  points = schedule.breakpoints()
  starts, stops = points[:-1], points[1:]
  r_tex, r_sem = jax.vmap(lambda a, b: schedule.rates((a + b) / 2, a, b))(starts, stops)
  return starts, stops, r_tex, r_sem


def rate_vector(r_tex, r_sem, channels: int, semantic_channels: int):
  """(…, C) float32: each channel's rate (texture channels [0, C−S), semantic the last S)."""
  is_sem = np.arange(channels) >= channels - semantic_channels
  return jnp.where(is_sem, jnp.asarray(r_sem)[..., None], jnp.asarray(r_tex)[..., None]).astype(jnp.float32)


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

  A `jax.tree_util.Partial` of a module-level function: `sample` traces its arrays (the weights) and keys its
  compilation on the rest (the function, the module), so new weights of the same shapes reuse the compiled
  sampler. The velocity functions hold the matmul weights in the model's compute dtype (`_compute_weights`).
  """
  return Partial(_apply, model, _compute_weights(model, variables))


def _traced(value):
  """A float32 array: `sample` traces arrays held by a velocity function and keys its compilations on the rest."""
  return jnp.asarray(value, jnp.float32)


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
  """Classifier-free guidance: one forward of the doubled batch [y | null], then `guide` with one scale (traced,
  as `interval_start`: a new value reuses the compiled sampler)."""
  _check_interval_mode(interval_mode)
  return Partial(_cfg, model, _compute_weights(model, variables), _traced(scale), null_label,
                 _traced(interval_start), interval_mode, semantic_channels)


def _autoguidance(model, variables, guide_model, guide_variables, scale_tex, scale_sem, interval_start,
                  interval_mode, semantic_channels, x, t_tex, t_sem, y):
  cond = model.apply(variables, x, t_tex, t_sem, y)
  weak = guide_model.apply(guide_variables, x, t_tex, t_sem, y)
  return guide(cond, weak, t_tex, t_sem, scale_tex, scale_sem, interval_start, interval_mode, semantic_channels)


def autoguidance_velocity(model, variables, guide_model, guide_variables, scale_tex, scale_sem,
                          interval_start: float = 0.0, interval_mode: str = "both", semantic_channels: int = 16):
  """AutoGuidance: a weaker model guides, receiving the *conditional* label; separate texture/semantic scales
  (traced, as `interval_start`)."""
  _check_interval_mode(interval_mode)
  return Partial(_autoguidance, model, _compute_weights(model, variables), guide_model,
                 _compute_weights(guide_model, guide_variables), _traced(scale_tex), _traced(scale_sem),
                 _traced(interval_start), interval_mode, semantic_channels)


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

ADAPTIVE_SOLVERS = {"dopri5": lambda: diffrax.Dopri5(scan_kind="lax"),
                    "tsit5": lambda: diffrax.Tsit5(scan_kind="lax"),
                    "bosh3": lambda: diffrax.Bosh3(scan_kind="lax"),
                    "adaptive_heun": lambda: diffrax.Heun(scan_kind="lax")}
FIXED_GRIDS = ("euler", "heun")
METHODS = (*ADAPTIVE_SOLVERS, *FIXED_GRIDS)


def resolve_solver(method: str | None = None, solver: str | diffrax.AbstractSolver | None = None):
  """The adaptive diffrax solver, or the name of an official fixed grid ('euler', 'heun'), chosen by `method` or
  `solver` (one of them; Dopri5 when neither is given)."""
  if method is not None and solver is not None:
    raise ValueError(f"give the solver once: method={method!r} and solver={solver!r} (method is its name-only "
                     f"spelling)")
  solver = "dopri5" if method is None and solver is None else (solver if method is None else method)
  if isinstance(solver, diffrax.AbstractSolver):
    _calls_per_step(solver)
    return solver
  if solver not in METHODS:
    raise ValueError(f"solver {solver!r} is not one of {METHODS} or a diffrax solver such as diffrax.Tsit5()")
  return solver if solver in FIXED_GRIDS else ADAPTIVE_SOLVERS[solver]()


def _calls_per_step(solver) -> tuple[int, bool]:
  """(model calls per attempted adaptive step, first-same-as-last): the stages of an explicit Runge–Kutta
  tableau, less the first where it is the previous step's last."""
  if isinstance(solver, diffrax.AbstractERK) and isinstance(solver.tableau, diffrax.ButcherTableau):
    fsal = bool(solver.tableau.fsal)
    return len(solver.tableau.c) + 1 - fsal, fsal
  if isinstance(solver, diffrax.Euler):
    raise ValueError("diffrax.Euler has no error estimate: sample on the official fixed grid with "
                     "solver='euler' and num_steps")
  raise ValueError(f"the sampler takes explicit Runge–Kutta diffrax solvers (it counts their model calls), "
                   f"got {type(solver).__name__}")


class _PhaseTerm(diffrax.AbstractTerm):
  """dx/dτ = rate ⊙ F(τ, x). With constant rates per phase, `vf` is the raw velocity F, which the solver's
  first-same-as-last stage carries from one phase into the next (F is continuous across the jumps; only the rates
  change), and `prod` applies the rates; otherwise (`rate_at` given) `vf` applies the rates at τ."""
  velocity: Callable
  rate: jax.Array
  rate_at: Callable | None = None

  def vf(self, t, y, args):
    v = self.velocity(t, y)
    return v if self.rate_at is None else self.rate_at(t) * v

  def contr(self, t0, t1, **kwargs):
    return t1 - t0

  def prod(self, vf, control):
    return (vf if self.rate_at is not None else self.rate * vf) * control


class _ActiveRMS(eqx.Module):
  """RMS over the elements that move in this phase (frozen channels have exactly zero error)."""
  active_fraction: jax.Array

  def __call__(self, x):
    return jnp.sqrt(jnp.sum(jnp.square(x)) / (x.size * self.active_fraction))


def _next_step(step_ends, start, inv_error, error_order):
  """The step the controller would take after a phase's last accepted step (had the phase gone on): its length
  times min(10, max(1, 0.9·error^(−1/order))). It is the next phase's first trial step."""
  n = jnp.sum(jnp.isfinite(step_ends))
  last = step_ends[n - 1] - jnp.where(n > 1, step_ends[jnp.maximum(n - 2, 0)], start)
  return last * jnp.clip(0.9 * inv_error ** (1 / error_order), 1.0, 10.0)


def _adaptive(velocity_fn, z, y, schedule, solver, rtol, atol, semantic_channels, max_steps):
  """One solve per phase that moves, over the batch z; returns (final, (P, 3) accepted steps, rejected steps and
  fresh first-stage evaluations per phase)."""
  def velocity(tau, x):
    t_tex, t_sem = schedule.times(jnp.full((x.shape[0],), tau, jnp.float32))
    return velocity_fn(x, t_tex, t_sem, y)

  _, fsal = _calls_per_step(solver)
  channels = z.shape[-1]
  starts, stops, r_tex, r_sem = phases(schedule)
  rates = rate_vector(r_tex, r_sem, channels, semantic_channels)
  active = jnp.mean((rates != 0).astype(jnp.float32), axis=-1)  # the fraction of the channels that move
  solved = (stops > starts) & (active > 0)
  carry_velocity = schedule.constant_rates
  # A first-same-as-last solver evaluates the velocity at a phase's start unless the last solved phase ended there
  # (and the rates are constant per phase, so that the carried value is the raw velocity). Bounds come from the
  # schedule alone (never from the samples), so these conditions stay scalar under vmap.
  fresh, known_at = [], jnp.float32(jnp.nan)
  for i in range(starts.shape[0]):
    fresh.append((known_at != starts[i]) | (not carry_velocity))
    known_at = jnp.where(solved[i], stops[i], known_at)
  xs = (starts, stops, rates, active, solved, jnp.stack(fresh))

  def rate_at_of(a, b):
    if carry_velocity:
      return None
    return lambda tau: rate_vector(*schedule.rates(tau, a, b), channels, semantic_channels)

  order = solver.error_order(_PhaseTerm(velocity, rates[0]))

  def solve(carry, a, b, rate, active, fresh):
    x, f, proposal = carry
    term = _PhaseTerm(velocity, rate, rate_at_of(a, b))
    solver_state = None
    if fsal:
      f = jax.lax.cond(fresh, lambda: term.vf(a, x, None), lambda: f)
      solver_state = (jnp.array(False), f)
    steps_at = diffrax.SubSaveAt(steps=True, fn=lambda t, y, args: None)
    sol = diffrax.diffeqsolve(
        term, solver, a, b, jnp.minimum(b - a, proposal), x, solver_state=solver_state,
        saveat=diffrax.SaveAt(subs=[diffrax.SubSaveAt(t1=True), steps_at], solver_state=True,
                              controller_state=True),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, norm=_ActiveRMS(active)),
        max_steps=max_steps, adjoint=diffrax.ForwardMode())
    f = sol.solver_state[1] if fsal else f
    steps = jnp.stack([sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"], fsal & fresh])
    return (sol.ys[0][0], f, _next_step(sol.ts[1], a, sol.controller_state[0], order)), steps

  def phase(carry, xs):
    a, b, rate, active, solved, fresh = xs
    skip = lambda carry, *_: (carry, jnp.zeros(3, jnp.int32))
    return jax.lax.cond(solved, solve, skip, carry, a, b, rate, active, fresh)

  # One traced solve serves every phase (a scan), so the model is compiled into it once.
  carry = (z, jnp.zeros_like(z), jnp.array(jnp.inf, jnp.float32))
  (final, _, _), steps = jax.lax.scan(phase, carry, xs)
  return final, steps


def _fixed_grid(velocity_fn, z, y, grid, schedule, euler: bool, semantic_channels):
  """Euler / Heun on a fixed grid (left ends, right ends, steps), with the times and rates of the left (and, for
  Heun, right) grid point; for `Offset` the official masks."""
  channels = z.shape[-1]

  def drift(tau, x):
    t_tex, t_sem = schedule.times(jnp.full((x.shape[0],), tau, jnp.float32))
    rate = rate_vector(*schedule.grid_rates(tau), channels, semantic_channels)
    return velocity_fn(x, t_tex, t_sem, y) * rate

  def step(x, xs):
    t0, t1, dt = xs
    k1 = drift(t0, x)
    if euler:
      return x + dt * k1, None
    k2 = drift(t1, x + dt * k1)
    return x + dt * 0.5 * (k1 + k2), None

  final, _ = jax.lax.scan(step, z, grid)
  return final


def _batch_axes(batch: int):
  """The mesh axes the per-sample solves are split over: those of the batch when a mesh is in context
  (`sharding.traced_with_mesh`), so that the vmapped model stays sharded (and the TPU attention kernel runs on
  each device's samples)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or batch % shd.batch_devices(mesh) else shd.BATCH_AXES


def _schedule_of(delta_t, schedule) -> schedule_lib.Schedule:
  if schedule is None:
    schedule = schedule_lib.Offset(0.3 if delta_t is None else delta_t)
  elif delta_t is not None:
    raise ValueError(f"give the schedule once: delta_t={delta_t} and schedule={type(schedule).__name__} (delta_t "
                     "is the shorthand for schedule.Offset(delta_t))")
  if not isinstance(schedule, schedule_lib.Schedule):
    raise TypeError(f"schedule must be a sfd_jax.diffusion.schedule.Schedule, got {type(schedule).__name__}")
  if isinstance(schedule, schedule_lib.Offset) and not isinstance(schedule.delta, jax.core.Tracer):
    if schedule.delta < 0:
      raise ValueError(f"delta_t={schedule.delta} must be ≥ 0 (0 is the ordinary sampler)")
  return schedule


def _check(z, y, schedule, solver, num_steps, error_norm, semantic_channels):
  if error_norm not in ERROR_NORMS:
    raise ValueError(f"error_norm {error_norm!r} is not one of {ERROR_NORMS}")
  if solver in FIXED_GRIDS:
    if num_steps is None:
      raise ValueError(f"method {solver!r} needs num_steps (grid points, as the official num_sampling_steps)")
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(schedule)):
      raise ValueError("the official fixed grid is computed on the host: give the schedule (delta_t) as numbers, "
                       "not traced values")
  if z.ndim != 4 or not 0 <= semantic_channels <= z.shape[-1]:
    raise ValueError(f"z must be NHWC latents (B, H, W, C) with C ≥ semantic_channels={semantic_channels} ≥ 0, "
                     f"got shape {z.shape}")
  if y.shape != z.shape[:1]:
    raise ValueError(f"y must hold one label per sample: shape ({z.shape[0]},), got {y.shape}")


def sample(velocity_fn, z, y, delta_t=None, method: str | None = None, num_steps: int | None = None,
           shift: float = 0.0, rtol: float = 1e-3, atol: float = 1e-6, *,
           schedule: schedule_lib.Schedule | None = None, solver: str | diffrax.AbstractSolver | None = None,
           error_norm: str = "per_sample", semantic_channels: int = 16, max_steps: int = 4096):
  """Integrates the schedule's ODE from noise `z` (τ = 0) to τ = end; returns (final, stats).

  `schedule`: a `diffusion.schedule.Schedule`; `delta_t` is the shorthand for `schedule.Offset(delta_t)`, SFD's
  three phases (give one of the two; Δ = 0.3 when neither is given). Its numbers may be traced values (adaptive
  solvers only); a new Δ or map reuses the compiled sampler either way.
  `solver`: a name in `METHODS` or an explicit Runge–Kutta diffrax solver instance (`diffrax.Tsit5()`, ...);
  `method` is the same choice by name (give one of the two). 'dopri5' (the default), 'tsit5', 'bosh3',
  'adaptive_heun' and solver instances step adaptively, phase by phase (`rtol`, `atol`, `error_norm`
  'per_sample' or 'batch', at most `max_steps` steps per phase; `num_steps` and `shift` unused); 'euler' and
  'heun' run on the official `time_grid(delta_t, num_steps, shift)` (over [0, end] for other schedules).
  `stats`: `model_calls` (the number of velocity_fn evaluations, each on the whole batch), and per sample
  `accepted_steps` and `rejected_steps`.
  """
  solver = resolve_solver(method, solver)
  schedule = _schedule_of(delta_t, schedule)
  z = jnp.asarray(z, jnp.float32)
  y = jnp.asarray(y)
  _check(z, y, schedule, solver, num_steps, error_norm, semantic_channels)
  grid = None
  if solver in FIXED_GRIDS:
    t = (time_grid(float(schedule.delta), num_steps, shift) if isinstance(schedule, schedule_lib.Offset)
         else _grid(np.float32(schedule.end()), num_steps, shift))
    grid = (jnp.asarray(t[:-1]), jnp.asarray(t[1:]), jnp.asarray(np.diff(t).astype(np.float32)))
  schedule = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), schedule)  # traced: no compilation per value
  return _sample(velocity_fn, z, y, schedule, grid, solver, rtol, atol, error_norm, semantic_channels, max_steps)


@eqx.filter_jit
def _sample(velocity_fn, z, y, schedule, grid, solver, rtol, atol, error_norm, semantic_channels, max_steps):
  b = z.shape[0]
  if grid is not None:
    final = _fixed_grid(velocity_fn, z, y, grid, schedule, solver == "euler", semantic_channels)
    steps = grid[0].shape[0]
    calls = steps if solver == "euler" else 2 * steps
    return final, {"model_calls": jnp.asarray(calls, jnp.int32),
                   "accepted_steps": jnp.full((b,), steps, jnp.int32), "rejected_steps": jnp.zeros((b,), jnp.int32)}
  solve = lambda z_, y_: _adaptive(velocity_fn, z_, y_, schedule, solver, rtol, atol, semantic_channels, max_steps)
  if error_norm == "batch":
    final, steps = solve(z, y)
    steps = jnp.broadcast_to(steps, (b, *steps.shape))
  else:
    final, steps = jax.vmap(lambda zi, yi: solve(zi[None], yi[None]), spmd_axis_name=_batch_axes(b))(z, y)
    final = final[:, 0]
  # Per phase: the first-same-as-last velocity at its start where the previous phase did not end there, and the
  # solver's stages per attempted step. The samples step together (one batched call per stage), so the slowest
  # sample of a phase sets its count.
  per_step, _ = _calls_per_step(solver)
  attempts = jnp.max(steps[..., 0] + steps[..., 1], axis=0)
  calls = jnp.sum(jnp.max(steps[..., 2], axis=0)) + per_step * jnp.sum(attempts)
  return final, {"model_calls": calls.astype(jnp.int32), "accepted_steps": steps[..., 0].sum(-1),
                 "rejected_steps": steps[..., 1].sum(-1)}
