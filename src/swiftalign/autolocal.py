"""Which search a refinement iteration runs: global, or local around each particle's pose.

RELION's auto-refine stops searching every orientation once its angular
sampling has become fine enough and the optimal orientations stop changing;
from then on it samples only around each particle's previous pose. The same
idea here, decided before each iteration from the history of the previous ones
(:func:`choose_search`):

- iteration 1, or ``auto_local`` off: **global** (the last ``local_passes``
  iterations are local whatever happens, as before);
- the resolution of the last iteration is worse than the one before by at least
  one Fourier shell (``box·Ts/T_last − box·Ts/T_before ≤ −1``): **global**;
- more than :data:`MAX_CLASS_CHANGE` of the particles changed class in the last
  iteration: **global**;
- the last iteration was local (and neither of the above): **local** again;
- the last (global) iteration's consensus poses moved, median over the kept
  particles and symmetry-aware, by less than the angular step ΔΦ of the resolution
  the repetitions' consensus is judged at (its own agreement tolerance): **local**;
- otherwise **global**.

A local iteration searches each particle around its consensus pose and shift with
ranges from the consensus spread of the last global search, then from how far
the last local search moved the particles (:func:`local_ranges`), and steps from
the current resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from swiftalign.evaluate import symmetric_angular_error_deg

__all__ = ["MAX_CLASS_CHANGE", "SPREAD_PERCENTILE", "SearchPlan", "choose_search", "converged",
           "local_ranges", "pose_changes", "spread_summary"]

#: Fraction of particles changing class above which the search goes back to global.
MAX_CLASS_CHANGE = 0.05
#: Percentile of the kept particles' consensus spreads that sets the local ranges.
SPREAD_PERCENTILE = 75.0


@dataclass(frozen=True)
class SearchPlan:
    """The search of one iteration and why.

    Attributes
    ----------
    search : {"global", "local"}
        Search run.
    reason : str
        One short sentence (history ``search_reason``).
    """

    search: Literal["global", "local"]
    reason: str


def _shells(resolution_angstrom: float, box_angstrom: float) -> float:
    """Fourier shell index of a resolution (box size × pixel size / resolution)."""
    return box_angstrom / resolution_angstrom


def choose_search(history: list[dict], *, iteration: int, iterations: int, local_passes: int,
                  auto_local: bool, angular_step_deg: float,
                  box_angstrom: float) -> SearchPlan:
    """Global or local search for ``iteration`` (the rule of the module docstring).

    Parameters
    ----------
    history : list of dict
        Records of the completed iterations (``resolution_angstrom``, ``search``,
        ``pose_change_deg``, ``class_change_fraction``; missing keys of older runs
        count as a global search with unknown changes).
    iteration : int
        The iteration to plan (from 1).
    iterations : int
        Last iteration of the run.
    local_passes : int
        The last ``local_passes`` iterations are local whatever happens.
    auto_local : bool
        Switch automatically.
    angular_step_deg : float
        ΔΦ (°) at the resolution a global iteration's consensus is judged at (the
        repetitions' ``T_r``, :mod:`swiftalign.refinement`): poses that move less than
        that between iterations cannot be improved by another global search.
    box_angstrom : float
        Box size × pixel size (Å): one Fourier shell is ``1/box_angstrom``.

    Returns
    -------
    SearchPlan
    """
    if iteration > 1 and iteration > iterations - local_passes:
        return SearchPlan("local", f"--local-passes {local_passes}: the last iterations are "
                          "local")
    if iteration == 1 or not history:
        return SearchPlan("global", "first iteration: no poses yet")
    if not auto_local:
        return SearchPlan("global", "auto-local off")
    last = history[-1]
    res = float(last["resolution_angstrom"])
    if len(history) >= 2:
        before = float(history[-2]["resolution_angstrom"])
        if _shells(res, box_angstrom) - _shells(before, box_angstrom) <= -1.0:
            return SearchPlan("global", f"resolution fell from {before:.2f} to {res:.2f} Å "
                              "(≥ 1 shell): global")
    changed = last.get("class_change_fraction")
    if changed is not None and changed > MAX_CLASS_CHANGE:
        return SearchPlan("global", f"{100 * changed:.1f} % of particles changed class "
                          f"(> {100 * MAX_CLASS_CHANGE:g} %): global")
    if last.get("search") == "local":
        return SearchPlan("local", f"resolution held ({res:.2f} Å), classes stable: local")
    moved = last.get("pose_change_deg")
    if moved is None:
        return SearchPlan("global", "no earlier poses to compare: global")
    if moved < angular_step_deg:
        return SearchPlan("local", f"poses moved {moved:.2f}° (< step {angular_step_deg:.2f}°): "
                          "local")
    return SearchPlan("global", f"poses moved {moved:.2f}° (≥ step {angular_step_deg:.2f}°): "
                      "global")


def pose_changes(euler_deg: np.ndarray, previous_euler_deg: np.ndarray, class_index: np.ndarray,
                 previous_class_index: np.ndarray, keep: np.ndarray,
                 symmetry: str) -> tuple[float, float]:
    """How far an iteration moved the consensus: median pose change and class changes.

    Parameters
    ----------
    euler_deg, previous_euler_deg : np.ndarray
        `(n, 3)` this and the previous iteration's consensus poses (RELION, °).
    class_index, previous_class_index : np.ndarray
        `(n,)` classes (from 0).
    keep : np.ndarray
        `(n,)` bool, the particles kept this iteration (the median is over them; all
        particles when none is kept).
    symmetry : str
        Point group (poses equal up to a symmetry operator have not moved).

    Returns
    -------
    pose_change_deg : float
        Median symmetry-aware angle between the poses (°).
    class_change_fraction : float
        Fraction of all particles whose class changed.
    """
    rows = np.nonzero(keep)[0] if keep.any() else np.arange(len(keep))
    moved = symmetric_angular_error_deg(euler_deg[rows], previous_euler_deg[rows], symmetry)
    return float(np.median(moved)), float(np.mean(class_index != previous_class_index))


def spread_summary(angular_spread_deg: np.ndarray, shift_spread_px: np.ndarray,
                   keep: np.ndarray) -> tuple[float, float]:
    """The :data:`SPREAD_PERCENTILE` percentile of the kept particles' consensus spreads.

    Parameters
    ----------
    angular_spread_deg, shift_spread_px : np.ndarray
        `(n,)` consensus spreads (°, px).
    keep : np.ndarray
        `(n,)` bool, kept particles (all when none is kept).

    Returns
    -------
    angle_deg : float
    shift_px : float
    """
    rows = keep if keep.any() else np.ones(len(keep), dtype=bool)
    return (float(np.percentile(angular_spread_deg[rows], SPREAD_PERCENTILE)),
            float(np.percentile(shift_spread_px[rows], SPREAD_PERCENTILE)))


def local_ranges(history: list[dict], *, angular_step_deg: float, shift_step_px: float,
                 max_angle_deg: float, max_shift_px: float) -> tuple[float, float]:
    """Angular and shift ranges of an auto-local search.

    The spreads of the last iteration in ``history`` (``spread_deg``,
    ``spread_px``: :func:`spread_summary` of how far a global search's repetitions
    scattered, or of how far a local search moved the particles), at least one
    step of the current resolution and at most the caps (which never go below one
    step). Without a recorded spread: one step. As the particles settle the range
    shrinks to one step, so the cost of a local iteration does not grow.

    Parameters
    ----------
    history : list of dict
        Records of the completed iterations.
    angular_step_deg, shift_step_px : float
        ΔΦ (°) and Δs (px) of the current resolution.
    max_angle_deg, max_shift_px : float
        Caps (°, px).

    Returns
    -------
    angle_range_deg : float
    shift_range_px : float
    """
    angle, shift = angular_step_deg, shift_step_px
    if history and "spread_deg" in history[-1]:
        angle, shift = history[-1]["spread_deg"], history[-1]["spread_px"]
    angle = min(max(float(angle), angular_step_deg), max(max_angle_deg, angular_step_deg))
    shift = min(max(float(shift), shift_step_px), max(max_shift_px, shift_step_px))
    return angle, shift


def converged(entry: dict) -> bool:
    """Whether a refinement may stop after the iteration recorded in ``entry``.

    RELION's auto-refine stops once, with its finest (auto-local) sampling, an iteration
    neither gained resolution nor changed the hidden variables much
    (``MlOptimiser::checkConvergence``: no resolution gain and no large orientation
    changes). The same here: a local iteration (:func:`choose_search`) gained less than one
    Fourier shell (``stalled``) or its FSC never crossed the threshold (a bound at
    Nyquist, which no iteration can improve), its kept particles' poses moved by a
    median below the angular step ΔΦ it aligned with, and at most
    :data:`MAX_CLASS_CHANGE` of the particles changed class.

    Parameters
    ----------
    entry : dict
        A history entry (``search``, ``stalled``, ``resolution_is_bound``,
        ``pose_change_deg``, ``class_change_fraction``, ``angular_step_deg``).

    Returns
    -------
    bool
    """
    moved = entry.get("pose_change_deg")
    if moved is None or entry.get("search") != "local":
        return False
    no_gain = bool(entry.get("stalled")) or bool(entry.get("resolution_is_bound"))
    return (no_gain and moved < entry["angular_step_deg"]
            and (entry.get("class_change_fraction") or 0.0) <= MAX_CLASS_CHANGE)
