"""Atomic file writes: a reader sees the old file or the new one, never half of one.

A file is written to a temporary name in its destination directory (``.tmp-<name>.<random>``, so that
:func:`temporary_prefix` finds what a killed writer left behind) and then ``os.replace``-d onto its name.
``durable=True`` also fsyncs the file before the rename and the directory after it, so the new file survives
a power loss (checkpoints); the command line's small reports skip that cost. A directory is replaced the
same way by :func:`atomic_directory`.

Foundation layer (docs/design.md §4): imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

__all__ = ["atomic_open", "atomic_write_text", "atomic_directory", "temporary_prefix", "fsync_directory"]


def temporary_prefix(path: str | os.PathLike) -> str:
    """The name prefix of ``path``'s temporary files: ``.tmp-<basename>.``."""
    return ".tmp-" + os.path.basename(os.fspath(path)) + "."


def fsync_directory(directory: str) -> None:
    """Make a rename inside ``directory`` durable (a no-op where a directory cannot be opened)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - not every platform can open a directory
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", *, durable: bool = False, encoding: str | None = "utf-8"
) -> Iterator[IO]:
    """``with atomic_open(path, "w" | "wb") as f:`` write ``f``; on a normal exit the file replaces ``path``,
    on an exception the temporary file is removed and ``path`` is left as it was.

    Args:
        path: destination file; its directory must exist.
        mode: ``"w"`` (text, ``encoding``) or ``"wb"``.
        durable: flush and fsync the file before the rename, and fsync the directory after it.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), dir=directory)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_directory(directory)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w", durable=durable) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[str]:
    """``with atomic_directory(final) as tmp:`` fill the new directory ``tmp`` (made next to ``final``); on a
    normal exit it replaces ``final`` (an existing one is moved to ``final + ".old"`` for the swap and then
    removed), on an exception ``tmp`` is removed and ``final`` is left as it was."""
    final = os.fspath(final)
    parent = os.path.dirname(os.path.abspath(final))
    tmp = tempfile.mkdtemp(prefix=temporary_prefix(final), dir=parent)
    try:
        yield tmp
        if os.path.exists(final):
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
