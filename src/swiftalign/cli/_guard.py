"""Every command runs guarded: lock held to the end, Ctrl-C and write failures end cleanly.

:func:`guarded` wraps a command function (``cli/main.py``). Inside, a command
calls :func:`hold_lock` (refused at once when another run holds the output)
and :func:`describe_job` (what is running and how to resume). Then:

- Ctrl-C (SIGINT): one line saying what was interrupted and how to resume,
  temporary files and staging folders removed, exit 130;
- an ``OSError`` that escapes the command (read-only folder, disk full): one
  line naming the file and the cause, exit 2, no traceback;
- in every case the lock is released and temporaries are removed;
- on failure or Ctrl-C, the folders the run created for its output (``-o``
  and its missing parents, the log's folder) are removed when they are left
  empty: nothing partial, in one place for every command.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import typer

from swiftalign.io.atomic import remove_temporaries
from swiftalign.jobs import JobLock

__all__ = ["guarded", "hold_lock", "describe_job"]

#: Exit status of a command stopped by SIGINT (128 + 2, as shells report it).
EXIT_INTERRUPTED = 130

_job: dict = {}


def hold_lock(output: str | Path, command: str, *, folder: bool = False) -> JobLock:
    """Lock ``output`` (a file, or a folder with ``folder=True``) until the command ends.

    Raises
    ------
    JobLockedError
        Another run holds it (the message names it).
    OSError
        The lock file cannot be created (read-only folder …).
    """
    lock = JobLock(output, command, folder=folder).acquire()
    _job.setdefault("locks", []).append(lock)
    return lock


def describe_job(what: str, resume: str | None = None, *, keep_log: bool = False) -> None:
    """Say what the command is doing (``refine into OUT``) and how to resume it after Ctrl-C.

    ``keep_log``: the log belongs to a folder that can be resumed (refine) and stays.
    """
    _job.update(what=what, resume=resume, keep_log=keep_log)


def _interrupted() -> None:
    from swiftalign.cli._common import _new_logs, console, log_to_file_only, remove_new_logs

    removed = remove_temporaries()
    what = _job.get("what", "the command")
    resume = _job.get("resume")
    tail = f"; resume with `{resume}`" if resume else "; nothing was written, run it again"
    log_to_file_only(logging.ERROR, f"interrupted (SIGINT): {what}")
    if _job.get("keep_log"):
        logging.shutdown()
        _new_logs.clear()
    else:
        remove_new_logs()
    extra = f" ({len(removed)} temporary file(s) removed)" if removed else ""
    console.print(f"[bold red]interrupted:[/] {what}{extra}{tail}", soft_wrap=True,
                  markup=True, highlight=False)


def _finish(failed: bool) -> None:
    from swiftalign.cli._common import _new_folders, _new_logs, remove_new_folders

    remove_temporaries()
    _new_logs.clear()  # the next command in this process must not remove this one's log
    for lock in _job.get("locks", []):
        lock.release()
    _job.clear()
    if failed:
        remove_new_folders()
    _new_folders.clear()


def _command_name(command) -> str:
    """``local_resolution_command`` → ``local-resolution``."""
    return command.__name__.removesuffix("_command").replace("_", "-")


def guarded(command):
    """Wrap a typer command function: lock release, Ctrl-C → exit 130, OSError → one line.

    On failure (a non-zero exit, Ctrl-C, an exception) the folders the run
    created and left empty are removed (see the module docstring).
    """

    @functools.wraps(command)
    def run(*args, **kwargs):
        from swiftalign.cli._common import fail, note_new_folders, setup_logging

        # a log file on a full disk must not print logging's own tracebacks
        logging.raiseExceptions = False
        # console messages before the command opens its log (e.g. a stale lock taken
        # over) follow -q/-v too; the command adds its log file
        setup_logging(bool(kwargs.get("verbose")), bool(kwargs.get("quiet")))
        output = kwargs.get("output")
        if output is not None:
            note_new_folders(output)
            describe_job(f"{_command_name(command)} → {output}")
        failed = True
        try:
            result = command(*args, **kwargs)
            failed = False
            return result
        except typer.Exit as exc:
            failed = exc.exit_code not in (0, None)
            raise
        except KeyboardInterrupt:
            _interrupted()
            raise typer.Exit(code=EXIT_INTERRUPTED) from None
        except OSError as exc:
            fail(exc)
        finally:
            _finish(failed)

    return run
