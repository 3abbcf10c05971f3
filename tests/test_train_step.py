"""The train step: EMA, NaN guard, gradient accumulation, schedules, and sharded / multi-process equivalence."""
import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from sfd_jax import sharding as shd
from sfd_jax.training import config as config_lib, state as state_lib, step as step_lib
from tests.golden import free_port, subprocess_env
from tests.tiny import tiny_batch, tiny_config

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_steps.py")


def _run_one_step(cfg, batch):
  mesh = shd.make_mesh()
  model = config_lib.build_model(cfg.model)
  tx = state_lib.make_optimizer(cfg.optim)
  state, shardings = state_lib.create_train_state(model, tx, mesh, cfg.sharding, jax.random.key(0))
  before = jax.device_get(state)
  train_step = step_lib.make_train_step(step_lib.sfd_loss_fn(model, cfg), tx, cfg, mesh, shardings)
  after, metrics = train_step(state, shd.shard_batch(mesh, batch))
  return before, jax.device_get(after), jax.device_get(metrics)


@pytest.fixture(scope="module")
def one_step():
  cfg = tiny_config(ema_decay=0.5)
  return _run_one_step(cfg, tiny_batch(cfg))


def test_ema_follows_the_formula(one_step):
  before, after, metrics = one_step
  assert metrics["finite"] and after.step == 1
  jax.tree.map(lambda e0, p0: np.testing.assert_array_equal(e0, p0), before.ema_params, before.params)
  jax.tree.map(lambda e, e0, p: np.testing.assert_allclose(e, 0.5 * e0 + 0.5 * p, rtol=1e-6, atol=1e-7),
               after.ema_params, before.ema_params, after.params)
  assert metrics["lr"] == pytest.approx(1e-4)
  assert metrics["grad_norm"] > 0 and metrics["update_norm"] > 0


def test_accumulation_equals_whole_batch_and_zero_decay_copies(one_step):
  _, whole, whole_metrics = one_step
  cfg = tiny_config(ema_decay=0.0, grad_accum_steps=4)
  _, accumulated, metrics = _run_one_step(cfg, tiny_batch(cfg))
  for key in ("loss", "loss_mse", "loss_cos", "loss_repa", "grad_norm"):
    np.testing.assert_allclose(metrics[key], whole_metrics[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), accumulated.params, whole.params)
  jax.tree.map(np.testing.assert_array_equal, accumulated.ema_params, accumulated.params)


def test_non_finite_loss_skips_the_update():
  cfg = tiny_config(ema_decay=0.5)
  batch = tiny_batch(cfg)
  batch["x"][3, 0, 0, 0] = np.nan
  before, after, metrics = _run_one_step(cfg, batch)
  assert not metrics["finite"] and after.step == 1 and metrics["update_norm"] == 0
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)


def test_schedules():
  cfg = config_lib.base_config().optim
  cfg.update(lr=5e-5, warmup_steps=500, schedule="cosine", constant_steps=1000, decay_steps=2000, end_lr=5e-6)
  lr = state_lib.lr_schedule(cfg)
  np.testing.assert_allclose([lr(0), lr(250), lr(500), lr(1499), lr(2500), lr(3500), lr(10 ** 6)],
                             [0, 2.5e-5, 5e-5, 5e-5, 2.75e-5, 5e-6, 5e-6], rtol=1e-5, atol=1e-12)
  clipped = config_lib.base_config().optim
  clipped.max_grad_norm = 1.0
  tx = state_lib.make_optimizer(clipped)
  zeros = {"w": np.zeros(4, np.float32)}
  updates, _ = tx.update({"w": np.full(4, 100.0, np.float32)}, tx.init(zeros), zeros)
  assert optax.tree.norm(updates) < 1e-3


def test_impossible_layouts_name_the_fix():
  with pytest.raises(shd.ShardingError, match="mesh.data and mesh.fsdp"):
    shd.make_mesh(data=2, fsdp=3)
  cfg = tiny_config(batch_size=6, grad_accum_steps=4)
  model = config_lib.build_model(cfg.model)
  tx = state_lib.make_optimizer(cfg.optim)
  mesh = shd.make_mesh()
  with pytest.raises(shd.ShardingError, match="grad_accum_steps"):
    step_lib.make_train_step(step_lib.sfd_loss_fn(model, cfg), tx, cfg, mesh, None)


_env = subprocess_env


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  """3 steps on one device and on 8 fake devices as 4×2, 2×4, and on 4 devices as 2×2, in one subprocess."""
  out = tmp_path_factory.mktemp("steps") / "steps.npz"
  subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--meshes", "1x1,4x2,2x4,2x2"], env=_env(8),
                 check=True, timeout=600)
  return np.load(out)


