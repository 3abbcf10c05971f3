"""Schedules against closed forms: their times, breakpoints and rates, their storage, and the sampler's ODE for any
schedule (each stream's integral of its own time's velocity does not depend on when the stream moves)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.tree_util import Partial

from sfd_jax.diffusion import sampler, schedule as schedule_lib
from sfd_jax.diffusion.schedule import Function, Learned, Offset, RandomOffset, piecewise_linear
from sfd_jax.errors import UserError

SEM = 2  # semantic channels of the test latents (B, 2, 2, 5): 3 texture + 2 semantic


def test_offset_times_breakpoints_and_rates_are_sfds():
  tau = np.linspace(0, 1.3, 27, dtype=np.float32)
  t_tex, t_sem = Offset(0.3).times(tau)
  np.testing.assert_allclose(t_tex, np.maximum(tau - 0.3, 0), atol=1e-7)
  np.testing.assert_allclose(t_sem, np.minimum(tau, 1), atol=1e-7)
  np.testing.assert_allclose(Offset(0.3).breakpoints(), [0, 0.3, 1, 1.3], atol=1e-7)
  starts, stops, r_tex, r_sem = sampler.phases(Offset(0.3))
  np.testing.assert_array_equal(r_tex, [0, 1, 1])
  np.testing.assert_array_equal(r_sem, [1, 1, 0])
  np.testing.assert_allclose(Offset(1.5).breakpoints(), [0, 1, 1.5, 2.5])  # nothing moves on [1, 1.5]
  np.testing.assert_array_equal(sampler.phases(Offset(1.5))[2:], [[0, 0, 1], [1, 0, 0]])
  # the official masks at grid points: texture from τ = Δ on, semantics up to τ = 1, both inclusive
  r_tex, r_sem = jax.vmap(Offset(0.3).grid_rates)(jnp.array([0.0, 0.3, 1.0, 1.3], jnp.float32))
  np.testing.assert_array_equal(r_tex, [0, 1, 1, 1])
  np.testing.assert_array_equal(r_sem, [1, 1, 1, 0])


def test_piecewise_linear_through_knots():
  schedule = piecewise_linear([(0, 0, 0), (0.5, 0.1, 0.8), (0.5, 0.1, 0.8), (2.0, 1, 1)])  # a repeated knot
  t_tex, t_sem = schedule.times(jnp.array([0.0, 0.25, 0.5, 1.25, 2.0, 2.5]))
  np.testing.assert_allclose(t_tex, [0, 0.05, 0.1, 0.55, 1, 1], atol=1e-6)
  np.testing.assert_allclose(t_sem, [0, 0.4, 0.8, 0.9, 1, 1], atol=1e-6)
  starts, stops, r_tex, r_sem = sampler.phases(schedule)
  assert starts[1] == stops[1]  # the empty cell: the sampler skips it
  np.testing.assert_allclose(r_tex[::2], [0.2, 0.6], atol=1e-6)
  np.testing.assert_allclose(r_sem[::2], [1.6, 0.2 / 1.5], atol=1e-6)
  np.testing.assert_allclose(schedule.train_times(jnp.array([0.5]))[0], [0.4], atol=1e-6)  # τ = end·t = 1
  np.testing.assert_allclose(schedule.train_rates(jnp.array([0.5]))[0], [0.6 * 2.0], atol=1e-5)


@pytest.mark.parametrize("knots, problem", [
    ([(0, 0, 0), (1, 0.5, 1), (0.5, 1, 1)], "τ must be non-decreasing"),
    ([(0, 0, 0), (1, 0.9, 1)], "t_tex must run from 0 to 1"),
    ([(0, 0, 0.2), (1, 1, 1)], "t_sem must run from 0 to 1"),
    ([(0, 0, 0), (0.5, 0.6, 0.5), (1, 0.4, 1), (1.5, 1, 1)], "t_tex must be non-decreasing"),
    ([(0, 0, 0)], "at least two"),
])
def test_bad_knots_are_one_sentence(knots, problem):
  with pytest.raises(UserError, match=problem):
    piecewise_linear(knots)


def _cfg(**schedule):
  spec = dict(kind="offset", delta_range=(0.0, 0.6), knots=(), cells=13, probe_steps=10, lr=1e-2, kinetic_weight=0.1)
  spec.update(schedule)
  return ml_collections.ConfigDict(dict(delta_t=0.3, schedule=spec))


@pytest.mark.parametrize("schedule", [
    Offset(0.25), RandomOffset(0.3, 0.1, 0.5), piecewise_linear([(0, 0, 0), (0.4, 0, 0.7), (1.2, 1, 1)]),
    Learned(schedule_lib.learned_init(0.3, 13) + jnp.linspace(-1, 1, 13)),
])
def test_metadata_round_trips(schedule):
  again = schedule_lib.from_metadata(schedule.to_metadata())
  assert type(again) is type(schedule)
  tau = jnp.linspace(0, schedule.end(), 50)
  for a, b in zip(schedule.times(tau), again.times(tau)):
    np.testing.assert_array_equal(a, b)


def test_from_config_and_its_errors():
  assert schedule_lib.from_config(_cfg()) == Offset(0.3)
  random = schedule_lib.from_config(_cfg(kind="random_offset", delta_range=(0.1, 0.4)))
  assert (random.delta, random.low, random.high) == (0.3, 0.1, 0.4)
  assert isinstance(schedule_lib.from_config(_cfg(kind="learned")), Learned)
  for cfg, message in ((_cfg(kind="nope"), "is not one of"), (_cfg(kind="random_offset", delta_range=(0.5, 0.1)),
                                                               "0 ≤ low ≤ high"),
                       (_cfg(kind="piecewise_linear"), "at least two")):
    with pytest.raises(UserError, match=message):
      schedule_lib.from_config(cfg)
  with pytest.raises(UserError, match="cannot be stored"):
    Function(_quadratic).to_metadata()


def test_random_offset_draws_delta_per_example_in_its_range():
  keys = jax.random.split(jax.random.key(0), 4000)
  t_tex, t_sem = RandomOffset(0.3, 0.1, 0.5).train_times(jnp.full((4000,), 0.5), keys)
  delta = 2 * np.asarray(t_sem) - 1  # t_sem = (1 + Δ)/2 at t = 0.5
  np.testing.assert_allclose(t_tex, (1 + delta) / 2 - delta, atol=1e-6)
  assert delta.min() >= 0.1 - 1e-6 and delta.max() <= 0.5 + 1e-6
  np.testing.assert_allclose([delta.mean(), delta.std()], [0.3, 0.4 / np.sqrt(12)], atol=0.01)
  np.testing.assert_allclose(Offset(0.3).times(jnp.float32(0.8)), RandomOffset(0.3).times(jnp.float32(0.8)))


def test_learned_init_is_sfds_offset_and_learned_maps_are_convex_and_monotone():
  sfd, learned = Offset(0.3), Learned(schedule_lib.learned_init(0.3, 13))
  u = jnp.linspace(0, 1, 131)
  for a, b in zip(learned.times(u), sfd.times(1.3 * u)):
    np.testing.assert_allclose(a, b, atol=3e-3)  # the floor increments keep every cell's slope above 0
  for seed in range(5):
    raw = 3 * jax.random.normal(jax.random.key(seed), (13,))
    taus, tex, sem = schedule_lib.learned_knots(raw)
    slopes = np.diff(tex) / np.diff(taus)
    assert np.all(np.diff(tex) >= 0) and np.all(np.diff(slopes) >= -1e-4)  # monotone, convex
    assert tex[0] == 0 and tex[-1] == 1 and sem[0] == 0 and sem[-1] == 1
    np.testing.assert_allclose(sem, 1 - tex[::-1], atol=1e-6)
    assert np.all(np.asarray(sem) >= np.asarray(tex) - 1e-6)  # semantics never behind texture


def _quadratic(tau):
  """Texture as τ², semantics as 1 − (1 − τ)²: smooth and monotone on [0, 1]."""
  return tau ** 2, 1 - (1 - tau) ** 2


def _decay(x, t_tex, t_sem, y):
  """v = −x on every channel, NaN where a stream's time leaves [0, 1]: each stream ends at z·e^{−1}, whatever the
  schedule."""
  del y
  t = jnp.where(jnp.arange(x.shape[-1]) >= x.shape[-1] - SEM, t_sem[:, None, None, None], t_tex[:, None, None, None])
  return jnp.where((t >= 0) & (t <= 1), -x, jnp.nan)


SCHEDULES = {
    "offset": Offset(0.3),
    "piecewise_linear": piecewise_linear([(0, 0, 0), (0.2, 0, 0.5), (0.7, 0.3, 1), (1.5, 1, 1)]),
    "function": Function(_quadratic, 1.0),
    "learned": Learned(schedule_lib.learned_init(0.3, 13) + jnp.linspace(-0.5, 0.5, 13)),
}


@pytest.mark.parametrize("name, solver", [("offset", "dopri5"), ("piecewise_linear", "tsit5"), ("function", "dopri5"),
                                          ("learned", "bosh3")])
def test_each_stream_integrates_its_own_time_whatever_the_schedule(name, solver):
  z = jax.random.normal(jax.random.key(1), (2, 2, 2, 5))
  final, stats = sampler.sample(Partial(_decay), z, jnp.zeros(2, jnp.int32), schedule=SCHEDULES[name],
                                solver=solver, rtol=1e-6, atol=1e-8, semantic_channels=SEM)
  np.testing.assert_allclose(final, np.exp(-1.0) * np.asarray(z), rtol=2e-5, atol=1e-6)
  assert int(stats["model_calls"]) > 0


def test_a_piecewise_linear_copy_of_the_offset_samples_like_the_offset():
  z = jax.random.normal(jax.random.key(2), (2, 2, 2, 5))
  copy = piecewise_linear([(0, 0, 0), (0.3, 0, 0.3), (1, 0.7, 1), (1.3, 1, 1)])
  field = Partial(_nonlinear)
  a, stats_a = sampler.sample(field, z, jnp.zeros(2, jnp.int32), schedule=Offset(0.3), semantic_channels=SEM)
  b, stats_b = sampler.sample(field, z, jnp.zeros(2, jnp.int32), schedule=copy, semantic_channels=SEM)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(stats_a["model_calls"]) == int(stats_b["model_calls"])


def _nonlinear(x, t_tex, t_sem, y):
  del y
  return jnp.sin(3 * x) + t_tex[:, None, None, None] - 2 * t_sem[:, None, None, None]


def test_delta_and_schedule_are_given_once():
  z = jnp.zeros((1, 2, 2, 5))
  with pytest.raises(ValueError, match="give the schedule once"):
    sampler.sample(Partial(_decay), z, jnp.zeros(1, jnp.int32), delta_t=0.3, schedule=Offset(0.3),
                   semantic_channels=SEM)
