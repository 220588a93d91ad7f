"""Write a self-contained HTML report (report.html) of a refine OUTDIR or an align output folder.

Embeds the plots (FSC curves per iteration, angular distributions, resolution
and kept fraction per iteration, pose-error histograms when an evaluation was
written with ``swiftalign evaluate -o``), the per-iteration table and the
parameters from run.json. Also writes OUTDIR/report_run.json.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from swiftalign.cli._common import (
    USER_ERRORS,
    QuietOption,
    VerboseOption,
    console,
    fail,
    setup_logging,
    write_run_json,
)


def report_command(
    run_dir: Annotated[Path, typer.Argument(
        help="Refine OUTDIR, or the folder of an align output (NAME.star + NAME_run.json).")],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="HTML file to write (default RUN_DIR/report.html).")] = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """``swiftalign report`` (help: the module docstring)."""
    from swiftalign.report import build_report, find_runs

    setup_logging(verbose, quiet)
    t0 = time.perf_counter()
    try:
        runs = find_runs(run_dir)  # checks the folder before any work
        out = build_report(run_dir, output)
    except USER_ERRORS as exc:
        fail(exc)
    write_run_json(Path(run_dir) / "report_run.json", started=t0,
        command="report", inputs={"run_dir": str(run_dir)},
        outputs={"report": str(out)},
        found={"refine": runs["refine"], "align_runs": [str(p) for p in runs["align"]]},
    )
    if not quiet:
        console.print(f"report → {out}")
