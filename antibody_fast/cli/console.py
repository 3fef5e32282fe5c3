"""What the user sees on the terminal: status lines, the progress bar, and the error contract: a user error is
one line on stderr and exit status 2, with no traceback (``ANTIBODY_FAST_DEBUG=1`` re-raises it); any other
exception is a bug and keeps its traceback. stdout is kept for ``--dry-run``'s JSON."""

from __future__ import annotations

import sys

__all__ = ["CLIError", "say", "progress_bar", "user_errors", "one_line"]


class CLIError(ValueError):
    """A user error: reported without a traceback, exit status 2."""


def say(msg: str) -> None:
    """A status or error line for the user, on stderr."""
    print(msg, file=sys.stderr)


def progress_bar(total: int, initial: int, desc: str, *, disable: bool):
    """A tqdm bar on stderr (``disable``: ``--no-progress``, or not rank 0)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=disable, file=sys.stderr, dynamic_ncols=True)


def user_errors() -> tuple:
    """The exceptions the CLI reports as a one-line message with exit 2 (no traceback): user errors and the
    library's typed errors. ValueError covers UnicodeDecodeError, json errors, CheckpointMismatchError and
    NonFiniteCheckpointError; OSError covers a read-only --output and a full disk; ImplUnavailableError is an
    ``--impl`` that cannot run an op (checked up front, this is the net for a dtype-specific case)."""
    from ..data.loaders import DataError
    from ..dispatch import ImplUnavailableError
    from ..flat import StaleFlatParametersError
    from ..guard import NonFiniteError

    return (
        CLIError,
        DataError,
        ValueError,
        OSError,
        RecursionError,
        NonFiniteError,
        StaleFlatParametersError,
        ImplUnavailableError,
    )


def one_line(e: BaseException) -> str:
    """``e``'s message on one line (at most 2000 characters), prefixed by its type where the message alone
    would not say what went wrong (an OSError's bare "Permission denied")."""
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (OSError, RecursionError, UnicodeDecodeError)) and type(e).__name__ not in msg:
        msg = f"{type(e).__name__}: {msg}"
    return msg[:2000]
