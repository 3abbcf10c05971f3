"""What the person at the terminal sees: stage lines, progress lines and results, from process 0 only.

Library logs (orbax, absl, parameter tables) go to `logging`, which the command lines send to a log file in the
run's directory (`--verbosity` shows them on the terminal too); `say` is for the few lines a user reads.
"""
from __future__ import annotations

import jax


def say(message: str) -> None:
  """Prints one line on process 0 (every host runs the same command; one of them speaks)."""
  if jax.process_index() == 0:
    print(message, flush=True)
