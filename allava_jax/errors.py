"""User mistakes and how every entry point reports them.

A mistake in what the user gave (a missing or unreadable file, a bad config value, no tokenizer,
an unknown preset) raises ``UserError`` (or an ``OSError`` about a path); each ``python -m
allava_jax.*`` command prints it as one ``error: ...`` line and exits with status 2. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

# OSErrors that name a path the user gave.
PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class UserError(ValueError):
    """Bad input from the user; the message names the cause and the fix."""


def report_user_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wraps an entry point: a user error becomes one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except (UserError, *PATH_ERRORS) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped
