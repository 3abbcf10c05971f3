"""The learned schedule: its parametrisation against closed forms, the schedule-corrected loss against a numpy
computation, the probe inside the train step (trained, then frozen bit-exactly), and a learned run through
`cli.train`: checkpointed, resumed bit-exactly, logged, plotted and loaded for sampling."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from sfd_jax import generate, plots, sharding as shd
from sfd_jax.diffusion import loss as loss_lib, schedule as schedule_lib
from sfd_jax.training import checkpoint as ckpt_lib, config as config_lib, state as state_lib, step as step_lib
from tests.golden import REPO, subprocess_env
from tests.tiny import tiny_batch, tiny_config

CELLS = 13


def numpy_knots(raw):
  """(τ, t_tex) knots of the documented parametrisation, in float64: slopes = cumulative sums of softplus(raw),
  t_tex the normalised integral of the slopes on uniform cells."""
  slopes = np.cumsum(np.log1p(np.exp(np.asarray(raw, np.float64))))
  tex = np.concatenate([[0.0], np.cumsum(slopes)])
  return np.linspace(0.0, 1.0, len(slopes) + 1), tex / tex[-1]


def numpy_times_and_rates(raw, t):
  """(t_tex, t_sem, ṫ_tex, ṫ_sem) at base times t (away from the knots): t_sem(τ) = 1 − t_tex(1 − τ)."""
  taus, tex = numpy_knots(raw)
  cells = len(taus) - 1
  slope = np.diff(tex) * cells
  t_tex, t_sem = np.interp(t, taus, tex), 1.0 - np.interp(1.0 - t, taus, tex)
  return t_tex, t_sem, slope[np.floor(t * cells).astype(int)], slope[np.floor((1.0 - t) * cells).astype(int)]


def test_learned_init_is_sfd_offset_up_to_the_floor_increments():
  schedule = schedule_lib.Learned(schedule_lib.learned_init(0.3, CELLS))
  u = np.linspace(0.0, 1.0, 1001)  # τ / (1 + Δ): SFD's global time on the learned map's [0, 1]
  t_tex, t_sem = (np.asarray(x) for x in schedule.times(u))
  np.testing.assert_allclose(t_tex, np.clip(1.3 * u - 0.3, 0, 1), atol=1e-3)
  np.testing.assert_allclose(t_sem, np.clip(1.3 * u, 0, 1), atol=1e-3)
  assert float(schedule.end()) == 1.0


def test_learned_is_monotone_and_convex_for_random_parameters():
  rng = np.random.default_rng(0)
  u = np.linspace(0.0, 1.0, 2001)
  for _ in range(5):
    raw = rng.normal(0.0, 2.0, CELLS).astype(np.float32)
    t_tex, t_sem = (np.asarray(x, np.float64) for x in schedule_lib.Learned(raw).times(u))
    assert t_tex[0] == t_sem[0] == 0.0 and abs(t_tex[-1] - 1) < 1e-6 and abs(t_sem[-1] - 1) < 1e-6
    assert np.all(np.diff(t_tex) >= -1e-7) and np.all(np.diff(t_sem) >= -1e-7)  # monotone
    assert np.all(np.diff(t_tex, 2) >= -1e-6) and np.all(np.diff(t_sem, 2) <= 1e-6)  # convex, concave
    assert np.all(t_sem >= t_tex - 1e-6)  # semantics never behind texture
    _, tex = numpy_knots(raw)
    np.testing.assert_allclose(t_tex, np.interp(u, np.linspace(0, 1, CELLS + 1), tex), atol=2e-6)


# A stand-in network: v = w·x_t + a·t_tex + b·t_sem per channel, so the times reach the output directly.
def stand_in(params, x, t_tex, t_sem, y):
  del y
  return params["w"] * x + params["a"] * t_tex[:, None, None, None] + params["b"] * t_sem[:, None, None, None]


def numpy_loss(params, x1, x0, t, raw, weight_raw, semantic_channels, semantic_weight, kinetic_weight):
  """The schedule-corrected loss in numpy: per stream sg(ṫ_k)·‖f − v‖² (the weight's ṫ from `weight_raw`), the
  cosine loss, and λ·‖ṫ f‖², each a mean over the example and then the batch."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  t_tex, t_sem, r_tex, r_sem = numpy_times_and_rates(raw, t)
  _, _, w_tex, w_sem = numpy_times_and_rates(weight_raw, t)
  c = x1.shape[-1] - semantic_channels
  expand = lambda v: v[:, None, None, None]
  t_of = np.concatenate([np.broadcast_to(expand(t_tex), x1[..., :c].shape),
                         np.broadcast_to(expand(t_sem), x1[..., c:].shape)], -1)
  x_t = t_of * x1 + (1 - t_of) * x0
  f = p["w"] * x_t + p["a"] * expand(t_tex) + p["b"] * expand(t_sem)
  v = x1 - x0
  is_sem = np.arange(x1.shape[-1]) >= c
  weights = np.where(is_sem, semantic_weight * expand(w_sem), expand(w_tex))
  rates = np.where(is_sem, expand(r_sem), expand(r_tex))
  mse = np.mean(weights * (f - v) ** 2, axis=(1, 2, 3))
  cos_similarity = np.sum(f * v, -1) / (np.linalg.norm(f, axis=-1) * np.linalg.norm(v, axis=-1))
  cos = np.mean(1 - cos_similarity, axis=(1, 2))
  kinetic = kinetic_weight * np.mean((rates * f) ** 2, axis=(1, 2, 3))
  return np.mean(mse) + np.mean(cos) + np.mean(kinetic)


@pytest.fixture(scope="module")
def tiny_problem():
  rng = np.random.default_rng(1)
  b, size, channels, semantic = 3, 2, 5, 2
  x1 = rng.normal(size=(b, size, size, channels))
  x0 = rng.normal(size=(b, size, size, channels))
  t = np.asarray([0.13, 0.52, 0.91])  # inside cells, away from the knots
  params = {k: rng.normal(size=channels).astype(np.float32) for k in ("w", "a", "b")}
  raw = (np.asarray(schedule_lib.learned_init(0.3, CELLS)) + rng.normal(0, 0.5, CELLS)).astype(np.float32)
  return params, x1, x0, t, raw, semantic


def _jax_total(params, raw, x1, x0, t, semantic, kinetic_weight):
  return loss_lib.loss_terms(
      stand_in, params, jnp.float32(x1), jnp.float32(x0), jnp.float32(t), jnp.zeros(3, jnp.int32),
      jnp.zeros(3, bool), None, schedule=schedule_lib.Learned(raw), semantic_weight=2.0, repa_weight=0.0,
      num_classes=10, semantic_channels=semantic, kinetic_weight=kinetic_weight)["total"]


def test_schedule_corrected_loss_equals_a_numpy_computation(tiny_problem):
  params, x1, x0, t, raw, semantic = tiny_problem
  for kinetic_weight in (0.0, 0.7):
    expected = numpy_loss(params, x1, x0, t, raw, raw, semantic, 2.0, kinetic_weight)
    np.testing.assert_allclose(float(_jax_total(params, raw, x1, x0, t, semantic, kinetic_weight)), expected,
                               rtol=2e-5)


def test_the_gradient_reaches_every_parameter_and_the_weights_are_held(tiny_problem):
  """jax.grad w.r.t. raw = the numpy loss's central differences with the weights' ṫ held at raw (stop-gradient)
  and the kinetic term's ṫ moving."""
  params, x1, x0, t, raw, semantic = tiny_problem
  grad = np.asarray(jax.grad(lambda r: _jax_total(params, r, x1, x0, t, semantic, 0.7))(jnp.asarray(raw)))
  assert np.all(grad != 0)
  eps, raw64 = 1e-5, raw.astype(np.float64)
  numeric = np.empty(CELLS)
  for i in range(CELLS):
    step = np.eye(CELLS)[i] * eps
    numeric[i] = (numpy_loss(params, x1, x0, t, raw64 + step, raw64, semantic, 2.0, 0.7)
                  - numpy_loss(params, x1, x0, t, raw64 - step, raw64, semantic, 2.0, 0.7)) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=1e-5 * np.abs(numeric).max())


