"""The one exception type users see.

Every failure caused by bad input (a foreign checkpoint, a tampered bundle, an unknown config id,
an impossible budget) is raised as :class:`StitchError` with a single line that says what went
wrong, where, and what to do. The CLI prints that line and exits with code 2; anything else is a
bug and keeps its traceback.
"""

import operator
import shlex


class StitchError(Exception):
    """Bad input: a one-line, user-facing message (what, where, what to do)."""


def first_line(exc: BaseException) -> str:
    """What a StitchError quotes of a library's exception: its first line, or its type if empty."""
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def exact_int(value) -> int | None:
    """``value`` as an int if it is an integer (Python or numpy), else None: a config id or batch
    size given as a float, bool or string is not rounded or parsed into one."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def command(*words) -> str:
    """A stitch-compile command line for a message, each word quoted for the shell where it needs
    it, so that a bundle path with spaces can be pasted as is. Messages put it in backticks."""
    return f"stitch-compile {' '.join(shlex.quote(str(w)) for w in words)}"
