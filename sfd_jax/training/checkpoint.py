"""Orbax checkpoints of a training run: {train state, config}, async, in a local directory or a gs:// bucket.

`Checkpointer.restore_latest` takes the newest complete checkpoint (orbax never lists a step whose write did not
complete): a damaged one is moved aside and the one before it tried; one that does not fit the run's config is a
user error. The state is restored straight onto the shardings of the current mesh, whatever mesh and number of
processes wrote it.

Every process reads its own shards, so each reaches its own verdict on a checkpoint; what happens next (take it,
move it aside, stop with a sentence) is decided once from every process's verdict, before anything is moved, and
every process then takes the same branch through the same collectives. A read that fails transiently (a flaky
bucket) is retried (`storage.retried`), never taken for damage.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sfd_jax import storage
from sfd_jax.errors import UserError

# The data position is not stored: the input pipeline restarts at the step (`Task.make_data`), whatever the number
# of hosts. Checkpoints of earlier versions hold a "data" item, which is ignored.
ITEMS = ("state", "config")


# A process's verdict on a checkpoint, in order of precedence: the agreed verdict is the highest any process reached.
FITS, MISFIT, DAMAGED, UNREACHABLE, FAILED = range(5)


def _everyone(value: int) -> list[int]:
  """`value` of every process, in process order: a collective that every process reaches at the same point."""
  if jax.process_count() == 1:
    return [value]
  return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(value)))]


def _attempt(read, directory, what: str) -> tuple[int, Any]:
  """(verdict, value or error) of `read()` on this process: FITS and its value; DAMAGED, UNREACHABLE or FAILED
  (a bug) and the error. Transient failures are retried first (`storage.retried`)."""
  try:
    return FITS, storage.retried(read, directory, what)
  except storage.BucketUnreachable as e:
    return UNREACHABLE, e
  except Exception as e:  # orbax and tensorstore raise many types; each is classified, none is lost
    return (DAMAGED if storage.failure_kind(e) == storage.DAMAGED else FAILED), e


def _processes(verdicts: list[int], verdict: int) -> str:
  return ", ".join(str(p) for p, v in enumerate(verdicts) if v == verdict)


def _reason(verdicts: list[int], mine: tuple[int, Any]) -> str:
  """Why a checkpoint counts as damaged, on every process: its own error where it read one, else who did."""
  if mine[0] == DAMAGED:
    return storage.summary(storage.decisive(mine[1]))
  return f"damaged as process {_processes(verdicts, DAMAGED)} reads it"


def _stop(verdicts: list[int], mine: tuple[int, Any], what: str, directory) -> Exception:
  """The exception every process raises when the agreed verdict is UNREACHABLE or FAILED: its own error where it
  failed so, else one that names the processes that did."""
  agreed = max(verdicts)
  if mine[0] == agreed:
    return mine[1]
  if agreed == UNREACHABLE:
    return storage.BucketUnreachable(f"process {_processes(verdicts, agreed)} cannot reach {directory} while {what} "
                                     "(its own error line says why)")
  return RuntimeError(f"process {_processes(verdicts, agreed)} failed while {what} (its log has the traceback)")


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


class Checkpointer:
  """Saves every call to `save` (async), keeps the newest `keep` plus every multiple of `keep_period`."""

  def __init__(self, directory, keep: int = 3, keep_period: int | None = None, use_async: bool = True):
    _quiet_closed_event_loops()
    self.directory = storage.path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None, create=True,
                                           enable_async_checkpointing=use_async)
    handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    try:  # not retried here: orbax meets the other processes at barriers while it opens the directory
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS,
                                           item_handlers=handlers)
    except Exception as e:
      if storage.failure_kind(e) in (storage.TRANSIENT, storage.DENIED):
        raise storage.unreachable(self.directory, e, retried_s=0) from e
      raise

  def save(self, step: int, state, config_json: str) -> None:
    """Starts writing checkpoint `step` (returns before the write finishes unless synchronous)."""
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(json.loads(config_json))}
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    """The complete checkpoints' steps, as this process lists them (transient failures retried)."""
    return storage.retried(self._listed, self.directory, f"listing {self.directory}")

  def _listed(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def _newest(self, below: int | None) -> int | None:
    """The newest step before `below` (any: None) as process 0 lists it, on every process; None when there is
    none. Every process lists too (which reloads its manager), and a failed listing anywhere stops every process."""
    mine = _attempt(lambda: [s for s in self._listed() if below is None or s < below], self.directory,
                    f"listing {self.directory}")
    verdicts = _everyone(mine[0])
    if max(verdicts) != FITS:
      raise _stop(verdicts, mine, f"listing {self.directory}", self.directory)
    newest = _everyone(mine[1][-1] if mine[1] else -1)[0]
    return None if newest < 0 else newest

  def restore_latest(self, abstract_state):
    """(state, step) of the newest checkpoint, or (None, None) when there is none.

    `abstract_state` holds ShapeDtypeStructs with the target shardings (any mesh, any number of processes). A
    damaged checkpoint (missing or corrupt files, as read by any process) is moved to `<step>.unreadable`, never
    deleted, and the one before it is tried; an intact one that does not fit `abstract_state` (another model size,
    another optimiser) is a user error naming what differs, and nothing is moved. A bucket that stays unreachable
    is a user error on every process.
    """
    below = None
    while (step := self._newest(below)) is not None:
      def read():
        differences = self.differences(step, abstract_state)
        return (MISFIT, differences) if differences else (FITS, self.restore(step, abstract_state))
      where = f"checkpoint {step} in {self.directory}"
      mine = _attempt(read, self.directory, f"restoring {where}")
      if mine[0] == FITS:
        mine = mine[1]
      verdicts = _everyone(mine[0])
      agreed = max(verdicts)
      if agreed == FITS:
        return mine[1], step
      if agreed == DAMAGED:
        self._move_aside(step, verdicts, mine)
        below = step
        continue
      if agreed == MISFIT:
        differences = mine[1] if mine[0] == MISFIT else [f"process {_processes(verdicts, MISFIT)} says so"]
        raise UserError(
            f"{where} does not fit this run's config: {'; '.join(differences[:3])}"
            f"{f' (and {len(differences) - 3} more)' if len(differences) > 3 else ''}. Resume with the config it "
            "was written with (its config.json), start a fresh --workdir, or start a fresh --workdir with "
            f"--config.init_from={self.directory.parent} to take its params and EMA only (fine-tuning, another "
            "optimiser)")
      raise _stop(verdicts, mine, f"restoring {where}", self.directory)
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

  def _move_aside(self, step: int, verdicts: list[int], mine: tuple[int, Any]) -> None:
    """Moves damaged checkpoint `step` to `<step>.unreadable` (process 0 renames it; every process reaches the
    same collectives whether the rename works or not)."""
    aside = self.directory / f"{step}.unreadable"
    where = f"checkpoint {step} in {self.directory}"
    if jax.process_index() == 0:
      moved = _attempt(lambda: (self.directory / str(step)).rename(aside), self.directory, f"moving {where} aside")
    else:
      moved = (FITS, None)
    done = _everyone(moved[0])
    if max(done) != FITS:
      raise _stop(done, moved, f"moving {where} aside", self.directory)
    reason = _reason(verdicts, mine)
    logging.warning("%s cannot be restored (%s); moved it to %s (not deleted) and trying an older one", where,
                    reason, aside)

  def restore(self, step: int, abstract_state):
    """The state of checkpoint `step`, read by this process alone: orbax's `CheckpointManager.restore` ends in a
    barrier, which a process whose read failed would never reach (the agreement in `restore_latest` is the
    processes' meeting point)."""
    handler = ocp.StandardCheckpointHandler()
    try:
      return handler.restore(self.directory / str(step) / "state", args=ocp.args.StandardRestore(abstract_state))
    finally:
      handler.close()

  def restore_params(self, step: int, abstract_params, which: str = "ema_params"):
    """Only the EMA params (`which='ema_params'`) or the raw params (`'params'`) of checkpoint `step`, no optimiser
    state read, on the shardings of `abstract_params` (ShapeDtypeStructs; without: the default device). Read by
    this process alone, as `restore`."""
    target = {which: abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    handler = ocp.PyTreeCheckpointHandler()
    try:
      return handler.restore(self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
          target, restore_args=restore_args, partial_restore=True))[which]
    finally:
      handler.close()

  def readable_params(self, model_of: Callable[[dict], Any], step: int | None = None, which: str = "ema_params"):
    """(step, config, params): the `which` params of checkpoint `step`, or of the newest checkpoint that reads.

    `model_of(config)` gives the flax module (with `dummy_inputs`) of a checkpoint's config. A damaged newest
    checkpoint (say, of a killed run) is passed over with a warning; a damaged `step` is a user error. Every
    process takes the same checkpoint (the verdicts are agreed as in `restore_latest`).
    """
    steps = self.steps()
    if not steps:
      raise UserError(f"{self.directory} has no finished checkpoint yet; train first")
    if step is not None and step not in steps:
      raise UserError(f"{self.directory} has no checkpoint {step}; it has {steps}")
    below = None if step is None else step + 1
    while (candidate := self._newest(below)) is not None:
      def read():
        config = self.config(candidate)
        model = model_of(config)
        abstract = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
        return config, self.restore_params(candidate, abstract, which)
      where = f"checkpoint {candidate} in {self.directory}"
      mine = _attempt(read, self.directory, f"reading {where}")
      verdicts = _everyone(mine[0])
      if max(verdicts) == FITS:
        return candidate, *mine[1]
      if max(verdicts) != DAMAGED:
        raise _stop(verdicts, mine, f"reading {where}", self.directory)
      reason = _reason(verdicts, mine)
      if step is not None:
        raise UserError(f"{where} cannot be read ({reason}); choose another step of {steps}, or leave the step out "
                        "for the newest readable one")
      logging.warning("%s cannot be read (%s); trying the one before", where, reason)
      below = candidate
    raise UserError(f"none of the checkpoints {steps} in {self.directory} can be read; they are damaged")

  def config(self, step: int) -> dict:
    handler = ocp.JsonCheckpointHandler()
    try:
      return handler.restore(self.directory / str(step) / "config")
    finally:
      handler.close()

  def reached_preemption(self, step: int) -> bool:
    """True on every host at the same step once the platform announced a preemption (multi-host runs)."""
    return jax.process_count() > 1 and self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.close()
