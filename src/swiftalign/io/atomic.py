"""Atomic writes: a file, or several outputs of one command, appear complete or not at all.

:func:`atomic_write` yields a temporary name next to the final file (same
filesystem) and renames it into place only when the block ends without an
error; :func:`publish_together` does the same for a set of files or folders
(a command's STAR file, run.json, plots …) through one hidden staging folder.
Every temporary name in use is recorded, so that an interrupted command
(Ctrl-C) can name and remove what it leaves (:func:`remove_temporaries`).
:func:`os_error_message` turns an ``OSError`` raised on a temporary name into
one line naming the final file and the cause.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write", "publish_together", "StagedOutputs",
           "os_error_message", "remove_temporaries", "final_name"]

#: Temporary files and staging folders in use by this process (removed on interruption).
_LIVE: set[Path] = set()

_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{6,}\.(tmp|staging)$")


def _follow_umask(path: Path, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)  # mkstemp/mkdtemp make 0600/0700; outputs follow the umask


def atomic_path(final: str | Path) -> Path:
    """Create and return a temporary file name next to ``final`` (same filesystem).

    The caller renames it onto ``final`` (``os.replace``) or deletes it; prefer
    :func:`atomic_write`, which does both.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    _follow_umask(Path(tmp), 0o666)
    return Path(tmp)


@contextmanager
def atomic_write(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it onto ``final``.

    On any exception (including ``KeyboardInterrupt``) the temporary file is
    deleted and ``final`` is left as it was.

    Parameters
    ----------
    final : str or Path
        The file to create or replace.

    Yields
    ------
    Path
        Temporary name in the same folder (``.NAME.XXXXXX.tmp``).

    Raises
    ------
    OSError
        The folder cannot be written (read-only, full, no permission).
    """
    final = Path(final)
    tmp = atomic_path(final)
    _LIVE.add(tmp)
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        # a failed write() or flush() names no file: name the one being written
        raise OSError(exc.errno, exc.strerror, str(final)) from exc
    finally:
        _LIVE.discard(tmp)
        if tmp.exists():
            tmp.unlink()


class StagedOutputs:
    """Outputs written into a hidden staging folder, published together.

    Use through :func:`publish_together`. :meth:`path` gives the staging name
    of a final path (a file or a folder); :meth:`publish` moves every staged
    path onto its final path (``os.replace``: each move is a rename on the
    same filesystem) only after all of them were written.
    """

    def __init__(self, folder: Path, tag: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.root = Path(tempfile.mkdtemp(prefix=f".{tag}.", suffix=".staging", dir=folder))
        _follow_umask(self.root, 0o777)
        _LIVE.add(self.root)
        self._targets: dict[Path, Path] = {}

    def path(self, final: str | Path) -> Path:
        """The staging path to write instead of ``final`` (which must be in the folder)."""
        final = Path(final)
        if final.parent.resolve() != self.folder.resolve():
            raise ValueError(f"{final} is not in the staged folder {self.folder}")
        staged = self.root / final.name
        self._targets[staged] = final
        return staged

    def publish(self) -> list[Path]:
        """Move every written staged path into place; return the final paths."""
        published = []
        for staged, final in self._targets.items():
            if not staged.exists():
                continue
            if final.is_dir() and not final.is_symlink():
                old = self.root / f".old.{final.name}"
                os.replace(final, old)  # a folder cannot be replaced by rename while not empty
            os.replace(staged, final)
            published.append(final)
        self.discard()
        return published

    def discard(self) -> None:
        """Delete the staging folder and whatever is in it."""
        shutil.rmtree(self.root, ignore_errors=True)
        _LIVE.discard(self.root)


@contextmanager
def publish_together(folder: str | Path, tag: str = "swiftalign") -> Iterator[StagedOutputs]:
    """Stage a command's outputs in ``folder`` and publish them all when the block succeeds.

    Example::

        with publish_together(out.parent) as stage:
            write_particles(stage.path(out), ...)
            save_figure(fig, stage.path(plot))

    On an exception nothing is published and the staging folder is removed.

    Raises
    ------
    OSError
        ``folder`` cannot be written.
    """
    stage = StagedOutputs(Path(folder), tag)
    try:
        yield stage
        stage.publish()
    finally:
        stage.discard()


def remove_temporaries() -> list[Path]:
    """Delete every temporary file and staging folder this process has open; return them.

    Never raises (a read-only folder where nothing could be created is fine).
    """
    removed = []
    for path in sorted(_LIVE):
        try:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except OSError:
            continue
        removed.append(path)
    _LIVE.clear()
    return removed


def final_name(path: str | Path) -> Path:
    """The final path a temporary or staged path stands for (the path itself otherwise)."""
    path = Path(path)
    parts = list(path.parts)
    for i, part in enumerate(parts):
        m = _TEMP_NAME.match(part)
        if m and part.endswith(".tmp"):
            parts[i] = m.group("name")
        elif m:  # a staging folder: its content belongs to the folder above
            return final_name(Path(*parts[:i], *parts[i + 1:])) if i + 1 < len(parts) else \
                Path(*parts[:i]) if i else Path(".")
    return Path(*parts)


_CAUSES = {
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or folder",
    errno.EISDIR: "is a folder",
    errno.ENOTDIR: "a path component is not a folder",
}


def os_error_message(exc: OSError) -> str:
    """One line: ``cannot write FILE: CAUSE`` for a failed write, naming the final file.

    Temporary and staging names are mapped back to the file the user asked for.
    """
    cause = _CAUSES.get(exc.errno or -1, exc.strerror or str(exc))
    if exc.filename is None:
        return f"{cause} ({exc})" if exc.strerror else str(exc)
    name = final_name(exc.filename)
    verb = "write" if exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT) else "access"
    return f"cannot {verb} {name}: {cause}"
