"""What every entry point shares: bad input ends in one clear sentence, not a traceback."""
from __future__ import annotations

import functools
import logging
import os
import re
import sys

import jax
from absl import flags

from sfd_jax.convert.io import ConversionError
from sfd_jax.data.latents import DatasetError
from sfd_jax.sharding import ShardingError
from sfd_jax.training.loop import NonFiniteLossError

flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-process runs outside a TPU pod.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")

# Errors that mean "the input is wrong" (their message says what to change); anything else is a bug and keeps
# its traceback.
USER_ERRORS = (ConversionError, ShardingError, DatasetError, NonFiniteLossError, FileNotFoundError, FileExistsError,
               ValueError, KeyError)


def parse_flags(argv):
  """absl `flags_parser` for `app.run`: a bad flag or config override (e.g. a typo in --config.optim.lrr) ends
  in one sentence naming it instead of a traceback."""
  try:
    remaining = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip().strip("'").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    print(f"error: bad command line: {message}", file=sys.stderr)
    sys.exit(2)
  for name, value in _url_values(flags.FLAGS):
    print(f"error: --{name}={value} is a URL; sfd_jax reads and writes filesystem paths: mount the bucket (e.g. "
          f"`gcsfuse --implicit-dirs BUCKET /gcs/BUCKET`, as launch/tpu_pod.sh does) and pass the mounted path",
          file=sys.stderr)
    sys.exit(2)
  return remaining


def _url_values(flag_values):
  """(name, value) of every flag, or config field under a config flag, whose value is a URL such as gs://..."""
  def walk(name, value):
    if hasattr(value, "to_dict"):
      value = value.to_dict()
    if isinstance(value, dict):
      for key, item in value.items():
        yield from walk(f"{name}.{key}", item)
    elif isinstance(value, (list, tuple)):
      for item in value:
        yield from walk(name, item)
    elif isinstance(value, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value):
      yield name, value
  for name in flag_values:
    yield from walk(name, flag_values[name].value)


def user_errors_exit(main):
  """Wraps an absl `main`: a user error prints `error: <message>` to stderr and exits with status 2."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      message = e.args[0] if isinstance(e, KeyError) and e.args else e
      print(f"error: {message}", file=sys.stderr)
      sys.exit(2)
  return wrapped


def start_process():
  """Info-level logging, and jax.distributed for multi-process runs: from the --coordinator flags, or on a
  multi-host TPU/cluster platform."""
  logging.getLogger().setLevel(logging.INFO)
  f = flags.FLAGS
  if f.coordinator:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f.coordinator, f.num_processes, f.process_id)
  elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS")):
    if os.environ.get("TPU_WORKER_HOSTNAMES", "localhost") != "localhost" or "SLURM_NTASKS" in os.environ:
      jax.distributed.initialize()
