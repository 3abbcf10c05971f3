"""The one error the converters raise for a weight file that cannot be read or does not fit the model."""
from sfd_jax.errors import UserError


class ConversionError(UserError):
  """A checkpoint does not fit the model (missing, unknown or mis-shaped key) or cannot be read."""
