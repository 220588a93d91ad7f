"""Export a particle file for another program: a cryoSPARC .cs file or a ChimeraX .bild.

--to cryosparc writes a cryoSPARC particle .cs file (cryosparc-tools' Dataset,
numpy format) with blob/…, ctf/… and, where the particles have poses,
alignments3D/pose (axis-angle, rad), shift (px), psize_A, split and class; stack
paths are relative to the .cs file's folder (--absolute-paths: absolute). --to bild writes the angular
distribution as relion_refine's *_angdist.bild (cylinders per direction bin,
length ∝ count) for ChimeraX. Also writes OUTPUT.log and OUTPUT_run.json.
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

_SUFFIXES = {"cryosparc": ".cs", "bild": ".bild"}


def export_command(
    particles: Annotated[Path, typer.Argument(
        help="Particle STAR file (RELION 3.0 or 3.1+) or cryoSPARC .cs file.")],
    to: Annotated[str, typer.Option(
        "--to", help="cryosparc (.cs particle file) or bild (angular distribution for "
        "ChimeraX).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file.")],
    absolute_paths: Annotated[bool, typer.Option(
        help="cryosparc: absolute stack paths in blob/path (default: relative to the .cs "
        "file's folder).")] = False,
    sign: Annotated[int, typer.Option(
        help="cryosparc: blob/sign, +1 for white protein (RELION particles, extracted with "
        "--invert_contrast) or -1 for dark protein (raw micrograph contrast).")] = 1,
    bin_size: Annotated[float, typer.Option(
        "--bin", help="bild: spacing of the direction bins (°).")] = 7.5,
    angpix: AngpixOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """``swiftalign export`` (help: the module docstring)."""
    from swiftalign.export import write_bild, write_cryosparc
    from swiftalign.io.star import read_particles

    output = Path(output)
    t0 = time.perf_counter()
    try:
        if to not in _SUFFIXES:
            raise ValueError(f"--to {to}: choose cryosparc or bild")
        if output.is_dir():
            raise ValueError(f"-o {output} is a folder; give a {_SUFFIXES[to]} file name")
        if output.resolve() == Path(particles).resolve():
            raise ValueError(f"-o {output} is the input file; give another name")
        if to == "bild" and not bin_size > 0:
            raise ValueError(f"--bin {bin_size}: the direction bin must be positive (°)")
        table = read_particles(particles, angpix=angpix)
        setup_logging(verbose, quiet, output.with_name(output.stem + ".log"))
        if to == "cryosparc":
            write_cryosparc(output, table, absolute_paths=absolute_paths, sign=sign)
        else:
            write_bild(output, table, bin_deg=bin_size)
    except USER_ERRORS as exc:
        fail(exc)
    write_run_json(output.with_name(output.stem + "_run.json"), started=t0,
        command="export", parameters={"to": to, "bin_deg": bin_size, "angpix": angpix,
                                     "absolute_paths": absolute_paths, "sign": sign},
        inputs={"particles": str(particles)}, outputs={to: str(output.resolve())},
        n_particles=len(table))
    if not quiet:
        console.print(f"exported {len(table)} particles ({to}) → {output}")
