"""The one exception type users see.

Every failure caused by bad input (a foreign checkpoint, a tampered bundle, an unknown config id,
an impossible budget) is raised as :class:`StitchError` with a single line that says what went
wrong, where, and what to do. The CLI prints that line and exits with code 2; anything else is a
bug and keeps its traceback.
"""


class StitchError(Exception):
    """Bad input: a one-line, user-facing message (what, where, what to do)."""
