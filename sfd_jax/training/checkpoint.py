"""Orbax checkpoints of a training run: {train state, config}, async, in a local directory or a gs:// bucket.

`Checkpointer.restore_latest` takes the newest complete checkpoint (orbax never lists a step whose write did not
complete): a damaged one is moved aside and the one before it tried; one that does not fit the run's config is a
user error. The state is restored straight onto the shardings of the current mesh, whatever mesh and number of
processes wrote it.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sfd_jax import storage
from sfd_jax.errors import UserError

# The data position is not stored: the input pipeline restarts at the step (`Task.make_data`), whatever the number
# of hosts. Checkpoints of earlier versions hold a "data" item, which is ignored.
ITEMS = ("state", "config")


# tensorstore reports missing or damaged data as a ValueError whose message starts with one of these status codes.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND", "UNKNOWN")


def is_unreadable(error: BaseException) -> bool:
  """Whether a restore failed because the checkpoint's files are missing or damaged (an I/O error, truncated or
  corrupt data or metadata), as opposed to an intact checkpoint that does not fit what was asked of it."""
  while error is not None:
    if isinstance(error, (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError)):
      return True
    if isinstance(error, ValueError) and str(error).startswith(_DAMAGE_CODES):
      return True
    error = error.__cause__ or error.__context__
  return False


def _quiet_closed_event_loops() -> None:
  """When a restore fails, tensorstore completes the reads still in flight on orbax's already-closed asyncio
  loop; each reports `RuntimeError('Event loop is closed')` to `sys.unraisablehook`, hundreds of tracebacks that
  say nothing, some before the failure reaches us. Drop exactly those (installed before any restore); everything
  else reaches the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "sfd_jax_quiet", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)
  hook.sfd_jax_quiet = True
  sys.unraisablehook = hook


def _shape(leaf) -> str:
  """'(3, 4) float32' of an array, ShapeDtypeStruct or orbax ArrayMetadata; the type name of anything else."""
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    return f"{tuple(leaf.shape)} {jnp.dtype(leaf.dtype).name}"
  return type(leaf).__name__


def _summary(error: BaseException) -> str:
  return f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if str(error) else type(error).__name__


class Checkpointer:
  """Saves every call to `save` (async), keeps the newest `keep` plus every multiple of `keep_period`."""

  def __init__(self, directory, keep: int = 3, keep_period: int | None = None, use_async: bool = True):
    _quiet_closed_event_loops()
    self.directory = storage.path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None, create=True,
                                           enable_async_checkpointing=use_async)
    handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS,
                                         item_handlers=handlers)

  def save(self, step: int, state, config_json: str) -> None:
    """Starts writing checkpoint `step` (returns before the write finishes unless synchronous)."""
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(json.loads(config_json))}
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state):
    """(state, step) of the newest checkpoint, or (None, None) when there is none.

    `abstract_state` holds ShapeDtypeStructs with the target shardings (any mesh, any number of processes). A
    damaged checkpoint (missing or corrupt files) is moved to `<step>.unreadable`, never deleted, and the one
    before it is tried; an intact one that does not fit `abstract_state` (another model size, another optimiser)
    is a user error naming what differs, and nothing is moved.
    """
    for step in reversed(self.steps()):
      try:
        differences = self.differences(step, abstract_state)
        if not differences:
          return self.restore(step, abstract_state), step
      except Exception as e:  # orbax and tensorstore raise many types; only damage is handled here
        if not is_unreadable(e):
          raise
        self._move_aside(step, e)
        continue
      raise UserError(
          f"checkpoint {step} in {self.directory} does not fit this run's config: {'; '.join(differences[:3])}"
          f"{f' (and {len(differences) - 3} more)' if len(differences) > 3 else ''}. Resume with the config it was "
          "written with (its config.json), start a fresh --workdir, or start a fresh --workdir with "
          f"--config.init_from={self.directory.parent} to take its params and EMA only (fine-tuning, another "
          "optimiser)")
    return None, None

  def differences(self, step: int, abstract_state) -> list[str]:
    """How checkpoint `step`'s state differs from `abstract_state`: leaves missing, extra, or of another shape or
    dtype ('' paths as in the checkpoint). Reads only the checkpoint's metadata."""
    stored = ocp.tree.to_flat_dict(self.manager.item_metadata(step)["state"], sep="/")
    wanted = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True), sep="/")
    out = [f"it has {k} {_shape(stored[k])}, this config has none" for k in sorted(set(stored) - set(wanted))]
    out += [f"this config has {k} {_shape(wanted[k])}, it has none" for k in sorted(set(wanted) - set(stored))]
    out += [f"{k} is {_shape(stored[k])} in it, {_shape(wanted[k])} here" for k in sorted(set(stored) & set(wanted))
            if _shape(stored[k]) != _shape(wanted[k])]
    return out

  def _move_aside(self, step: int, error: BaseException) -> None:
    aside = self.directory / f"{step}.unreadable"
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"sfd_jax: checkpoint {step} moved aside")
    self.manager.reload()
    logging.warning("checkpoint %d in %s cannot be restored (%s); moved it to %s (not deleted) and trying an older "
                    "one", step, self.directory, _summary(error), aside)

  def restore(self, step: int, abstract_state):
    return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
        "state"]

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

  def readable_params(self, model_of: Callable[[dict], Any], step: int | None = None, which: str = "ema_params"):
    """(step, config, params): the `which` params of checkpoint `step`, or of the newest checkpoint that reads.

    `model_of(config)` gives the flax module (with `dummy_inputs`) of a checkpoint's config. A damaged newest
    checkpoint (say, of a killed run) is passed over with a warning; a damaged `step` is a user error.
    """
    steps = self.steps()
    if not steps:
      raise UserError(f"{self.directory} has no finished checkpoint yet; train first")
    if step is not None and step not in steps:
      raise UserError(f"{self.directory} has no checkpoint {step}; it has {steps}")
    for candidate in [step] if step is not None else reversed(steps):
      try:
        config = self.config(candidate)
        model = model_of(config)
        abstract = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
        return candidate, config, self.restore_params(candidate, abstract, which)
      except Exception as e:
        if not is_unreadable(e):
          raise
        if step is not None:
          raise UserError(f"checkpoint {step} in {self.directory} cannot be read ({_summary(e)}); choose another "
                          f"step of {steps}, or leave the step out for the newest readable one") from None
        logging.warning("checkpoint %d in %s cannot be read (%s); trying the one before", candidate, self.directory,
                        _summary(e))
    raise UserError(f"none of the checkpoints {steps} in {self.directory} can be read; they are damaged")

  def config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def reached_preemption(self, step: int) -> bool:
    """True on every host at the same step once the platform announced a preemption (multi-host runs)."""
    return jax.process_count() > 1 and self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.close()
