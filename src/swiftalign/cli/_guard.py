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
import signal
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
        # the command's handlers and level are its own: restored when it ends (a command run
        # in-process, from a notebook or a test, leaves the caller's logging as it was)
        root = logging.getLogger()
        saved_handlers, saved_level = root.handlers[:], root.level
        # console messages before the command opens its log (e.g. a stale lock taken
        # over) follow -q/-v too; the command adds its log file
        setup_logging(bool(kwargs.get("verbose")), bool(kwargs.get("quiet")))
        output = kwargs.get("output")
        if output is not None:
            note_new_folders(output)
            describe_job(f"{_command_name(command)} → {output}")
        failed = True
        sigint = _SigintWatch()
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
            if sigint.received:
                _interrupted()
                raise typer.Exit(code=EXIT_INTERRUPTED) from None
            fail(exc)
        except Exception:
            # a library that wraps the KeyboardInterrupt in its own error (pydantic while
            # building a model) is still an interruption
            if sigint.received:
                _interrupted()
                raise typer.Exit(code=EXIT_INTERRUPTED) from None
            raise
        finally:
            sigint.restore()
            _finish(failed)
            _restore_logging(saved_handlers, saved_level)

    return run


class _SigintWatch:
    """Note that SIGINT arrived (then raise KeyboardInterrupt as Python does).

    Installed only over Python's default handler: a command started with SIGINT
    ignored (a background job) keeps ignoring it; outside the main thread nothing
    is installed.
    """

    def __init__(self) -> None:
        self.received = False
        self._previous = None
        try:
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.received = True
        raise KeyboardInterrupt

    def restore(self) -> None:
        """Put back the handler found at the start."""
        if self._previous is not None:
            try:
                signal.signal(signal.SIGINT, self._previous)
            except ValueError:
                pass


def _restore_logging(handlers: list[logging.Handler], level: int) -> None:
    """Close the handlers a command added to the root logger; put back the caller's."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            try:
                handler.close()
            except OSError:
                pass
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
