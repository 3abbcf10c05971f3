"""The training loop shared by the SFD DiT and the SemVAE: data → step → metrics → checkpoints → samples.

A run is a pure function of (config, seed, data): the step's randomness comes from the state's rng folded with
the step, the data order from the seeded pipeline whose position is checkpointed, so a run that is stopped
(SIGTERM, preemption) and restarted continues bit-identically. It resumes from the newest complete checkpoint
in `<workdir>/checkpoints`; a stop request saves, waits until the checkpoint is complete and raises `Preempted`; a
non-finite loss never reaches the weights and, with `nan_policy='stop'`, ends the run with a message naming the
step and the last good checkpoint, saving nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from sfd_jax import sharding as shd, storage
from sfd_jax.console import say
from sfd_jax.errors import Preempted, UserError
from sfd_jax.training import (
  checkpoint as ckpt_lib,
  config as config_lib,
  metrics as metrics_lib,
  state as state_lib,
  step as step_lib,
)


class NonFiniteLossError(UserError):
  """The loss or the gradient became NaN/Inf (with nan_policy='stop')."""


@dataclasses.dataclass
class Task:
  """What the loop trains: a model, its objective, its data, and an optional periodic hook."""
  model: Any                                  # flax module with `dummy_inputs()`
  loss_fn: Callable                           # (params, batch, rng, positions) -> (loss, metrics)
  make_data: Callable[..., Iterator]          # (rows, start_step) -> iterator of this host's rows (host_rows)
  flops_per_sample: float = 0.0               # model FLOPs of one training sample (for MFU)
  periodic: Callable | None = None            # (state, step, writer) -> None, every cfg.sample_every steps
  dataset_size: int = 0                       # training examples, for epochs = step × batch_size / dataset_size
  evaluate: Any = None                        # a training.evaluation.Evaluation: metrics every cfg.eval_every steps
  # Device-side work on each global batch before the step, e.g. a frozen encoder computing its features
  # (jitted by the task; it must not depend on the step, so runs stay reproducible).
  preprocess: Callable | None = None
  # Once, on the first batch before the first step: (params, device batch, mesh) -> None, e.g. the comparison of an
  # attention kernel with XLA's attention (raises to stop the run).
  check_kernels: Callable | None = None


class _StopRequest:
  """SIGTERM (or SIGINT) asks a one-process run to finish its step, save, and exit cleanly. Once a signal came,
  later ones (during the last save, a second notice) are only noted, and after the loop ignored, so none can cut
  the checkpoint or the exit short. Before and after the loop the command line's handling applies (`cli.common.run`:
  a SIGTERM ends the process at once with the preemption exit status).

  A multi-process run leaves the signals to JAX's preemption service (started by jax.distributed), whose handler
  makes every process stop at the same step (`Checkpointer.reached_preemption`); a Python handler would replace it.
  """

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if not self.requested:  # once: a supervisor may repeat the signal many times a second
      logging.warning("received signal %d: finishing the current step and its checkpoint, then stopping", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      # Once stopping, later signals are ignored: the checkpoint is complete and the process is on its way out
      # (Python's own teardown would put back the default handlers, which kill).
      signal.signal(sig, signal.SIG_IGN if self.requested else handler)


def _device_batch(mesh, batch):
  return shd.shard_batch(mesh, {k: v for k, v in batch.items() if k != "index"})


def run(cfg, workdir, task: Task) -> dict:
  """Trains until `cfg.total_steps`; returns the last logged scalars. Raises `Preempted` after a stop signal or a
  preemption notice, once the checkpoint of the step reached is complete."""
  config_lib.check_values(cfg)
  workdir = storage.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    storage.write_text(workdir / "config.json", cfg.to_json_best_effort(indent=1))
  mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  shd.check_batch_size(mesh, cfg.batch_size)
  say(f"devices: {jax.device_count()} × {jax.devices()[0].device_kind} in {jax.process_count()} process(es), mesh "
      f"data {mesh.shape['data']} × fsdp {mesh.shape['fsdp']}")
  tx = state_lib.make_optimizer(cfg.optim)
  schedule = state_lib.learned_schedule(cfg)  # a learned schedule's parameters live in the state
  abstract, shardings = state_lib.abstract_train_state(task.model, tx, mesh, cfg.sharding, schedule)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", cfg.keep_checkpoints, cfg.keep_period)
  state, step = checkpointer.restore_latest(abstract)
  missed = state is not None and task.evaluate is not None and task.evaluate.missed(workdir, step)
  if state is None:
    state, _ = state_lib.create_train_state(task.model, tx, mesh, cfg.sharding, jax.random.key(cfg.seed), schedule)
    step = 0
    if cfg.init_from:
      state = _init_from(cfg.init_from, state, abstract)
    say(f"new run in {workdir}" + (f", params and EMA from {cfg.init_from}" if cfg.init_from else ""))
  elif step >= cfg.total_steps and not missed:
    checkpointer.close()
    say(f"already at total_steps={cfg.total_steps} (checkpoint {step} in {checkpointer.directory}): nothing to do")
    return {}
  else:
    say(f"resumed from step {step} of {checkpointer.directory}")
  writer = metrics_lib.MetricWriter(workdir, resume_step=step)
  if jax.process_index() == 0:
    from clu import parameter_overview
    say(f"model: {parameter_overview.count_parameters(state.params):,} parameters; training to step {cfg.total_steps}")
    logging.info("model parameters:\n%s", parameter_overview.get_parameter_overview(state.params, include_stats=False))
  writer.write_hparams(cfg.to_dict(), ("loss", *(task.evaluate.tags if task.evaluate is not None else ())))
  if missed:
    say(f"the evaluation of step {step} was interrupted before it was logged: evaluating again")
    task.evaluate(state, step, writer)
  data = task.make_data(shd.host_rows(mesh, cfg.batch_size), step)
  train_step = step_lib.make_train_step(task.loss_fn, tx, cfg, mesh, shardings)
  config_json = cfg.to_json_best_effort()
  last_saved = step if step else None
  window, window_start, scalars, timing = [], (step, time.perf_counter()), {}, False
  kernels_checked = task.check_kernels is None

  def save(at):
    nonlocal last_saved
    checkpointer.save(at, state, config_json)
    writer.flush()
    last_saved = at

  with _StopRequest() as stop:
    try:
      while step < cfg.total_steps:
        batch = _device_batch(mesh, next(data))
        if task.preprocess is not None:
          batch = task.preprocess(batch)
        if not kernels_checked:
          task.check_kernels(state.params, batch, mesh)
          kernels_checked = True
        state, metrics = train_step(state, batch)
        step += 1
        window.append(metrics)
        if not timing:  # this process's first step compiled the step function: time from its end
          jax.block_until_ready(metrics)
          window_start, timing = (step, time.perf_counter()), True
        stopping = stop.requested or checkpointer.reached_preemption(step)
        end = step == cfg.total_steps or stopping
        if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or end:
          window = jax.device_get(window)
          _check_finite(window, step - len(window) + 1, cfg.nan_policy, last_saved, checkpointer.directory)
          scalars = _scalars(window, window_start, step, cfg, task, mesh)
          writer.write_scalars(step, scalars)
          say(metrics_lib.progress_line(step, cfg.total_steps, scalars))
          window, window_start = [], (step, time.perf_counter())
        if step % cfg.ckpt_every == 0 or end:
          save(step)
        hooks_start = time.perf_counter()
        if (task.periodic is not None and cfg.sample_every and not stopping
            and (step % cfg.sample_every == 0 or step == cfg.total_steps)):
          task.periodic(state, step, writer)
        if task.evaluate is not None and not stopping and task.evaluate.due(step):
          task.evaluate(state, step, writer)
        window_start = (window_start[0], window_start[1] + time.perf_counter() - hooks_start)  # not training time
        if end:
          break
    finally:
      checkpointer.wait()  # still under the signal handler: a SIGTERM now cannot cut the last checkpoint short
      checkpointer.close()
      writer.close()
  if step < cfg.total_steps or stop.requested:
    raise Preempted(f"stopped at step {step} of {cfg.total_steps}; checkpoint {step} is complete in "
                    f"{checkpointer.directory}: run the same command again to resume")
  say(f"done: step {step}, checkpoint in {checkpointer.directory}")
  return scalars


def _init_from(source, state, abstract):
  """`state` with the params and EMA params of the newest readable checkpoint of the run in `source` (a workdir):
  a new run that starts from trained weights with a fresh optimiser (fine-tuning, another optimiser)."""
  checkpointer = ckpt_lib.Checkpointer(storage.path(source) / "checkpoints")
  try:
    steps = checkpointer.steps()
    if not steps:
      raise UserError(f"config.init_from={source} has no finished checkpoint; give a training workdir")
    loaded = {which: checkpointer.restore_params(steps[-1], getattr(abstract, which), which)
              for which in ("params", "ema_params")}
  except ValueError as e:  # orbax: the stored tree has other leaves or shapes
    raise UserError(f"config.init_from={source}: checkpoint {steps[-1]} does not hold this model's params "
                    f"({str(e).splitlines()[0][:300]})") from None
  finally:
    checkpointer.close()
  logging.info("params and EMA params from checkpoint %d of %s", steps[-1], source)
  return state.replace(**loaded)


def _check_finite(window, first_step, policy, last_saved, directory):
  bad = [first_step + i for i, m in enumerate(window) if not bool(m["finite"])]
  if not bad:
    return
  where = f"checkpoint {last_saved} in {directory}" if last_saved is not None else "none (no checkpoint yet)"
  message = (f"non-finite loss or gradient at step {bad[0]} (steps {bad[:5]} in this window); the update was "
             f"skipped and nothing was saved; last good checkpoint: {where}")
  if policy == "stop":
    raise NonFiniteLossError(message)
  logging.warning("%s; nan_policy='skip' goes on", message)


def _scalars(window, window_start, step, cfg, task, mesh) -> dict:
  finite = [m for m in window if bool(m["finite"])] or window
  scalars = metrics_lib.average([{k: v for k, v in m.items() if k != "finite"} for m in finite])
  scalars["skipped_steps"] = float(sum(not bool(m["finite"]) for m in window))
  seconds = time.perf_counter() - window_start[1]
  steps_per_s = (step - window_start[0]) / seconds if step > window_start[0] else 0.0
  scalars.update(steps_per_s=steps_per_s, images_per_s=steps_per_s * cfg.batch_size,
                 eta_s=(cfg.total_steps - step) / max(steps_per_s, 1e-9))
  if task.dataset_size:
    scalars["epoch"] = step * cfg.batch_size / task.dataset_size
  mfu = metrics_lib.mfu(3 * task.flops_per_sample * cfg.batch_size, 1 / max(steps_per_s, 1e-9), mesh.devices.size)
  if mfu is not None and steps_per_s:
    scalars["mfu"] = mfu
  return scalars
