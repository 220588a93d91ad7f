"""``swiftalign``: fast cryo-EM particle alignment (simulate, align, evaluate, refine, report)."""

from __future__ import annotations

import typer

from swiftalign.cli import (
    align,
    evaluate,
    export,
    index,
    local_resolution,
    mask,
    postprocess,
    refine,
    report,
    selection,
    simulate,
)
from swiftalign.cli._guard import guarded

app = typer.Typer(
    name="swiftalign",
    help="Fast cryo-EM particle alignment by nearest-neighbour search over compressed "
    "Fourier-coefficient vectors, and gold-standard 3D refinement (RELION STAR + MRC in and "
    "out). Conventions: RELION ZYZ Euler angles (°), origins rlnOriginX/YAngst (Å), pixel "
    "sizes (Å/px), defocus (Å, underfocus positive). Each command writes a log and a run.json "
    "(parameters, versions, machine, timings) next to its outputs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("simulate", help=simulate.__doc__)(guarded(simulate.simulate_command))
app.command("align", help=align.__doc__)(guarded(align.align_command))
app.command("evaluate", help=evaluate.__doc__)(guarded(evaluate.evaluate_command))
app.command("refine", help=refine.__doc__)(guarded(refine.refine_command))
app.command("report", help=report.__doc__)(guarded(report.report_command))
app.command("export", help=export.__doc__)(guarded(export.export_command))
app.command("select", help=selection.__doc__)(guarded(selection.select_command))
app.command("mask", help=mask.__doc__)(guarded(mask.mask_command))
app.command("postprocess", help=postprocess.__doc__)(guarded(postprocess.postprocess_command))
app.command("local-resolution", help=local_resolution.__doc__)(
    guarded(local_resolution.local_resolution_command))
app.add_typer(index.index_app, name="index", help=index.__doc__)


if __name__ == "__main__":
    app()
