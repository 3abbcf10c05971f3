"""Orbax checkpoints of a training run: {train state, this host's data-iterator state, config}, async.

`Checkpointer.restore_latest` takes the newest checkpoint that restores cleanly: an unfinished one (orbax never
lists a step whose write did not complete) or a corrupt one (restoring it raises) is skipped with a warning and
left on disk. The state is restored straight onto the shardings of the current mesh, whatever mesh wrote it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config")


class Checkpointer:
  """Saves every call to `save` (async), keeps the newest `keep` plus every multiple of `keep_period`."""

  def __init__(self, directory, keep: int = 3, keep_period: int | None = None, use_async: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None, create=True,
                                           enable_async_checkpointing=use_async)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS,
                                         item_handlers=handlers)

  def save(self, step: int, state, data_iterator, config_json: str) -> None:
    """Starts writing checkpoint `step` (returns before the write finishes unless synchronous)."""
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(json.loads(config_json))}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state, data_iterator):
    """(state, step) of the newest checkpoint that restores, or (None, None) when there is none.

    `abstract_state` holds ShapeDtypeStructs with the target shardings; `data_iterator` is restored in place.
    """
    for step in reversed(self.steps()):
      try:
        return self.restore(step, abstract_state, data_iterator), step
      except Exception as e:  # a corrupt checkpoint raises whatever its damage makes orbax raise
        aside = self.directory / f"{step}.unreadable"
        if jax.process_index() == 0:
          (self.directory / str(step)).rename(aside)
        self.manager.reload()
        logging.warning("checkpoint %d in %s cannot be restored (%s: %s); moved it to %s (not deleted) and trying "
                        "an older one", step, self.directory, type(e).__name__, str(e).splitlines()[0][:300], aside)
    return None, None

  def restore(self, step: int, abstract_state, data_iterator=None):
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

  def restore_params(self, step: int, abstract_params, which: str = "ema_params"):
    """Only the EMA params (`which='ema_params'`) or the raw params (`'params'`) of checkpoint `step`, no optimiser
    state read, on the shardings of `abstract_params` (ShapeDtypeStructs; without: the default device)."""
    reader = ocp.CheckpointManager(self.directory, item_names=("state",),
                                   item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                   options=ocp.CheckpointManagerOptions(create=False))
    target = {which: abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
    return reader.restore(step, args=ocp.args.Composite(state=args))["state"][which]

  def model_params(self, model, step: int | None = None, which: str = "ema_params"):
    """`which` params of checkpoint `step` (default: the newest) for `model`, a flax module with `dummy_inputs`."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
    return self.restore_params(self.existing_step(step), abstract, which)

  def existing_step(self, step: int | None = None) -> int:
    """`step`, or the newest one when None; a FileNotFoundError when the checkpoint does not exist."""
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f"{self.directory} has no finished checkpoint yet; train first")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{self.directory} has no checkpoint {step}; it has {steps}")
    return steps[-1] if step is None else step

  def config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def reached_preemption(self, step: int) -> bool:
    """True on every host at the same step once the platform announced a preemption (multi-host runs)."""
    return jax.process_count() > 1 and self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.close()
