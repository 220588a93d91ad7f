"""Shared CLI plumbing: logging, progress bars, run records."""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

import swiftalign
from swiftalign.errors import SwiftalignError
from swiftalign.io.json_file import write_json as write_json  # re-exported for the commands

console = Console(stderr=True)

# Options shared by the commands (one definition, one help text).
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda or cuda:N (GPU N).")]
WeightingOption = Annotated[str, typer.Option(
    help="Fourier-coefficient weights in the distance: none; noise: 1/σ(|k|) whitening by the "
    "noise power outside the particle mask per optics group (refine: then of the residuals "
    "against the half maps); ssnr: whitening × SSNR/(1+SSNR).")]
ParticleDiameterOption = Annotated[float | None, typer.Option(
    help="Particle mask diameter (Å) for the noise estimate; default 0.8 × box.")]
MaxMemoryOption = Annotated[float, typer.Option(
    help="Memory budget (GB) for the blocks of reference projections searched at once.")]
MapAngpixOption = Annotated[float | None, typer.Option(
    "--angpix", help="Voxel size (Å) of the maps, overriding their headers.")]
AngpixOption = Annotated[float | None, typer.Option(
    help="Particle pixel size (Å) when the STAR file has none.")]
ReferenceAngpixOption = Annotated[float | None, typer.Option(
    help="Reference voxel size (Å) when its header says 0.")]
MaxBadFractionOption = Annotated[float, typer.Option(
    help="Unusable particles (NaN/Inf pixels, constant images) are left out with a "
    "warning; stop if more than this fraction.")]
QuietOption = Annotated[bool, typer.Option(
    "--quiet", "-q", help="Only errors: no progress bars, no summary (the log file keeps "
    "everything).")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Debug output.")]

# Unit of each progress step's count (the bars show its rate per second).
STEP_UNITS = {
    "particles": "particles",
    "projections": "directions",
    "train index": "vectors",
    "populate index": "poses",
    "search (exact)": "poses",
    "query index": "particles",
    "local search": "particle rounds",
    "reconstruction": "particles",
    "iterations": "iterations",
}


class RateColumn(ProgressColumn):
    """Items per second, with the step's unit (``1.2k particles/s``)."""

    def render(self, task: Task) -> Text:
        """Text of the task's current (or final) rate."""
        unit = task.fields.get("unit", "items")
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"- {unit}/s", style="progress.data.speed")
        factor, prefix = next(((f, p) for f, p in ((1e9, "G"), (1e6, "M"), (1e3, "k"))
                               if speed >= f), (1.0, ""))
        return Text(f"{speed / factor:.1f}{prefix} {unit}/s", style="progress.data.speed")


