"""Job folders that cannot be corrupted: locks, output-folder rules, saved inputs for --continue.

- :class:`JobLock`: an ``fcntl.flock``-ed lock file held for a whole run
  (``OUTDIR/.swiftalign.lock`` for refine, ``.NAME.lock`` beside an output
  file for align and index build). It holds host, pid, start time and command;
  a second run is refused naming the holder. A lock file left by a dead process
  (the kernel released its flock) is taken over with a warning.
- :func:`check_output_folder`: a new refinement into a non-empty folder is
  refused unless ``--continue`` or ``--overwrite``.
- :func:`input_fingerprint` / :func:`check_fingerprint`: size and SHA-256 of
  the particle file and size and header hash of every stack it names, saved in
  ``OUTDIR/job.json`` so that ``--continue DIR`` refuses other or changed data,
  naming what changed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from swiftalign.errors import InputError, SwiftalignError

__all__ = ["JobLock", "JobLockedError", "check_output_folder", "clear_refine_outputs",
           "input_fingerprint", "check_fingerprint", "save_job", "load_job", "JOB_FILE"]

log = logging.getLogger(__name__)

#: Saved inputs and options of a refinement, read by ``--continue DIR``.
JOB_FILE = "job.json"
#: Lock file of a refinement folder.
FOLDER_LOCK = ".swiftalign.lock"
#: Bytes of each stack's header that are hashed (main header + the start of the extended one).
_STACK_HEAD_BYTES = 4096


class JobLockedError(SwiftalignError):
    """Another run holds the lock of the output."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path_for(output: str | Path, *, folder: bool | None = None) -> Path:
    """The lock file of an output.

    ``DIR/.swiftalign.lock`` for a folder, ``.NAME.lock`` beside a file
    (``folder=None``: a folder when ``output`` is an existing folder).
    """
    output = Path(output)
    if folder is None:
        folder = output.is_dir()
    if folder:
        return output / FOLDER_LOCK
    return output.parent / f".{output.name}.lock"


