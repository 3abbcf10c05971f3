"""What every entry point shares: bad input ends in one clear sentence, not a traceback."""
from __future__ import annotations

import functools
import sys

from sfd_jax.convert.io import ConversionError
from sfd_jax.sharding import ShardingError

# Errors that mean "the input is wrong" (their message says what to change); anything else is a bug and keeps
# its traceback.
USER_ERRORS = (ConversionError, ShardingError, FileNotFoundError, FileExistsError, ValueError, KeyError)


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
