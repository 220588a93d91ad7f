"""``python -m swiftalign`` runs the command-line interface."""

from swiftalign.cli.main import app

app()
