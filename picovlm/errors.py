"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line and exits non-zero; anything else is a bug in
picovlm and keeps its traceback. Messages say what is wrong and what to do about it.
"""


class UserError(Exception):
    """A problem with the user's input (path, file, config, checkpoint), not with picovlm."""