def setup_logging(verbose: bool, quiet: bool, log_file: Path | None = None) -> None:
    """Configure the root logger once per command.

    The console shows errors only under ``quiet``, debug messages under
    ``verbose``, else information; ``log_file`` (created, with its folders,
    when missing) keeps everything. Folders and a log this run creates are
    recorded, so that a failing command removes them (:func:`fail`).

    Raises
    ------
    OSError
        The log file or its folder cannot be created (read-only folder, a
        file in the way, full disk); the console handler is set up anyway.
    """
    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.INFO)
    handlers: list[logging.Handler] = []
    from rich.logging import RichHandler

    rich_handler = RichHandler(console=console, show_path=False, level=level)
    rich_handler.setFormatter(logging.Formatter("%(message)s"))
    handlers.append(rich_handler)
    error: OSError | None = None
    if log_file is not None:
        try:
            note_new_folders(log_file.parent)
            log_file.parent.mkdir(parents=True, exist_ok=True)
            is_new = not log_file.exists()
            fh = logging.FileHandler(log_file)
            if is_new:
                _new_logs.append(log_file)
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            fh.setLevel(logging.DEBUG)
            handlers.append(fh)
        except OSError as exc:
            error = exc
    logging.basicConfig(level=logging.DEBUG if len(handlers) > 1 else level, handlers=handlers,
                        force=True)
    for noisy in ("faiss", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    if error is not None:
        raise error


def log_to_file_only(level: int, message: str) -> None:
    """Write ``message`` to the command's log file(s) only, not to the console."""
    record = logging.getLogger("swiftalign").makeRecord(
        "swiftalign", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@contextmanager
def progress_bars(quiet: bool):
    """Yield ``progress(step, done, total)``: rich bars with rates on a TTY, else ``None``.

    ``None`` (no bars) under ``--quiet`` or when stderr is not a terminal
    (batch jobs, pipes), so logs stay free of bar redraws.
    """
    enabled = not quiet and console.is_terminal
    if not enabled:
        yield None
        return
    bars = Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[str, int] = {}
    with bars:

        def update(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bars.add_task(step, total=total, unit=STEP_UNITS.get(step, "items"))
            task_id = tasks[step]
            if done < bars.tasks[task_id].completed:
                # the step starts again (next half set, class or iteration): fresh rate
                bars.reset(task_id, total=total, completed=done)
            else:
                bars.update(task_id, completed=done, total=total)

        yield update


def machine_record(device: str | None = None) -> dict:
    """Host, platform, CPU count, library versions and the compute device, for ``run.json``."""
    import faiss
    import numpy
    import torch

    cuda = torch.cuda.is_available()
    dev = device or "cpu"
    if dev.startswith("cuda") and not cuda:
        dev = "cpu (cuda asked for, not available)"
    elif dev.startswith("cuda"):
        index = int(dev.split(":")[1]) if ":" in dev else torch.cuda.current_device()
        dev = f"{dev} ({torch.cuda.get_device_name(index)})"
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "numpy": numpy.__version__,
        "cuda": cuda,
        "device": dev,
    }


def run_record(*, device: str | None = None, **fields) -> dict:
    """Version, command line, machine (with ``device``) and start time for ``run.json``.

    ``fields`` (parameters, inputs, outputs, seeds, timings …) are added as they are.
    """
    return {
        "swiftalign_version": swiftalign.__version__,
        "command_line": sys.argv,
        "cwd": os.getcwd(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_record(device),
        **fields,
    }


def write_run_json(path: str | Path, *, started: float, **fields) -> None:
    """Write a command's ``run.json``: :func:`run_record` of ``fields`` plus its wall time.

    Parameters
    ----------
    path : str or Path
        Destination (written atomically).
    started : float
        ``time.perf_counter()`` when the command began; ``timings_s["wall"]`` is the time since.
    **fields
        Parameters, inputs, outputs, findings … as for :func:`run_record`.
    """
    write_json(Path(path), run_record(**fields,
                                      timings_s={"wall": time.perf_counter() - started}))


_new_logs: list[Path] = []
_new_folders: list[Path] = []


def note_new_folders(path: str | Path) -> None:
    """Record ``path`` and those of its parents that do not exist yet (this run creates them).

    :func:`remove_new_folders` removes them again when the command fails and
    they are still empty.
    """
    p = Path(os.path.abspath(path))
    try:
        while not p.exists() and not p.is_symlink() and p != p.parent:
            if p not in _new_folders:
                _new_folders.append(p)
            p = p.parent
    except OSError:  # unreadable parent: nothing can be created below it anyway
        pass


def remove_new_folders() -> list[Path]:
    """Remove the recorded folders that this run created and left empty (deepest first).

    Our log and lock are gone by then (:func:`fail`, the guard's lock
    release); a folder holding anything else is kept. Never raises.

    Returns
    -------
    list of Path
        The folders removed.
    """
    removed = []
    for folder in sorted(_new_folders, key=lambda f: len(f.parts), reverse=True):
        try:
            if folder.is_dir() and not folder.is_symlink():
                _remove_unheld_locks(folder)
                folder.rmdir()  # only an empty folder
                removed.append(folder)
        except OSError:
            pass
    _new_folders.clear()
    return removed


def _remove_unheld_locks(folder: Path) -> None:
    """Remove lock files (``.NAME.lock``) in ``folder`` that no process holds.

    A Ctrl-C between creating a lock file and recording it leaves it behind;
    one that another run holds (``flock``) stays.
    """
    import fcntl

    for lock in folder.glob(".*.lock"):
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises when held
            lock.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)


def remove_new_logs() -> None:
    """Close the logs and remove those this run created (never raises)."""
    logging.shutdown()
    logs = list(_new_logs)
    _new_logs.clear()
    for log_file in logs:
        try:
            log_file.unlink(missing_ok=True)
        except OSError:  # read-only folder, gone: nothing to remove
            pass


#: Unit suffixes of config field names that the CLI flags leave out (``resolution_angstrom``
#: is ``--resolution``).
_FIELD_SUFFIXES = ("_angstrom", "_px", "_deg", "_rad", "_gb", "_path")


def flag_for_field(field: str) -> str:
    """The CLI flag of a config field, e.g. ``max_memory_gb`` → ``--max-memory``.

    Looks the field (or the field without its unit suffix) up among the running
    command's options; outside a command, derives the flag from the name.
    """
    import click

    base = field
    for suffix in _FIELD_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        for param in ctx.command.params:
            if param.name in (field, base) and param.opts:
                long = [o for o in param.opts if o.startswith("--")]
                return (long or param.opts)[0]
    return ("-" if len(base) == 1 else "--") + base.replace("_", "-")


def user_message(exc: Exception) -> str:
    """One line for the user; pydantic errors name the CLI flags, not the config fields."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            loc = err.get("loc") or ()
            flag = flag_for_field(str(loc[0])) if loc else "input"
            msg = str(err.get("msg", "invalid value"))
            msg = msg[:1].lower() + msg[1:]
            value = err.get("input")
            if err.get("type") == "missing" or isinstance(value, dict):
                parts.append(f"{flag}: {msg}")
            else:
                parts.append(f"{flag} {value}: {msg}")
        text = "; ".join(parts)
    elif isinstance(exc, OSError) and not isinstance(exc, SwiftalignError):
        from swiftalign.io.atomic import os_error_message

        text = os_error_message(exc)
    else:
        text = str(exc)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def fail(exc: Exception, *, keep_log: bool = False) -> None:
    """Print a user error on one line, remove the log this run created, and exit 2 (no traceback).

    The error is written to the log too; ``keep_log``: the log stays (outputs
    that explain the failure were written beside it). The guard
    (``cli/_guard.py``) then removes the folders this run created and left
    empty. Removing the log never raises (read-only folder).

    Raises
    ------
    typer.Exit
        Always, with code 2.
    """
    from rich.markup import escape

    message = user_message(exc)
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if keep_log:
        log_to_file_only(logging.ERROR, message)
        logging.shutdown()
        _new_logs.clear()
    else:
        remove_new_logs()
    raise typer.Exit(code=2)


USER_ERRORS = (SwiftalignError, OSError, ValueError)
