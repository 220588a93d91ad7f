"""``swiftalign``: fast cryo-EM particle alignment (simulate, align, evaluate)."""

from __future__ import annotations

import typer

from swiftalign.cli import align, evaluate, index, refine, simulate

app = typer.Typer(
    name="swiftalign",
    help="Fast cryo-EM particle alignment by nearest-neighbour search over compressed "
    "Fourier-coefficient vectors (RELION STAR + MRC in and out).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("simulate", help=simulate.__doc__)(simulate.simulate_command)
app.command("align", help=align.__doc__)(align.align_command)
app.command("evaluate", help=evaluate.__doc__)(evaluate.evaluate_command)
app.command("refine", help=refine.__doc__)(refine.refine_command)
app.add_typer(index.index_app, name="index", help=index.__doc__)


if __name__ == "__main__":
    app()
