"""Errors meant for the person at the terminal, not for a traceback."""


class UserError(Exception):
    """Bad input or set-up. The CLI prints the message on one line and exits 2.

    Messages name the file, field or key at fault and say how to fix it.
    """
