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


def renamed(**old_to_new: str):
    """Accept old keyword spellings for one release, each with a ``DeprecationWarning``.

    Decorates a function or a (dataclass) class: ``@renamed(rank="r")`` lets ``f(rank=8)`` /
    ``C(rank=8)`` mean ``r=8``; a class also gets the old name as a property of the new one.
    Both spellings at once is a :class:`TrimtuneError` (one line).
    """
    import functools
    import warnings

    def translate(where: str, kw: dict) -> dict:
        for old, new in old_to_new.items():
            if old in kw:
                if new in kw:
                    raise TrimtuneError(f"{where}: {old}= and {new}= both given; {old} is the old "
                                        f"spelling of {new}: pass {new}= only")
                warnings.warn(f"{where}: {old}= is deprecated, use {new}= (same meaning)",
                              DeprecationWarning, stacklevel=3)
                kw[new] = kw.pop(old)
        return kw

    def alias(where: str, old: str, new: str) -> property:
        def note() -> None:
            warnings.warn(f"{where}.{old} is deprecated, use .{new} (same meaning)",
                          DeprecationWarning, stacklevel=3)

        def get(self):
            note()
            return getattr(self, new)

        def set_(self, value) -> None:
            note()
            setattr(self, new, value)
        return property(get, set_, doc=f"Deprecated spelling of :attr:`{new}`.")

    def decorate(obj):
        fn = obj.__init__ if isinstance(obj, type) else obj
        where = obj.__name__

        @functools.wraps(fn)
        def wrapper(*args, **kw):
            return fn(*args, **translate(where, kw))

        if not isinstance(obj, type):
            return wrapper
        obj.__init__ = wrapper
        for old, new in old_to_new.items():
            setattr(obj, old, alias(where, old, new))
        return obj

    return decorate
