"""User-facing errors.

Every mistake a user can make (bad name, missing file, bad flag value) raises a
:class:`TrimtuneError` whose message names the problem *and* the fix. The CLI prints it as
one line and exits non-zero, without a traceback.
"""


class TrimtuneError(ValueError):
    """A user error: the message says what is wrong and how to fix it."""
