"""Compare aligned poses with ground truth: angular error (symmetry-aware) and shift error.

Prints the summary. With -o DIR, writes DIR/NAME_evaluate.json (summary and
per-particle errors), DIR/NAME_errors.png (error histograms), DIR/NAME_evaluate.log
and DIR/NAME_evaluate_run.json, NAME being the aligned STAR's name; with DIR the
align output folder, `swiftalign report DIR` shows them with the alignment.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from swiftalign.cli._common import (
    USER_ERRORS,
    QuietOption,
    VerboseOption,
    fail,
    setup_logging,
    write_json,
    write_run_json,
)


def evaluate_command(
    aligned: Annotated[Path, typer.Argument(
        help="STAR (or cryoSPARC .cs) file with assigned poses (rlnAngleRot/Tilt/Psi in °, "
        "rlnOriginX/YAngst in Å).")],
    truth: Annotated[Path, typer.Option(help="STAR (or cryoSPARC .cs) file with the true poses "
                                        "(particles matched by rlnImageName).")],
    symmetry: Annotated[str, typer.Option(
        help="Point group of the map (C1, Cn, Dn, T, O, I): symmetry-equivalent poses have "
        "no error.")] = "C1",
    angular_step: Annotated[float | None, typer.Option(
        help="ΔΦ (°) for the fraction-within-step figure.")] = None,
    angpix: Annotated[float | None, typer.Option(help="Pixel size (Å) when the STAR has "
                                                 "none.")] = None,
    output_dir: Annotated[Path | None, typer.Option(
        "-o", "--output-dir", help="Folder for NAME_evaluate.json, NAME_errors.png (histograms "
        "of angular error in ° and shift error in Å), the log and run.json.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the summary and "
                                                  "per-particle errors as JSON here.")] = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """``swiftalign evaluate`` (help: the module docstring)."""
    from swiftalign.evaluate import compare_tables, print_summary
    from swiftalign.io.star import read_particles

    t0 = time.perf_counter()
    stem = Path(aligned).stem
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        fail(ValueError(f"-o {output_dir} is a file; give a folder"))
    setup_logging(verbose, quiet,
                  Path(output_dir) / f"{stem}_evaluate.log" if output_dir is not None else None)
    try:
        a = read_particles(aligned, angpix=angpix)
        t = read_particles(truth, angpix=angpix)
        errors = compare_tables(a, t, symmetry=symmetry, angular_step_deg=angular_step)
    except USER_ERRORS as exc:
        fail(exc)
    summary = errors.summary()
    logging.getLogger("swiftalign.evaluate").info("%s vs %s: %s", aligned, truth, summary)
    if not quiet:
        print_summary(summary)
    data = {"summary": summary, "aligned": str(aligned), "truth": str(truth),
            "symmetry": symmetry, "angular_error_deg": errors.angular_error_deg,
            "shift_error_angstrom": errors.shift_error_angstrom}
    outputs: dict[str, str] = {}
    try:
        if json_out is not None:
            write_json(json_out, data)
            outputs["json"] = str(json_out)
        if output_dir is not None:
            from swiftalign.plots import pose_error_figure, save_figure

            out = Path(output_dir)
            write_json(out / f"{stem}_evaluate.json", data)
            save_figure(pose_error_figure(errors.angular_error_deg, errors.shift_error_angstrom,
                                          angular_step_deg=angular_step,
                                          title=f"{Path(aligned).name} vs {Path(truth).name}"),
                        out / f"{stem}_errors.png")
            outputs.update(evaluate=str(out / f"{stem}_evaluate.json"),
                           errors_plot=str(out / f"{stem}_errors.png"))
    except OSError as exc:
        fail(exc)
    if outputs:
        run_json = (Path(output_dir) / f"{stem}_evaluate_run.json" if output_dir is not None
                    else Path(json_out).with_name(Path(json_out).stem + "_run.json"))
        write_run_json(run_json, started=t0,
            command="evaluate", parameters={"symmetry": symmetry, "angular_step_deg": angular_step,
                                            "angpix": angpix},
            inputs={"aligned": str(aligned), "truth": str(truth)}, outputs=outputs,
            summary=summary)
