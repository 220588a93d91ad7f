"""The refinement folder as a job: lock, new/continue/overwrite rules, saved inputs and options.

``refine -o OUTDIR`` saves every option and a fingerprint of the inputs in
``OUTDIR/job.json``; ``refine --continue OUTDIR`` needs nothing else: the
particles, references and options come from there, only ``--iterations``,
``--device`` and ``--max-memory`` may be given anew, and other or changed data
are refused naming what differs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from swiftalign.cli._common import fail, flag_for_field
from swiftalign.cli._guard import hold_lock
from swiftalign.errors import InputError
from swiftalign.jobs import (
    check_fingerprint,
    check_output_folder,
    clear_refine_outputs,
    input_fingerprint,
    load_job,
    save_job,
)
from swiftalign.run_folder import RunFolder

__all__ = ["resolve_refine_params", "prepare_folder", "save_or_check_job", "discard_failed_run"]

log = logging.getLogger("swiftalign.refinement")

#: Options ``--continue`` may change (they do not change the result).
MAY_CHANGE = ("iterations", "device", "max_memory")
#: Options that are about this invocation, not the run (never saved, never compared).
_INVOCATION = ("continue_dir", "quiet", "verbose", "overwrite", "output")
_PATHS = ("particles", "mask", "solvent_mask")
#: Options added after runs were saved without them: the value that resumes such a run as it
#: was made (no automatic local searches before ``--auto-local`` existed).
_ADDED_LATER = {"auto_local": False}
_REQUIRED = (("PARTICLES", "particles"), ("--reference", "reference"),
             ("--initial-resolution", "initial_resolution"))


def _saved_value(name: str, value):
    """An option as saved in job.json (paths absolute, as text)."""
    if value is None:
        return None
    if name in _PATHS:
        return str(Path(value).absolute())
    if name == "reference":
        return [str(Path(v).absolute()) for v in value]
    return value


def _restored_value(name: str, value):
    if value is None:
        return None
    if name in _PATHS:
        return Path(value)
    if name == "reference":
        return [Path(v) for v in value]
    return value


def _missing(value) -> bool:
    return value is None or (isinstance(value, list | tuple) and not value)


def _given(ctx: typer.Context, name: str) -> bool:
    return getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"


def resolve_refine_params(ctx: typer.Context) -> dict:
    """The refine options: from the command line, or for ``--continue`` from ``job.json``.

    Exits with a one-line error when inputs are missing or a ``--continue``
    option differs from the run's.
    """
    p = dict(ctx.params)
    folder = p["continue_dir"]
    if folder is None:
        missing = [flag for flag, name in (*_REQUIRED, ("-o", "output")) if _missing(p[name])]
        if missing:
            fail(ValueError(f"give {', '.join(missing)} (or --continue OUTDIR)"))
        return p
    if p["overwrite"]:
        fail(ValueError("--overwrite and --continue exclude each other"))
    if p["output"] is not None and Path(p["output"]).absolute() != Path(folder).absolute():
        fail(ValueError(f"-o {p['output']} and --continue {folder} name different folders"))
    try:
        job = load_job(folder)
    except InputError as exc:
        fail(exc)
    if job is None:  # a run older than job.json: the inputs must be given again
        missing = [flag for flag, name in _REQUIRED if _missing(p[name])]
        if missing:
            fail(InputError(f"--continue {folder}: no saved job there (no job.json, no "
                            f"state.json); give {', '.join(missing)} or start a new run"))
        return p
    saved = job["options"]
    for name, value in p.items():
        if name in _INVOCATION or name in MAY_CHANGE or not _given(ctx, name):
            continue
        if name in saved and _saved_value(name, value) != saved[name]:
            fail(InputError(
                f"--continue {folder}: {flag_for_field(name)} {value} differs from the run's "
                f"({saved[name]}); only --iterations, --device and --max-memory may change "
                "(start a new output folder for other data or options)"))
    merged = dict(p)
    for name, value in saved.items():
        if name in p and name not in _INVOCATION and not (name in MAY_CHANGE
                                                          and _given(ctx, name)):
            merged[name] = _restored_value(name, value)
    for name, value in _ADDED_LATER.items():
        if name not in saved:
            merged[name] = value
    return merged


def prepare_folder(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Lock ``out`` and apply the new/continue/overwrite rules.

    Returns
    -------
    bool
        True when ``--continue`` must start again from iteration 1 (stopped during it).

    Raises
    ------
    InputError
        Non-empty folder without --continue/--overwrite; nothing to continue.
    JobLockedError
        Another run holds the folder.
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out}: is a file; give a folder")
    if resume and not RunFolder(out).state_path.exists():
        started = any((out / n).exists() for n in ("run.log", "it001", "job.json"))
        if not started:
            raise InputError(f"--continue {out}: no completed iteration to resume there (no "
                             "state.json)")
    hold_lock(out, f"swiftalign {' '.join(sys.argv[1:])}"[:400], folder=True)
    check_output_folder(out, resume=resume, overwrite=overwrite)
    if overwrite:
        removed = clear_refine_outputs(out)
        if removed:
            log.warning("--overwrite: removed %s from %s", ", ".join(removed), out)
    if resume:
        RunFolder(out).remove_stale_temporaries()
    return resume and not RunFolder(out).state_path.exists()


def save_or_check_job(out: Path, p: dict, stack_paths: list[Path], *, resume: bool) -> None:
    """A new run saves ``job.json``; ``--continue`` checks the data against it.

    Raises
    ------
    InputError
        ``--continue`` on another particle file, or a particle file or stack that changed.
    """
    now = input_fingerprint(p["particles"], stack_paths)
    job = load_job(out) if resume else None
    if job is not None and "fingerprint" in job:
        check_fingerprint(job["fingerprint"], now, out)
        return
    options = {k: _saved_value(k, v) for k, v in p.items() if k not in _INVOCATION}
    save_job(out, {"inputs": {"particles": options["particles"],
                              "references": options["reference"]},
                   "options": options, "fingerprint": now, "cwd": os.getcwd(),
                   "command_line": sys.argv})


def discard_failed_run(out: Path) -> None:
    """Remove what a new run that failed before its first iteration left in ``out``.

    Its outputs (the saved job, temporaries, log) are removed: nothing is left.
    """
    if RunFolder(out).state_path.exists() or not out.is_dir():
        return
    clear_refine_outputs(out)
