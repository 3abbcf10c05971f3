"""What every command line shares: flag parsing, logging, cluster start-up, and how a run ends.

`run(main)` replaces `app.run(main)`. A user error (`sfd_jax.errors.UserError`: a bad flag, config value or file)
ends in one `error: ...` line and exit status 2; a preempted run exits 75 once its checkpoint is complete (run the
same command again to resume), and so does a SIGTERM at any other time (start-up, restore: a preemption too);
anything else is a bug in sfd_jax and keeps its traceback, with a one-line summary last (exit 1). The terminal
shows stage lines, progress and results (`sfd_jax.console.say`) and warnings; library INFO logs go to
`<run directory>/logs/<command>.log` unless `--verbosity` is given, which shows them as well. Nothing is written
before the inputs are found: a missing input file, config file or an unusable run directory is one sentence.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from sfd_jax import storage
from sfd_jax.cli import SIGTERM_MESSAGE
from sfd_jax.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError

flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-process runs outside a TPU pod.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).", lower_bound=1)
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).", lower_bound=0)

HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")
DEFAULT_CACHE = Path.home() / ".cache" / "sfd_jax" / "xla"


def run(main: Callable, *, log_dir: Callable[[], str | None] | None = None, inputs: tuple[str, ...] = (),
        distributed: bool = False, positional: bool = False) -> None:
  """Runs an absl `main` as every sfd_jax command runs (see the module docstring).

  `log_dir` returns the directory (from the parsed flags) whose `logs/` gets the library log, or None for none;
  `inputs` names the flags whose paths must exist (checked before anything is written);
  `distributed` starts jax.distributed on a multi-process cluster (for the commands every host runs);
  `positional`: the command takes arguments besides its flags (`cli.plot`'s run directories).
  """
  def wrapped(argv):
    try:
      if len(argv) > 1 and not positional:
        raise UserError(f"unexpected arguments {argv[1:]}: every input is a --flag (see --help)")
      _quiet_terminal()
      started = start_distributed() if distributed else None
      storage.check_reachable(*(value for _, value in _url_values(flags.FLAGS)))  # before the first bucket access
      check_inputs_exist(inputs)
      _log_to_file(log_dir() if log_dir else None)
      if started:
        logging.info("%s", started)
      _enable_compilation_cache()
      return main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(EXIT_USER_ERROR)
    except Preempted as e:
      print(f"preempted: {e}", file=sys.stderr, flush=True)
      sys.exit(EXIT_PREEMPTED)
    except Exception as e:  # a bug: the traceback, then what happened in one line
      traceback.print_exc()
      summary = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      print(f"error: {type(e).__name__}: {summary} (a bug in sfd_jax, not in your input: the traceback above shows "
            "where; please report it)", file=sys.stderr, flush=True)
      sys.exit(1)
  signal.signal(signal.SIGTERM, _stop_on_sigterm)
  try:
    app.run(wrapped, flags_parser=parse_flags)
  except _Stopped:
    print(SIGTERM_MESSAGE, file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)


class _Stopped(BaseException):
  """A SIGTERM (a preemption, a supervisor stopping the host) that arrived where nothing handles it in its own way:
  start-up, restore, compilation, sampling. The training loop notes the signal instead, to finish its step and
  checkpoint (`training.loop`), and puts this handling back when it ends. A BaseException, so that no `except
  Exception` on the way (a restore that takes a failed read for a damaged checkpoint) mistakes it for an error."""


def _stop_on_sigterm(signum, frame):
  del signum, frame
  raise _Stopped()


def parse_flags(argv):
  """absl `flags_parser`: a bad flag or config override (e.g. a typo in --config.optim.lrr) ends in one sentence
  naming it; --help exits 0."""
  try:
    _check_config_files(argv)
    remaining = flags.FLAGS(argv)
  except SystemExit as e:
    sys.exit(0 if any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]) else e.code)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip().strip("'").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    print(f"error: bad command line: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  for name, value in _url_values(flags.FLAGS):
    if not storage.is_remote(value):
      print(f"error: --{name}={value}: sfd_jax reads and writes local paths and gs://bucket/... paths only",
            file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)
  return remaining


def _check_config_files(argv) -> None:
  """A config file flag (`--config=configs/x.py[:arg]`) names a file that exists; ml_collections would defer its
  failure to the first access, a traceback."""
  for arg, following in zip(argv[1:], [*argv[2:], None]):
    name, has_value, value = arg.lstrip("-").partition("=")
    value = value if has_value else following  # --config=FILE or --config FILE
    if not (arg.startswith("-") and value is not None and name in flags.FLAGS
            and isinstance(flags.FLAGS[name].parser, config_flags.config_flags.ConfigFileFlagParser)):
      continue
    file = value.split(":", 1)[0]
    if not os.path.isfile(file):
      raise UserError(f"--{name}={value}: the config file {file} does not exist{_relative_hint(file)}")


def _relative_hint(path: str) -> str:
  """Where a relative path was looked for, and the path under the repository it may have meant."""
  if storage.is_url(path) or os.path.isabs(path):
    return ""
  hint = f" (relative paths are read from the current directory, {os.getcwd()}"
  in_repository = Path(__file__).resolve().parents[2] / path
  return hint + (f"; did you mean {in_repository}?)" if in_repository.exists() else ")")


def check_inputs_exist(names) -> None:
  """Each flag in `names` that is set names a path (local or gs://) that exists."""
  for name in names:
    value = flags.FLAGS[name].value
    if value and not storage.path(value).exists():
      raise UserError(f"--{name}={value} does not exist{_relative_hint(value)}")


def json_flag(name: str):
  """The parsed JSON value of flag `name` (None when unset); a value that is not JSON is a user error."""
  import json
  value = flags.FLAGS[name].value
  if not value:
    return None
  try:
    return json.loads(value)
  except json.JSONDecodeError as e:
    raise UserError(f"--{name} must be JSON (e.g. --{name}='{{\"depth\": 12}}'), got {value!r}: {e}") from None


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
    elif isinstance(value, str) and storage.is_url(value):
      yield name, value
  for name in flag_values:
    yield from walk(name, flag_values[name].value)


def start_distributed() -> str:
  """jax.distributed when JAX's own cluster detection finds several processes (a Cloud TPU VM slice, GKE,
  multislice, SLURM, Open MPI) or --coordinator is given; a description of what was found."""
  from sfd_jax import cluster
  f = flags.FLAGS
  return cluster.start(f.coordinator, f.num_processes, f.process_id)


def _quiet_terminal() -> None:
  """The terminal shows warnings and errors of the libraries, unless --verbosity was given; INFO still reaches the
  log file."""
  if not flags.FLAGS["verbosity"].present:
    logging.getLogger().setLevel(logging.INFO)
    absl_logging.get_absl_handler().setLevel(logging.WARNING)


def _log_to_file(directory) -> None:
  """Library logs (INFO and up) to `<directory>/logs/<command>.log` (local or in a bucket), one file per process."""
  if directory is None:
    return
  root = logging.getLogger()
  command = Path(getattr(sys.modules["__main__"], "__file__", "sfd_jax")).stem
  suffix = "" if jax.process_index() == 0 else f".process{jax.process_index()}"
  path = make_directory(storage.path(directory) / "logs") / f"{command}{suffix}.log"
  handler = logging.FileHandler(storage.mirrored_file(path))
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"))
  root.addHandler(handler)
  logging.info("command line: %s", " ".join(sys.argv))


def make_directory(path):
  """Creates `path` and its parents; a path that cannot be a directory (under a file, an unwritable or read-only
  directory) is a user error naming why."""
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    reason = e.strerror or str(e)
    if not storage.is_url(str(path)):
      existing = next(p for p in Path(path).parents if p.exists())
      if not existing.is_dir():
        reason = f"{existing} is a file, not a directory"
      elif not os.access(existing, os.W_OK):
        reason = f"{existing} is not writable"
    raise UserError(f"cannot create {path}: {reason}; choose a run directory (--workdir, --out) you can write "
                    "to") from None
  return path


def _enable_compilation_cache() -> None:
  """XLA's persistent compilation cache (`$JAX_COMPILATION_CACHE_DIR`, default ~/.cache/sfd_jax/xla): the second
  run of a command does not compile again. Not on a CPU host with several devices: there an XLA:CPU executable read
  back from the cache can reach its collectives in a different order on each device and deadlock (JAX 0.10, a data
  × fsdp mesh of fake devices), while compiling afresh runs."""
  if jax.default_backend() == "cpu" and jax.local_device_count() > 1:
    jax.config.update("jax_enable_compilation_cache", False)
    logging.info("persistent compilation cache off: %d CPU devices", jax.local_device_count())
    return
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(DEFAULT_CACHE))
