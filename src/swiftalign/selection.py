"""Particle subsets by score range, top fraction or class (``swiftalign select``).

The criteria given are combined: first the class and the value range, then
the top fraction of the particles left (highest values of the column first,
ties kept in file order). The subset is written as RELION 3.1 STAR with the
input's optics block and every column.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from swiftalign.errors import InputError, StarFileError

__all__ = ["DEFAULT_SCORE_COLUMN", "select_particles", "write_selection"]

#: The column ``align`` writes its score to (cosine similarity).
DEFAULT_SCORE_COLUMN = "rlnSwiftalignScore"


def _numeric(table, name: str, why: str) -> np.ndarray:
    """`(n,)` float64 values of a column, or an error naming file and column."""
    if name not in table.particles:
        raise StarFileError(f"{table.path}: particle block has no column '{name}' ({why})")
    try:
        return table.particles[name].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise StarFileError(f"{table.path}: column '{name}' is not numeric ({why})") from None


def select_particles(
    table,
    *,
    column: str = DEFAULT_SCORE_COLUMN,
    min_value: float | None = None,
    max_value: float | None = None,
    top_fraction: float | None = None,
    class_number: int | None = None,
) -> np.ndarray:
    """Which particles a selection keeps.

    Parameters
    ----------
    table : ParticleTable
    column : str
        Column the range and the top fraction apply to (default
        ``rlnSwiftalignScore``, the cosine similarity ``align`` writes).
    min_value, max_value : float, optional
        Keep ``min_value <= value <= max_value`` (NaN values never pass).
    top_fraction : float, optional
        In (0, 1]: keep the ``ceil(fraction · m)`` highest values among the
        ``m`` particles left by the other criteria.
    class_number : int, optional
        Keep ``rlnClassNumber == class_number`` (1-based, as RELION).

    Returns
    -------
    np.ndarray
        `(n,)` bool, True for the particles kept.

    Raises
    ------
    InputError
        No criterion, an empty range, a fraction outside (0, 1], or a column
        that is missing or not numeric (names file and column).
    """
    if min_value is None and max_value is None and top_fraction is None and class_number is None:
        raise InputError("give a selection: --min-score/--max-score, --top-fraction or --class")
    if min_value is not None and max_value is not None and min_value > max_value:
        raise InputError(f"--min-score {min_value} is above --max-score {max_value}")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise InputError(f"--top-fraction {top_fraction}: must be in (0, 1]")
    keep = np.ones(len(table), dtype=bool)
    if class_number is not None:
        keep &= _numeric(table, "rlnClassNumber", f"--class {class_number}") == class_number
    if min_value is not None or max_value is not None or top_fraction is not None:
        values = _numeric(table, column, "the selection column; choose one with --column")
        lo = -math.inf if min_value is None else min_value
        hi = math.inf if max_value is None else max_value
        if min_value is not None or max_value is not None:
            keep &= (values >= lo) & (values <= hi)
        if top_fraction is not None:
            candidates = np.nonzero(keep & ~np.isnan(values))[0]
            n_top = math.ceil(top_fraction * len(candidates))
            order = np.argsort(-values[candidates], kind="stable")
            keep = np.zeros(len(table), dtype=bool)
            keep[candidates[order[:n_top]]] = True
    return keep


def write_selection(path: str | Path, table, keep: np.ndarray) -> int:
    """Write the kept particles as RELION 3.1 STAR (optics block and columns kept), atomically.

    Parameters
    ----------
    path : str or Path
        Output STAR file (not the input).
    table : ParticleTable
    keep : np.ndarray
        `(n,)` bool from :func:`select_particles`.

    Returns
    -------
    int
        Particles written.

    Raises
    ------
    InputError
        No particle is kept (nothing is written) or ``path`` is the input file.
    """
    from swiftalign.export import particle_box_sizes
    from swiftalign.io.star import write_particles

    path = Path(path)
    n_kept = int(np.count_nonzero(keep))
    if n_kept == 0:
        raise InputError(f"{table.path}: no particle passes the selection (of {len(table)}); "
                         "nothing written")
    if path.resolve() == Path(table.path).resolve():
        raise InputError(f"-o {path} is the input file; give another name")
    box = int(particle_box_sizes(table)[0])
    write_particles(path, table, box_size=box, keep=keep)
    return n_kept
