"""Select particles by score range, top fraction or class into a new STAR file.

Keeps min-score <= value <= max-score of --column (default rlnSwiftalignScore,
written by align), then the --top-fraction highest of those, of class --class
(rlnClassNumber) when given. Writes RELION 3.1 STAR with the input's optics
block and every column, plus OUTPUT.log and OUTPUT_run.json.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from swiftalign.cli._common import (
    USER_ERRORS,
    AngpixOption,
    QuietOption,
    VerboseOption,
    console,
    fail,
    setup_logging,
    write_run_json,
)


def select_command(
    particles: Annotated[Path, typer.Argument(
        help="Particle STAR file (RELION 3.0 or 3.1+) or cryoSPARC .cs file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output STAR file.")],
    min_score: Annotated[float | None, typer.Option(
        help="Keep particles with --column >= this value.")] = None,
    max_score: Annotated[float | None, typer.Option(
        help="Keep particles with --column <= this value.")] = None,
    top_fraction: Annotated[float | None, typer.Option(
        help="Keep this fraction (0–1] of the particles, highest --column first (after the "
        "other criteria).")] = None,
    class_number: Annotated[int | None, typer.Option(
        "--class", help="Keep particles of this class (rlnClassNumber, from 1).")] = None,
    column: Annotated[str, typer.Option(
        help="Column the score range and top fraction apply to.")] = "rlnSwiftalignScore",
    angpix: AngpixOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """``swiftalign select`` (help: the module docstring)."""
    from swiftalign.io.star import read_particles
    from swiftalign.selection import select_particles, write_selection

    output = Path(output)
    t0 = time.perf_counter()
    try:
        if output.is_dir():
            raise ValueError(f"-o {output} is a folder; give a STAR file name")
        table = read_particles(particles, angpix=angpix)
        keep = select_particles(table, column=column, min_value=min_score, max_value=max_score,
                                top_fraction=top_fraction, class_number=class_number)
        setup_logging(verbose, quiet, output.with_name(output.stem + ".log"))
        n_kept = write_selection(output, table, keep)
    except USER_ERRORS as exc:
        fail(exc)
    write_run_json(output.with_name(output.stem + "_run.json"), started=t0,
        command="select",
        parameters={"column": column, "min_score": min_score, "max_score": max_score,
                    "top_fraction": top_fraction, "class": class_number},
        inputs={"particles": str(particles)}, outputs={"particles": str(output.resolve())},
        n_particles=len(table), n_kept=n_kept)
    if not quiet:
        console.print(f"kept {n_kept} of {len(table)} particles → {output}")
