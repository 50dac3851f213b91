"""Exceptions raised for problems the user can fix."""


class BergsonError(Exception):
    """A user-facing error: the message names the option or file at fault and the fix.

    The command-line interface prints these without a traceback and exits non-zero.
    """
