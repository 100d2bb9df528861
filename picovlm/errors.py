"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line and exits non-zero; anything else is a bug in
picovlm and keeps its traceback. Messages say what is wrong and what to do about it.
"""


class UserError(Exception):
    """A problem with the user's input (path, file, config, checkpoint), not with picovlm."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
