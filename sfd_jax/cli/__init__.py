"""Thin entry points (absl flags + ml_collections configs); the logic lives in the library.

A command started as `python -m sfd_jax.cli.<name>` imports this package first, before the seconds of heavy imports
(JAX, Flax, orbax) that precede `common.run`: a SIGTERM in that window is a preemption too (its message, exit
status 75), not a silent 143. `common.run` then installs the handler of the rest of the run.
"""
import signal
import sys

from sfd_jax.errors import EXIT_PREEMPTED

SIGTERM_MESSAGE = "preempted: stopped by SIGTERM: run the same command again to resume"


def _preempted_while_importing(signum, frame):
  del signum, frame
  print(SIGTERM_MESSAGE, file=sys.stderr, flush=True)
  sys.exit(EXIT_PREEMPTED)  # nothing is written before common.run: the imports just stop


# sys.argv[0] is "-m" while `python -m` imports the packages of the module it runs (and only then): a command
# starting, not a library user (a notebook, the tests) importing a command's helpers.
if sys.argv[:1] == ["-m"] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
  signal.signal(signal.SIGTERM, _preempted_while_importing)