def _params(results, mesh):
  return {k[len(mesh) + 1:]: results[k] for k in results.files if k.startswith(mesh + "/") and "spec/" not in k}


def test_sharded_meshes_match_one_device(eight_devices):
  single = _params(eight_devices, "1x1")
  for mesh in ("4x2", "2x4"):
    sharded = _params(eight_devices, mesh)
    for key, value in single.items():
      np.testing.assert_allclose(sharded[key], value, atol=1e-5, rtol=0, err_msg=f"{mesh} {key}")
    # The rules: matrices over 'fsdp' along their largest dimension (never the stacked layer axis of the scanned
    # blocks), vectors replicated; Adam moments alike.
    spec = lambda kind, path: str(eight_devices[f"{mesh}/{kind}/{path}"])
    assert spec("spec", "blocks/mlp/w12/kernel") == "P(None, None, 'fsdp')"
    assert spec("spec", "blocks/attn/proj/kernel") in ("P(None, 'fsdp', None)", "P(None, None, 'fsdp')")
    assert spec("spec", "blocks/mlp/w12/bias") == "P()"
    assert spec("mu_spec", "blocks/mlp/w12/kernel") == "P(None, None, 'fsdp')"
    assert spec("spec", "final_layer/linear/kernel") in ("P('fsdp', None)", "P(None, 'fsdp')")


def test_two_processes_match_one(eight_devices, tmp_path):
  """Two jax.distributed CPU processes with 2 devices each = one process with 4 devices (mesh 2×2)."""
  port, out = free_port(), tmp_path / "two.npz"
  workers = [subprocess.Popen([sys.executable, SCRIPT, "--out", str(out), "--meshes", "2x2", "--process", str(i),
                               "--num_processes", "2", "--port", str(port)], env=_env(2),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for worker in workers:
    _, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err[-3000:]
  two, one = _params(np.load(out), "2x2"), _params(eight_devices, "2x2")
  for key, value in one.items():
    np.testing.assert_allclose(two[key], value, atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.parametrize("policy, mesh_shape, kept", [("dots_saveable", (2, 4), True), ("full", (2, 4), False),
                                                      ("dots_saveable", (8, 1), False)])
def test_remat_keeps_the_gathered_weights_for_the_backward_pass(policy, mesh_shape, kept, capsys):
  """Under an FSDP mesh, each layer's attention and MLP kernels are gathered once, in the compute dtype; the dots
  policies save them for the backward pass (which then gathers nothing again), `full` saves none of them; with
  fsdp 1 there is nothing to gather, and nothing is kept."""
  cfg = tiny_config()
  cfg.model.update(dtype="bfloat16", remat_policy=policy)
  model = config_lib.build_model(cfg.model)
  params = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
  x, t, _, y = model.dummy_inputs(8)
  loss = lambda p: model.apply({"params": p}, x, t, t, y).sum()
  mesh = jax.sharding.AbstractMesh(mesh_shape, shd.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.sharding.use_abstract_mesh(mesh):
    jax.ad_checkpoint.print_saved_residuals(loss, params)
  saved = set(re.findall(r"^(\w+\[[\d,]*\])", capsys.readouterr().out, flags=re.M))  # 'bf16[2,32,96] from ...'
  kernels = {f"bf16[{','.join(map(str, leaf.shape))}]" for name, block in params["blocks"].items()
             if name in ("attn", "mlp") for leaf in jax.tree.leaves(block) if leaf.ndim == 3}
  saved_kernels = saved & kernels
  assert len(kernels) == 4  # qkv, proj, w12, w3
  assert saved_kernels == (kernels if kept else set())


def test_both_ways_of_skipping_agree():
  """The select (accelerators) and the `lax.cond` (CPUs) around the update: the same update where the gradients are
  finite, the state unchanged where they are not."""
  cfg = tiny_config(ema_decay=0.5)
  model = config_lib.build_model(cfg.model)
  tx = state_lib.make_optimizer(cfg.optim)
  state, _ = state_lib.create_train_state(model, tx, shd.make_mesh(), cfg.sharding, jax.random.key(0))
  grads = jax.tree.map(lambda p: jax.numpy.full_like(p, 0.01), state.params)
  for loss in (1.0, float("nan")):
    results = [jax.device_get(jax.jit(lambda s, g: step_lib.apply_gradients(
        s, g, {"loss": jax.numpy.float32(loss)}, tx=tx, cfg=cfg, skip_with_cond=cond))(state, grads))
        for cond in (False, True)]
    jax.tree.map(np.testing.assert_array_equal, results[0], results[1])
    if loss != loss:
      jax.tree.map(np.testing.assert_array_equal, results[0][0].params, jax.device_get(state.params))
      assert results[0][1]["update_norm"] == 0 and results[0][0].step == 1
