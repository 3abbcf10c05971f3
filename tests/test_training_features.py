"""Documented training features, each through the code that runs it: `nan_policy='skip'` and `keep_period` in the
training loop, `data.num_workers` in the SFD task's data pipeline."""
import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from sfd_jax import sharding as shd
from sfd_jax.training import checkpoint as ckpt_lib, config as config_lib, loop, state as state_lib, tasks
from tests.golden import REPO
from tests.tiny import write_synthetic_latents

POISONED_STEP = 5  # the training step whose batch holds a NaN


class Regression(nn.Module):
  """The smallest model the loop trains: one dense layer."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(x)

  def dummy_inputs(self, batch: int = 1):
    return (jnp.zeros((batch, 8)),)


def _loss_fn(params, batch, rng, positions):
  del rng, positions
  loss = jnp.mean((Regression().apply({"params": params}, batch["x"]) - batch["y"]) ** 2)
  return loss, {"loss": loss}


def _make_data(rows, start_step):
  """Batch s (training step s + 1) from a seed of its own: the same batches whatever step a run resumes at; the
  batch of step `POISONED_STEP` holds a NaN, as a corrupt record would."""
  for s in range(start_step, 10_000):
    rng = np.random.default_rng(s)
    x = rng.normal(size=(4, 8)).astype(np.float32)
    if s + 1 == POISONED_STEP:
      x[1, 3] = np.nan
    yield {"x": x[rows], "y": rng.normal(size=(4, 4)).astype(np.float32)[rows]}


def test_skip_policy_and_keep_period(tmp_path):
  """nan_policy='skip': the NaN step leaves params, EMA and optimiser state as they were, is counted in
  `skipped_steps`, and the run goes on to its end; keep_period=2 with keep_checkpoints=2 keeps the newest two
  checkpoints and every even step: of 1..5, checkpoints 2, 4 and 5."""
  cfg = config_lib.base_config()
  cfg.update(seed=0, batch_size=4, total_steps=5, log_every=1, ckpt_every=1, keep_checkpoints=2, keep_period=2,
             sample_every=0, nan_policy="skip")
  cfg.optim.update(lr=1e-2, warmup_steps=0)
  loop.run(cfg, tmp_path, loop.Task(model=Regression(), loss_fn=_loss_fn, make_data=_make_data))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["skipped_steps"]) for r in records if "skipped_steps" in r] == [
      (1, 0.0), (2, 0.0), (3, 0.0), (4, 0.0), (5, 1.0)]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 5]
  tx = state_lib.make_optimizer(cfg.optim)
  abstract, _ = state_lib.abstract_train_state(Regression(), tx, shd.make_mesh(devices=jax.devices()[:1]),
                                               cfg.sharding)
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  states = {step: jax.device_get(checkpointer.restore(step, abstract)) for step in (2, 4, 5)}
  checkpointer.close()
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  for part in ("params", "ema_params", "opt_state"):
    assert same(getattr(states[5], part), getattr(states[4], part)), part
  assert not same(states[4].params, states[2].params)  # the steps before did train
  assert int(states[5].step) == 5


def test_data_workers_give_the_batches_of_the_training_process(tmp_path):
  """data.num_workers > 0 (grain worker processes) reads the same batches, in the same order and from any start
  step, as reading in the training process."""
  write_synthetic_latents(tmp_path / "data")
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; outside absl.app.run nothing parsed them
  spec_ = importlib.util.spec_from_file_location("smoke", REPO / "configs" / "smoke.py")
  smoke = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(smoke)

  def batches(num_workers, start_step, count):
    cfg = smoke.get_config()
    cfg.data.update(source="latents", path=str(tmp_path / "data"), num_workers=num_workers)
    data = tasks.sfd_task(cfg).make_data(np.arange(cfg.batch_size), start_step)
    return [next(data) for _ in range(count)]

  reference = batches(0, 0, 4)
  assert not np.array_equal(reference[1]["x"], reference[2]["x"])  # steps differ: the comparison below can fail
  workers = batches(2, 1, 3)  # two workers, each batch from one of them in turn; a run resumed at step 1
  for got, want in zip(workers, reference[1:], strict=True):
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