class JobLock:
    """An exclusive lock on an output folder or file for the whole run.

    Parameters
    ----------
    output : str or Path
        The refinement folder, or the output file of align / index build.
    command : str
        What holds it (shown to a second run).
    folder : bool, optional
        Whether ``output`` is a folder (default: when it exists as one).

    Raises
    ------
    JobLockedError
        (from :meth:`acquire`) Another live run holds it: names command, pid, host, start.
    OSError
        The lock file cannot be created (read-only folder …).
    """

    def __init__(self, output: str | Path, command: str, *, folder: bool | None = None) -> None:
        self.output = Path(output)
        self.path = lock_path_for(self.output, folder=folder)
        self.command = command
        self._fd: int | None = None

    def _describe_holder(self, text: str) -> str:
        try:
            h = json.loads(text)
            return (f"`{h.get('command', '?')}` (pid {h.get('pid')} on {h.get('host')}, since "
                    f"{h.get('started')})")
        except ValueError:
            return "another swiftalign run"

    def acquire(self) -> JobLock:
        """Take the lock (never waits)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # the holder may unlink the file between our open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = self._describe_holder(self._read())
                raise JobLockedError(
                    f"{self.output}: in use by {holder}; wait for it to finish, stop it, or "
                    "choose another output") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise JobLockedError(f"{self.output}: lock file {self.path} keeps changing")
        self._fd = fd
        self._take_over(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
        record = {"host": platform.node(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command,
                  "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return self

    def _take_over(self, old: str) -> None:
        """Warn when a lock file of a run that ended without releasing it is taken over."""
        if not old.strip():
            return
        try:
            h = json.loads(old)
        except ValueError:
            h = {}
        dead = h.get("host") == platform.node() and not _pid_alive(int(h.get("pid", -1)))
        state = "dead" if dead else "no longer holding it"
        log.warning("%s: stale lock of %s (%s) taken over", self.output,
                    self._describe_holder(old), state)

    def _read(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except OSError:
            return ""

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


#: What a refinement writes in its folder (``--overwrite`` removes these and only these).
_REFINE_OUTPUTS = ("it[0-9][0-9][0-9]", "final", "state.json", JOB_FILE, "summary.png",
                   "run.log", "report.html", ".*.tmp", ".*.staging", ".final.tmp", ".final.old")


def _foreign_entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != FOLDER_LOCK)


def check_output_folder(out: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a new refinement into a non-empty folder unless resuming or overwriting.

    Raises
    ------
    InputError
        ``OUTDIR: not empty (…); use --continue OUTDIR to resume, --overwrite to replace, or
        another folder``; or ``OUTDIR`` is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out}: is a file; give a folder")
    if resume or overwrite or not out.exists():
        return
    entries = _foreign_entries(out)
    if entries:
        shown = ", ".join(entries[:4]) + (" …" if len(entries) > 4 else "")
        raise InputError(f"-o {out}: folder is not empty ({shown}); use --continue {out} to "
                         "resume, --overwrite to replace its results, or another folder")


def clear_refine_outputs(out: str | Path) -> list[str]:
    """Delete a previous refinement's outputs from ``out`` (``--overwrite``); return their names.

    Only names a refinement writes are removed; other files are left alone.
    """
    out = Path(out)
    removed = []
    for pattern in _REFINE_OUTPUTS:
        for p in out.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)


def _file_digest(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if limit is not None:
            h.update(f.read(limit))
        else:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def input_fingerprint(particle_file: str | Path, stack_paths: list[Path]) -> dict:
    """Size and SHA-256 of the particle file; size and header SHA-256 of every stack.

    Parameters
    ----------
    particle_file : str or Path
        The STAR (or ``.cs``) file.
    stack_paths : list of Path
        The stacks it names (as resolved when read).

    Returns
    -------
    dict
        ``{"particles": {"path", "bytes", "sha256"}, "stacks": {path: {"bytes",
        "header_sha256"}}}``; paths absolute.
    """
    p = Path(particle_file)
    stacks = {}
    for s in stack_paths:
        stacks[str(Path(s).absolute())] = {"bytes": Path(s).stat().st_size,
                                           "header_sha256": _file_digest(s, _STACK_HEAD_BYTES)}
    return {"particles": {"path": str(p.absolute()), "bytes": p.stat().st_size,
                          "sha256": _file_digest(p)},
            "stacks": stacks}


def check_fingerprint(saved: dict, now: dict, folder: Path) -> None:
    """Refuse to continue on other or changed data, naming what changed.

    Raises
    ------
    InputError
        ``--continue DIR: the particle file X differs from the run's (Y)`` / ``… changed since
        the run started (size A → B bytes)`` / ``stack S changed …`` / ``stacks differ …``.
    """
    before, after = saved["particles"], now["particles"]
    head = f"--continue {folder}"
    if Path(before["path"]).resolve() != Path(after["path"]).resolve():
        raise InputError(f"{head}: particle file {after['path']} is not the run's "
                         f"({before['path']}); start a new output folder for other particles")
    if (before["bytes"], before["sha256"]) != (after["bytes"], after["sha256"]):
        raise InputError(f"{head}: particle file {after['path']} changed since the run started "
                         f"(size {before['bytes']} → {after['bytes']} bytes, content hash "
                         "differs); start a new output folder")
    old, new = saved["stacks"], now["stacks"]
    if set(old) != set(new):
        gone = sorted(set(old) - set(new)) or sorted(set(new) - set(old))
        raise InputError(f"{head}: the particles name other stacks than the run's ({gone[0]})")
    for path, rec in old.items():
        if rec != new[path]:
            header = "same" if rec["header_sha256"] == new[path]["header_sha256"] else "differs"
            raise InputError(f"{head}: stack {path} changed since the run started (size "
                             f"{rec['bytes']} → {new[path]['bytes']} bytes, header hash "
                             f"{header})")


def save_job(folder: str | Path, job: dict) -> None:
    """Write ``FOLDER/job.json`` (inputs, options, fingerprint) atomically."""
    from swiftalign.io.atomic import atomic_write

    with atomic_write(Path(folder) / JOB_FILE) as tmp:
        tmp.write_text(json.dumps(job, indent=2, default=str))


def load_job(folder: str | Path) -> dict | None:
    """``FOLDER/job.json`` as saved by :func:`save_job`, or ``None`` when there is none.

    Raises
    ------
    InputError
        The file exists but cannot be parsed.
    """
    path = Path(folder) / JOB_FILE
    if not path.is_file():
        return None
    try:
        job = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable saved job ({exc})") from None
    if not isinstance(job, dict) or "inputs" not in job or "options" not in job:
        raise InputError(f"{path}: saved job lacks 'inputs' or 'options'")
    return job