def _learned(cfg, probe_steps):
  cfg.loss.schedule.update(kind="learned", probe_steps=probe_steps, lr=0.05)
  return cfg


def test_the_probe_trains_the_schedule_with_the_model_then_freezes_it():
  cfg = _learned(tiny_config(), probe_steps=3)
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  model = config_lib.build_model(cfg.model)
  tx = state_lib.make_optimizer(cfg.optim)
  state, shardings = state_lib.create_train_state(model, tx, mesh, cfg.sharding, jax.random.key(0),
                                                  state_lib.learned_schedule(cfg))
  np.testing.assert_array_equal(state.schedule_raw, schedule_lib.learned_init(0.3, CELLS))
  train_step = step_lib.make_train_step(step_lib.sfd_loss_fn(model, cfg), tx, cfg, mesh, shardings)
  batch = shd.shard_batch(mesh, tiny_batch(cfg))
  history = [jax.device_get(state)]
  logged = []
  for _ in range(5):
    state, metrics = train_step(state, batch)
    history.append(jax.device_get(state))
    logged.append(jax.device_get(metrics))
  raws = [h.schedule_raw for h in history]
  # Each of the probe's 3 steps moves the schedule; after them it stays bit for bit, as does its Adam state.
  assert all(m["schedule_grad_norm"] > 0 for m in logged[:3])
  assert all(np.any(raws[k + 1] != raws[k]) for k in range(3))
  for later in (4, 5):
    np.testing.assert_array_equal(raws[later], raws[3])
    jax.tree.map(np.testing.assert_array_equal, history[later].schedule_opt_state, history[3].schedule_opt_state)
    assert np.any(history[later].params["final_layer"]["linear"]["kernel"]
                  != history[later - 1].params["final_layer"]["linear"]["kernel"])  # the model still trains
  assert all(m["loss_kinetic"] > 0 for m in logged[1:3]) and all(m["loss_kinetic"] == 0 for m in logged[3:])
  # The logged knots are the state's map.
  _, tex = numpy_knots(raws[5])
  for i in range(1, CELLS):
    np.testing.assert_allclose(logged[4][f"schedule_t_tex_{i}_of_{CELLS}"], tex[i], rtol=1e-5)


