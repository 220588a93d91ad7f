"""JSON records (``run.json``, ``state.json``) written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from swiftalign.io.atomic import atomic_write

__all__ = ["write_json"]


def _jsonable(obj: Any) -> Any:
    """Numpy scalars and arrays as Python values, paths and anything else as strings."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON to a temporary name, then rename it to ``path``.

    Parameters
    ----------
    path : Path
        Destination.
    data : dict
        JSON-able data; numpy values become Python values, other objects strings.
    """
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
