"""The one exception type for problems a user can fix, how it reaches the user, and did-you-mean hints."""

from __future__ import annotations

import contextlib
import difflib
import sys
from collections.abc import Iterable, Iterator


class MetricLabError(Exception):
    """A user-fixable problem; the message names the problem and the fix.

    The CLI and recipes turn it into one readable line and exit code 2; a traceback
    is shown only with ``--debug``.
    """


def did_you_mean(name: str, choices: Iterable[str], n: int = 1) -> str:
    """``" Did you mean 'x'?"`` for the choices closest to ``name`` (case-insensitive matches first), or ``""``."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    same_but_case = [c for c in choices if c.lower() == name.lower() and c not in close]
    close = (same_but_case + close)[:n]
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


@contextlib.contextmanager
def exit_on_user_error(debug: bool = False) -> Iterator[None]:
    """Turn a MetricLabError into one red line on stderr and exit code 2 (a traceback only with ``debug``)."""
    try:
        yield
    except MetricLabError as err:
        if debug:
            raise
        from rich.console import Console

        # soft_wrap: one physical line however narrow the terminal (or pipe) is; the terminal wraps it.
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