@pytest.mark.slow  # micro-batching itself is tested in the fast tier (test_train_step)
def test_micro_batches_give_the_whole_batch_update_of_the_schedule():
  results = []
  for accum in (1, 2):
    cfg = _learned(tiny_config(grad_accum_steps=accum), probe_steps=3)
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    model = config_lib.build_model(cfg.model)
    tx = state_lib.make_optimizer(cfg.optim)
    state, shardings = state_lib.create_train_state(model, tx, mesh, cfg.sharding, jax.random.key(0),
                                                    state_lib.learned_schedule(cfg))
    train_step = step_lib.make_train_step(step_lib.sfd_loss_fn(model, cfg), tx, cfg, mesh, shardings)
    batch = shd.shard_batch(mesh, tiny_batch(cfg))
    for _ in range(2):
      state, metrics = train_step(state, batch)
    results.append(jax.device_get((state.schedule_raw, metrics["schedule_grad_norm"], metrics["loss_kinetic"])))
  assert np.any(results[0][0] != np.asarray(schedule_lib.learned_init(0.3, CELLS)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), *results)


def test_other_schedules_keep_the_state_tree():
  """A run whose schedule is not learned has the state (and so the checkpoints) it always had."""
  cfg = tiny_config()
  assert state_lib.learned_schedule(cfg) is None
  model = config_lib.build_model(cfg.model)
  abstract, shardings = state_lib.abstract_train_state(model, state_lib.make_optimizer(cfg.optim),
                                                       shd.make_mesh(devices=jax.devices()[:1]), cfg.sharding)
  for tree in (abstract, shardings):
    assert type(tree) is state_lib.TrainState and tree.schedule_raw is None
    assert {path[0].name for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]} == {
        "step", "params", "ema_params", "opt_state", "rng"}


