"""Sampling of poses: steps from the resolution and direction grids.

Thesis eq. 4.20: angular step ``ΔΦ = asin(Tmax / (N·Ts))``; eq. 4.21: shift
step ``Δs = Tmax / (2·Ts)`` px (at most half the search radius); ``Tmax`` resolution limit (Å), ``Ts`` pixel
size (Å/px), ``N`` box size (px).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from swiftalign.symmetry import in_asymmetric_unit

__all__ = [
    "DEFAULT_MAX_SHIFT_PX",
    "Sampling",
    "plan_sampling",
    "angular_step_deg",
    "shift_step_px",
    "fibonacci_directions",
    "gallery_directions",
    "directions_to_rot_tilt",
    "shift_grid_px",
    "psi_angles_deg",
]

#: Default shift search radius (px) of ``align``/``refine``; ``simulate`` draws no shift beyond it.
DEFAULT_MAX_SHIFT_PX = 8.0


@dataclass(frozen=True)
class Sampling:
    """The sampling plan of a search: steps used (from the resolution unless overridden).

    Attributes
    ----------
    angular_step_deg, psi_step_deg : float
        Direction and in-plane steps (°).
    shift_step_px, max_shift_px : float
        Shift step and range (px).
    disc_radius_fftfreq : float
        Radius of the comparison disc (cycles/px, at most 0.5).
    n_directions, n_psi, n_shifts : int
        Counts of the gallery built from it (0 until it is built).
    """

    angular_step_deg: float
    psi_step_deg: float
    shift_step_px: float
    max_shift_px: float
    disc_radius_fftfreq: float
    n_directions: int = 0
    n_psi: int = 0
    n_shifts: int = 0

    @property
    def n_poses(self) -> int:
        """Directions × in-plane angles × shifts."""
        return self.n_directions * self.n_psi * self.n_shifts

    def with_counts(self, n_directions: int, n_psi: int, n_shifts: int) -> Sampling:
        """The same plan with the counts of the gallery built from it."""
        return dataclasses.replace(self, n_directions=n_directions, n_psi=n_psi,
                                   n_shifts=n_shifts)


def plan_sampling(resolution_angstrom: float, pixel_size_angstrom: float, box_size: int, *,
                  angular_step: float | None = None, psi_step: float | None = None,
                  shift_step: float | None = None,
                  max_shift_px: float = DEFAULT_MAX_SHIFT_PX) -> Sampling:
    """Steps from the resolution (thesis eq. 4.20–4.21) unless given.

    Parameters
    ----------
    resolution_angstrom : float
        Resolution limit ``Tmax`` (Å).
    pixel_size_angstrom : float
        ``Ts`` (Å/px).
    box_size : int
        ``N`` (px).
    angular_step, psi_step, shift_step : float, optional
        Overrides (°, °, px); the in-plane step defaults to the angular step.
    max_shift_px : float
        Shift range (px).

    Returns
    -------
    Sampling
        Without counts (:meth:`Sampling.with_counts` once the gallery exists).
    """
    dphi = angular_step or angular_step_deg(resolution_angstrom, pixel_size_angstrom, box_size)
    return Sampling(
        angular_step_deg=dphi,
        psi_step_deg=psi_step or dphi,
        shift_step_px=shift_step or shift_step_px(resolution_angstrom, pixel_size_angstrom,
                                                  max_shift_px),
        max_shift_px=max_shift_px,
        disc_radius_fftfreq=min(pixel_size_angstrom / resolution_angstrom, 0.5),
    )


def angular_step_deg(resolution_angstrom: float, pixel_size_angstrom: float, box_size: int) -> float:
    """Angular step ``asin(Tmax / (N·Ts))`` in degrees (thesis eq. 4.20).

    Raises
    ------
    ValueError
        If the resolution is not positive.
    """
    if resolution_angstrom <= 0:
        raise ValueError(f"resolution must be positive, got {resolution_angstrom} Å")
    ratio = min(1.0, resolution_angstrom / (box_size * pixel_size_angstrom))
    return math.degrees(math.asin(ratio))


def shift_step_px(resolution_angstrom: float, pixel_size_angstrom: float,
                  max_shift_px: float | None = None) -> float:
    """Shift step ``Tmax / (2·Ts)`` in px (thesis eq. 4.21), at most ``max_shift_px / 2``.

    At low resolution the thesis step exceeds the search range (30 Å at 1.6 Å/px:
    9.4 px against 8 px) and a grid of that spacing holds only the zero shift;
    the cap keeps at least the shifts ``0, ±max/2, ±max`` along each axis, so the
    global search samples the range whatever the resolution.

    Parameters
    ----------
    resolution_angstrom : float
        ``Tmax`` (Å).
    pixel_size_angstrom : float
        ``Ts`` (Å/px).
    max_shift_px : float, optional
        Search radius (px); None or 0: no cap.

    Returns
    -------
    float
        Step (px).
    """
    step = resolution_angstrom / (2.0 * pixel_size_angstrom)
    if max_shift_px is not None and max_shift_px > 0:
        step = min(step, max_shift_px / 2.0)
    return step


def fibonacci_directions(n: int) -> np.ndarray:
    """`(n, 3)` quasi-uniform unit vectors on the sphere (Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    golden = math.pi * (3.0 - math.sqrt(5.0))
    phi = golden * np.arange(n)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _perturb(directions: np.ndarray, max_angle_rad: float, rng: np.random.Generator) -> np.ndarray:
    """Tilt each direction by a uniform random angle up to ``max_angle_rad``."""
    if max_angle_rad <= 0:
        return directions
    helper = np.where(np.abs(directions[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
    e1 = np.cross(directions, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(directions, e1)
    azimuth = rng.uniform(0, 2 * math.pi, len(directions))[:, None]
    angle = rng.uniform(0, max_angle_rad, len(directions))[:, None]
    tangent = np.cos(azimuth) * e1 + np.sin(azimuth) * e2
    out = np.cos(angle) * directions + np.sin(angle) * tangent
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def gallery_directions(
    step_deg: float,
    group: np.ndarray,
    *,
    rng: np.random.Generator | None = None,
    perturbation_deg: float | None = None,
) -> np.ndarray:
    """Projection directions covering the asymmetric unit at a given step.

    A Fibonacci lattice with one point per ``ΔΦ²`` of solid angle is kept where
    it falls in the asymmetric unit, then each direction is tilted at random
    by up to ``perturbation_deg`` (default ``ΔΦ/4``; thesis §4.3).

    Parameters
    ----------
    step_deg : float
        Angular step ``ΔΦ`` in degrees.
    group : np.ndarray
        `(G, 3, 3)` symmetry matrices.
    rng : np.random.Generator, optional
        Source of the perturbation (none when omitted).
    perturbation_deg : float, optional
        Maximum perturbation angle; default ``step_deg / 4``.

    Returns
    -------
    np.ndarray
        `(n, 3)` unit vectors.
    """
    step = math.radians(step_deg)
    n_sphere = max(int(math.ceil(4.0 * math.pi / step**2)), len(group) * 4)
    dirs = fibonacci_directions(n_sphere)
    dirs = dirs[in_asymmetric_unit(dirs, group)]
    if rng is not None:
        pert = step_deg / 4.0 if perturbation_deg is None else perturbation_deg
        dirs = _perturb(dirs, math.radians(pert), rng)
    return dirs


def directions_to_rot_tilt(directions: np.ndarray) -> np.ndarray:
    """RELION ``(rot, tilt)`` in degrees whose projection direction ``Aᵀ·ẑ`` is each vector.

    Parameters
    ----------
    directions : np.ndarray
        `(n, 3)` unit vectors.

    Returns
    -------
    np.ndarray
        `(n, 2)` degrees.
    """
    rot = np.degrees(np.arctan2(directions[:, 1], directions[:, 0]))
    tilt = np.degrees(np.arccos(np.clip(directions[:, 2], -1.0, 1.0)))
    return np.stack([rot, tilt], axis=1)


def psi_angles_deg(step_deg: float) -> np.ndarray:
    """In-plane angles ``0, Δψ, …`` covering 360° with ``Δψ <= step_deg``."""
    n = max(1, int(math.ceil(360.0 / step_deg - 1e-9)))
    return np.arange(n) * (360.0 / n)


def shift_grid_px(max_shift_px: float, step_px: float) -> np.ndarray:
    """Shifts on a square grid of spacing ``step_px`` within a disc of radius ``max_shift_px``.

    Returns
    -------
    np.ndarray
        `(S, 2)` shifts ``(y, x)`` in px, ``(0, 0)`` first.
    """
    if step_px <= 0:
        raise ValueError(f"shift step must be positive, got {step_px} px")
    n = int(math.floor(max_shift_px / step_px + 1e-9))
    ax = np.arange(-n, n + 1) * step_px
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    grid = np.stack([yy.ravel(), xx.ravel()], axis=1)
    grid = grid[np.hypot(grid[:, 0], grid[:, 1]) <= max_shift_px + 1e-9]
    order = np.argsort(np.hypot(grid[:, 0], grid[:, 1]), kind="stable")
    return grid[order]
