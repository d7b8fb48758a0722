"""The one exception type for user mistakes.

A `UserError` message is a single line that names the key, the value found and the fix. The
CLI prints it without a traceback and exits non-zero; library callers can catch it.
"""


class UserError(ValueError):
  """A mistake in a config, an override, a file or an argument: fixable by the user."""
