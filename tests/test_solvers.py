"""Any diffrax solver phase by phase, model calls counted, and sweeps over Δ and guidance scale without recompiling."""
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.diffusion import sampler
from tests.test_sampler import analytic_final, analytic_velocity, tiny_model

SOLVERS = ["dopri5", "tsit5", "bosh3", "adaptive_heun", diffrax.Ralston(scan_kind="lax")]
# Model calls per attempted step (stages, less the first-same-as-last one) and whether the phase start costs one.
STAGES = {"dopri5": (6, True), "tsit5": (6, True), "bosh3": (3, True), "adaptive_heun": (2, False),
          "Ralston": (2, False)}


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s if isinstance(s, str) else type(s).__name__)
def test_adaptive_solvers_solve_the_three_phase_ode_and_count_their_calls(solver):
  calls = []
  z = np.random.default_rng(0).normal(size=(2, 2, 2, 48)).astype(np.float32)
  final, stats = sampler.sample(analytic_velocity(calls), z, np.zeros(2, np.int32), delta_t=0.3, solver=solver,
                                rtol=1e-5, atol=1e-7, error_norm="batch")
  np.testing.assert_allclose(np.asarray(final), analytic_final(z), atol=2e-3)
  assert int(stats["model_calls"]) == len(calls)
  per_step, fsal = STAGES[solver if isinstance(solver, str) else type(solver).__name__]
  attempts = int(stats["accepted_steps"][0] + stats["rejected_steps"][0])
  # Δ = 0.3 < 1: three adjoining phases, so a first-same-as-last solver evaluates one phase start, the first.
  assert len(calls) == per_step * attempts + fsal
  times = np.array(calls)
  assert times.min() >= 0 and times.max() <= 1  # no stream is ever evaluated outside [0, 1]


def test_euler_solver_needs_the_fixed_grid():
  z, y = np.zeros((1, 2, 2, 48), np.float32), np.zeros(1, np.int32)
  with pytest.raises(ValueError, match="no error estimate"):
    sampler.sample(analytic_velocity([]), z, y, solver=diffrax.Euler())
  with pytest.raises(ValueError, match="give the solver once"):
    sampler.sample(analytic_velocity([]), z, y, method="euler", solver="dopri5")
  with pytest.raises(ValueError, match="explicit Runge–Kutta"):
    sampler.sample(analytic_velocity([]), z, y, solver=diffrax.Kvaerno3())


class CoupledModel:
  """A stand-in model: texture channel i moves with semantic channel i (dtex/dτ = sem), the semantic channels
  with 1 where conditional and 0 where not (y = null), so under CFG with scale s they move with s and

    sem(1+Δ) = sem0 + s,   tex(1+Δ) = tex0 + sem0 + s·((1 − Δ²)/2 + Δ)   (0 ≤ Δ ≤ 1).
  """
  traces = 0

  def apply(self, variables, x, t_tex, t_sem, y):
    CoupledModel.traces += 1  # runs only while `sample` traces it
    sem = x[..., 2:]
    cond = (y != 10).astype(x.dtype)[:, None, None, None]
    return jnp.concatenate([sem, jnp.broadcast_to(cond, sem.shape)], -1)


def coupled_final(z, delta, scale):
  tex0, sem0 = z[..., :2], z[..., 2:]
  return np.concatenate([tex0 + sem0 + scale * ((1 - delta ** 2) / 2 + delta), sem0 + scale], -1)


def test_a_sweep_over_delta_and_guidance_scale_compiles_once():
  model = CoupledModel()
  z = np.random.default_rng(1).normal(size=(2, 2, 2, 4)).astype(np.float32)
  y = np.array([3, 7], np.int32)
  traces = []
  for delta, scale in [(0.3, 1.5), (0.6, 1.5), (0.6, 4.0), (0.0, 2.0)]:
    velocity = sampler.cfg_velocity(model, {}, scale, null_label=10, semantic_channels=2)
    final, _ = sampler.sample(velocity, z, y, delta_t=delta, rtol=1e-6, atol=1e-8, semantic_channels=2)
    np.testing.assert_allclose(np.asarray(final), coupled_final(z, delta, scale), rtol=1e-5, atol=1e-5)
    traces.append(CoupledModel.traces)
  assert traces[0] > 0 and traces[1:] == traces[:1] * 3, traces
  # Δ may be traced by an outer jit.
  velocity = sampler.cfg_velocity(model, {}, 1.5, null_label=10, semantic_channels=2)
  swept = jax.jit(lambda delta: sampler.sample(velocity, z, y, delta_t=delta, rtol=1e-6, atol=1e-8,
                                               semantic_channels=2)[0])
  np.testing.assert_allclose(np.asarray(swept(0.45)), coupled_final(z, 0.45, 1.5), rtol=1e-5, atol=1e-5)
  # The official fixed grid: Δ is traced there too (its grid is an argument). Its masks at the grid points make
  # it first order across the jumps, hence the looser tolerance (the two Δ differ by 0.33 in texture).
  for delta in (0.3, 0.6):
    velocity = sampler.cfg_velocity(model, {}, 2.0, null_label=10, semantic_channels=2)
    final, _ = sampler.sample(velocity, z, y, delta_t=delta, method="heun", num_steps=201, semantic_channels=2)
    np.testing.assert_allclose(np.asarray(final), coupled_final(z, delta, 2.0), rtol=1e-2, atol=1e-2)
    traces.append(CoupledModel.traces)
  assert traces[-1] == traces[-2] > traces[3], traces


def test_diffrax_solvers_sample_a_dit_to_their_tolerance():
  model, variables = tiny_model()
  velocity = sampler.model_velocity(model, variables)
  z = sampler.noise(jax.random.key(0), np.arange(2), (4, 4, 48))
  y = np.array([1, 5], np.int32)
  reference, _ = sampler.sample(velocity, z, y, delta_t=0.3, rtol=1e-7, atol=1e-9)
  scale = float(np.abs(np.asarray(reference)).max())
  for solver in ["dopri5", diffrax.Tsit5(), diffrax.Bosh3(), diffrax.Heun()]:
    final, stats = sampler.sample(velocity, z, y, delta_t=0.3, solver=solver, rtol=1e-4, atol=1e-6)
    error = float(np.abs(np.asarray(final) - np.asarray(reference)).max())
    assert error < 5 * 1e-4 * scale, (solver, error, scale)  # 6.6e-4 for Dopri5, 1.6e-5 for Heun (scale 5.6)
    assert int(stats["model_calls"]) > 0
