"""Compare aligned poses with ground truth: angular error (symmetry-aware) and shift error."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from swiftalign.cli._common import USER_ERRORS, fail, setup_logging, write_json


def print_summary(summary: dict, title: str = "pose errors") -> None:
    """Print a summary table to stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("quantity")
    for col in ("median", "mean", "p90"):
        table.add_column(col, justify="right")
    for key, label in (
        ("angular_error_deg", "angular error (°)"),
        ("shift_error_angstrom", "shift error (Å)"),
        ("shift_error_px", "shift error (px)"),
    ):
        v = summary[key]
        table.add_row(label, f"{v['median']:.2f}", f"{v['mean']:.2f}", f"{v['p90']:.2f}")
    Console().print(table)
    if "fraction_within_step" in summary:
        print(f"fraction within ΔΦ = {summary['angular_step_deg']:.2f}°: "
              f"{summary['fraction_within_step']:.3f}")


def evaluate_command(
    aligned: Annotated[Path, typer.Argument(help="STAR (or cryoSPARC .cs) file with assigned poses.")],
    truth: Annotated[Path, typer.Option(help="STAR (or cryoSPARC .cs) file with the true poses.")],
    symmetry: Annotated[str, typer.Option(help="Point group of the map.")] = "C1",
    angular_step: Annotated[float | None, typer.Option(
        help="ΔΦ (°) for the fraction-within-step figure.")] = None,
    angpix: Annotated[float | None, typer.Option(help="Pixel size (Å) when the STAR has "
                                                 "none.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the summary and "
                                                  "per-particle errors as JSON.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    from swiftalign.evaluate import compare_tables
    from swiftalign.io.star import read_particles

    setup_logging(False, quiet)
    try:
        a = read_particles(aligned, angpix=angpix)
        t = read_particles(truth, angpix=angpix)
        errors = compare_tables(a, t, symmetry=symmetry, angular_step_deg=angular_step)
    except USER_ERRORS as exc:
        fail(exc)
    summary = errors.summary()
    if not quiet:
        print_summary(summary)
    if json_out is not None:
        write_json(json_out, {"summary": summary,
                              "angular_error_deg": errors.angular_error_deg,
                              "shift_error_angstrom": errors.shift_error_angstrom})
