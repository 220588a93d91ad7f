"""Checks on input paths made before any file is opened."""

from __future__ import annotations

import stat
from pathlib import Path

from swiftalign.errors import InputError

__all__ = ["require_regular_file"]


def require_regular_file(path: str | Path, what: str = "file", *,
                         error: type[InputError] = InputError) -> Path:
    """Refuse a path that is missing or not a regular file (a FIFO, socket, device, folder).

    Opening a FIFO blocks until something writes to it, so this is checked
    with ``stat`` (which never blocks) before any ``open``.

    Parameters
    ----------
    path : str or Path
        The input.
    what : str
        What the file is for, in the message (``particle STAR file``, ``map`` …).
    error : type
        The :class:`InputError` subclass to raise.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InputError
        ``PATH: no such WHAT``, or ``PATH: not a regular file (a FIFO); WHAT expected``.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror})") from None
    if stat.S_ISREG(mode):
        return path
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if
            stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    raise error(f"{path}: is {kind}, not a regular file; a {what} is expected")
