"""User-facing errors.

Every mistake a user can make (bad name, missing file, bad flag value) raises a
:class:`TrimtuneError` whose message names the problem *and* the fix. The CLI prints it as
one line and exits non-zero, without a traceback.
"""


class TrimtuneError(ValueError):
    """A user error: the message says what is wrong and how to fix it."""


class RunInterrupted(TrimtuneError):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM; the message says what was kept and how
    to continue. ``signum`` is the signal number (the CLI exits with ``128 + signum``);
    ``step`` / ``total_steps``: where the loop stopped (None outside the loop)."""

    def __init__(self, message: str, signum: int, *, step: int | None = None,
                 total_steps: int | None = None):
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.total_steps = total_steps


class TrainingCollapseWarning(UserWarning):
    """A run that fell to chance or whose loss rose far above its start: the message (one line)
    says where, what was kept, and the fix (usually a lower learning rate)."""
