"""Orbax checkpoints of a training run: {train state, this host's data-iterator state, config}, async.

`Checkpointer.restore_latest` takes the newest checkpoint that restores cleanly: an unfinished one (orbax never
lists a step whose write did not complete) or a corrupt one (restoring it raises) is skipped with a warning and
left on disk. The state is restored straight onto the shardings of the current mesh, whatever mesh wrote it.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from sfd_jax.errors import UserError

ITEMS = ("state", "data", "config")


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


def quiet_closed_event_loops() -> None:
  """After a failed restore, tensorstore completes the reads still in flight on orbax's already-closed asyncio
  loop; each reports `RuntimeError('Event loop is closed')` to `sys.unraisablehook`, hundreds of tracebacks at
  exit that say nothing. Drop exactly those; everything else reaches the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "sfd_jax_quiet", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)
  hook.sfd_jax_quiet = True
  sys.unraisablehook = hook


def _summary(error: BaseException) -> str:
  return f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if str(error) else type(error).__name__


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
        quiet_closed_event_loops()
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
