"""The two ways a run ends early that are not bugs: the user's input is wrong, or the platform preempted it.

Every command line prints a `UserError` as one `error: ...` line and exits 2; a `Preempted` run exits 75 ("resume
me", EX_TEMPFAIL) after its checkpoint is complete. Anything else is a bug in sfd_jax and keeps its traceback.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75


class UserError(Exception):
  """The input is wrong (a flag, a config value, a file): the message names what to fix. Raised where it is checked."""


class Preempted(Exception):
  """A stop signal or preemption notice ended the run after it saved; running the same command again resumes."""
