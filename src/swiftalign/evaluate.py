"""Errors of assigned poses against ground truth.

Angular error: the geodesic angle between the assigned rotation and the
closest symmetry-equivalent true rotation (``A_true·gᵀ`` for every ``g`` of
the group). Shift error: distance between assigned and true particle centres,
in Å and px.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from swiftalign.conventions import angular_distance_deg, euler_to_matrix
from swiftalign.errors import InputError
from swiftalign.io.star import ParticleTable, parse_image_name
from swiftalign.symmetry import equivalent_poses, symmetry_matrices

__all__ = ["symmetric_angular_error_deg", "PoseErrors", "compare_tables", "print_summary",
           "summarise"]


def symmetric_angular_error_deg(
    euler_a_deg: np.ndarray, euler_b_deg: np.ndarray, symmetry: str = "C1"
) -> np.ndarray:
    """Smallest angle between poses over symmetry-equivalent orientations.

    Parameters
    ----------
    euler_a_deg, euler_b_deg : np.ndarray
        `(n, 3)` RELION Euler angles in degrees.
    symmetry : str
        Point group of the map.

    Returns
    -------
    np.ndarray
        `(n,)` degrees in [0, 180].
    """
    a = euler_to_matrix(euler_a_deg)
    b = euler_to_matrix(euler_b_deg)
    b_eq = equivalent_poses(b, symmetry_matrices(symmetry))  # (n, G, 3, 3): A_b · gᵀ
    return angular_distance_deg(a[:, None], b_eq).min(axis=1)


@dataclass
class PoseErrors:
    """Per-particle errors and their summary."""

    angular_error_deg: np.ndarray
    shift_error_angstrom: np.ndarray
    shift_error_px: np.ndarray
    angular_step_deg: float | None = None

    def summary(self) -> dict:
        """Median, mean and 90th percentile of each error (see :func:`summarise`)."""
        return summarise(self.angular_error_deg, self.shift_error_angstrom,
                         self.shift_error_px, self.angular_step_deg)


def summarise(
    angular_error_deg: np.ndarray,
    shift_error_angstrom: np.ndarray,
    shift_error_px: np.ndarray,
    angular_step_deg: float | None = None,
) -> dict:
    """Median, mean, 90th percentile (and fraction within ΔΦ) of the errors."""
    out = {"n_particles": int(len(angular_error_deg))}
    for name, v in (
        ("angular_error_deg", angular_error_deg),
        ("shift_error_angstrom", shift_error_angstrom),
        ("shift_error_px", shift_error_px),
    ):
        out[name] = {
            "median": float(np.median(v)),
            "mean": float(np.mean(v)),
            "p90": float(np.percentile(v, 90)),
        }
    if angular_step_deg:
        out["angular_step_deg"] = float(angular_step_deg)
        out["fraction_within_step"] = float(np.mean(angular_error_deg <= angular_step_deg))
    return out


def _poses(table: ParticleTable) -> tuple[np.ndarray, np.ndarray]:
    df = table.particles
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    missing = [c for c in cols if c not in df]
    if missing:
        raise InputError(f"{table.path}: particle block has no '{missing[0]}'")
    euler = df[cols].to_numpy(np.float64)
    return euler, table.origins_shift_px()


def compare_tables(
    aligned: ParticleTable,
    truth: ParticleTable,
    *,
    symmetry: str = "C1",
    angular_step_deg: float | None = None,
) -> PoseErrors:
    """Errors of ``aligned`` against ``truth``.

    Particles are matched by ``rlnImageName``; when the names differ (e.g. the
    truth STAR was the ``--ang`` input of ``relion_project``) but both files
    hold the same number of particles, they are matched row by row, with a
    warning.

    Raises
    ------
    InputError
        When particles can be matched neither by name nor by row.
    """
    ea, sa = _poses(aligned)
    et, st = _poses(truth)
    def keys(table: ParticleTable) -> list[str]:
        out = []
        for name in table.image_names():
            try:
                idx, path = parse_image_name(name, table.path.parent)
                out.append(f"{idx}@{path.resolve()}")
            except InputError:
                out.append(name.strip())
        return out

    names_a = keys(aligned)
    pos = {name: i for i, name in enumerate(keys(truth))}
    missing = [n for n in names_a if n not in pos]
    if not missing:
        idx = np.array([pos[n] for n in names_a])
    elif len(names_a) == len(pos):
        warnings.warn(
            f"{aligned.path}: image names differ from {truth.path} (e.g. {missing[0]!r}); "
            "matching particles row by row",
            stacklevel=2,
        )
        idx = np.arange(len(names_a))
    else:
        raise InputError(
            f"{aligned.path}: particle {missing[0]!r} is not in {truth.path}, and the files "
            f"hold {len(names_a)} and {len(pos)} particles"
        )
    ang = symmetric_angular_error_deg(ea, et[idx], symmetry)
    shift_px = np.hypot(*(sa - st[idx]).T)
    ps = aligned.pixel_size_angstrom
    return PoseErrors(ang, shift_px * ps, shift_px, angular_step_deg)


def print_summary(summary: dict, title: str = "pose errors") -> None:
    """Print a :func:`summarise` result as a table (median, mean, p90) to stdout."""
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