# Through the command line: 8 steps straight, and 4 + 4 resumed; the probe ends after step 5, inside the second
# half, so the resumed run restores the schedule and its Adam state mid-probe. Both sample at step 8 with the
# learned schedule.
OVERRIDES = ("loss.schedule.kind=learned", "loss.schedule.probe_steps=5", "loss.schedule.lr=0.05", "log_every=1",
             "sample_every=8")


def _train(workdir, *overrides):
  command = [sys.executable, "-m", "sfd_jax.cli.train", f"--config={REPO / 'configs' / 'smoke.py'}",
             f"--workdir={workdir}", *[f"--config.{o}" for o in (*OVERRIDES, *overrides)]]
  result = subprocess.run(command, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _final_state(workdir):
  cfg = ConfigDict(json.loads((Path(workdir) / "config.json").read_text()))
  model = config_lib.build_model(cfg.model)
  abstract, _ = state_lib.abstract_train_state(model, state_lib.make_optimizer(cfg.optim),
                                               shd.make_mesh(devices=jax.devices()[:1]), cfg.sharding,
                                               state_lib.learned_schedule(cfg))
  checkpointer = ckpt_lib.Checkpointer(Path(workdir) / "checkpoints")
  try:
    step = checkpointer.steps()[-1]
    return step, jax.device_get(checkpointer.restore(step, abstract))
  finally:
    checkpointer.close()


@pytest.fixture(scope="module")
def learned_runs(tmp_path_factory):
  straight, resumed = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
  _train(straight, "total_steps=8")
  _train(resumed, "total_steps=4")
  result = _train(resumed, "total_steps=8")
  assert "resumed from step 4" in result.stdout
  assert all((run / "samples" / "sample_latents_00000008.png").exists() for run in (straight, resumed))
  return straight, resumed


@pytest.mark.slow  # three CLI trainings (minutes): the full tier; the probe itself is tested in the fast tier above
def test_a_learned_run_resumes_bit_exactly(learned_runs):
  (step_a, a), (step_b, b) = (_final_state(run) for run in learned_runs)
  assert step_a == step_b == 8 and a.schedule_raw.shape == (CELLS,)
  assert np.any(a.schedule_raw != np.asarray(schedule_lib.learned_init(0.3, CELLS)))
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params, EMA, both optimisers, schedule, rng


@pytest.mark.slow  # three CLI trainings (minutes): the full tier; the probe itself is tested in the fast tier above
def test_a_learned_run_logs_plots_and_loads_its_schedule(learned_runs):
  straight, resumed = learned_runs
  records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss_kinetic" in r] == list(range(1, 9))
  knots = [r for r in records if "schedule_t_tex_3_of_13" in r]
  assert [r["step"] for r in knots] == list(range(1, 9))
  assert all(knots[k]["schedule_t_tex_3_of_13"] == knots[4]["schedule_t_tex_3_of_13"] for k in (5, 6, 7))
  _, state = _final_state(straight)
  _, tex = numpy_knots(state.schedule_raw)
  np.testing.assert_allclose(knots[-1]["schedule_t_tex_3_of_13"], tex[3], rtol=1e-5)
  png = plots.learned_schedule(straight)
  assert png == straight / "plots" / "learned_schedule.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  model, variables, kwargs = generate.load_training_run(straight)
  schedule = kwargs["schedule"]
  assert isinstance(schedule, schedule_lib.Learned)
  np.testing.assert_array_equal(schedule.raw, state.schedule_raw)
