"""Errors meant for the person at the terminal, not for a traceback, and warnings said once."""

import warnings

_warned: set[str] = set()


class UserError(Exception):
    """Bad input or set-up. The CLI prints the message on one line and exits 2.

    Messages name the file, field or key at fault and say how to fix it.
    """


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM, with its state kept: the CLI prints the message (how far it got,
    how to continue) after "interrupted" and exits 130, as for any KeyboardInterrupt."""


def yaml_problem(err: Exception) -> str:
    """A PyYAML error on one line, what and where (its own message takes several, with a caret drawing)."""
    problem, mark, context = (getattr(err, name, None) for name in ("problem", "problem_mark", "context"))
    if not problem:
        return " ".join(str(err).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{context}: {problem}{where}" if context else f"{problem}{where}"


def warn_once(message: str, key: str | None = None) -> None:
    """A RuntimeWarning the first time ``key`` (default: the message) comes up in this process,
    attributed to the caller's caller (the vidray function whose behaviour it explains)."""
    key = message if key is None else key
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
