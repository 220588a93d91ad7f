"""Consensus of repeated alignments of the same particle (thesis §4.3).

Rotations are averaged as quaternions by the principal eigenvector of
``Σ q qᵀ`` (Markley et al. 2007, J. Guid. Control Dyn. 30:1193), after each
repetition's rotation is replaced by its symmetry-equivalent closest to the
first repetition's, so that symmetry mates do not average to nonsense. A
particle is kept when more than half of the repetitions lie within
``angle_tolerance_deg`` of the mean rotation, more than half of the shifts
within ``shift_tolerance_px`` of their centroid, and more than half vote for
the same class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from swiftalign.conventions import angular_distance_deg, euler_to_matrix, matrix_to_euler
from swiftalign.symmetry import equivalent_poses

__all__ = ["Consensus", "consensus"]


@dataclass
class Consensus:
    """Per-particle consensus.

    Attributes
    ----------
    euler_deg : np.ndarray
        `(n, 3)` mean pose.
    shift_yx_px : np.ndarray
        `(n, 2)` mean shift.
    class_index : np.ndarray
        `(n,)` majority class (0-based).
    keep : np.ndarray
        `(n,)` bool.
    angular_spread_deg : np.ndarray
        `(n,)` median angle of the repetitions to the mean.
    shift_spread_px : np.ndarray
        `(n,)` median distance of the shifts to their centroid.
    """

    euler_deg: np.ndarray
    shift_yx_px: np.ndarray
    class_index: np.ndarray
    keep: np.ndarray
    angular_spread_deg: np.ndarray
    shift_spread_px: np.ndarray


def consensus(
    euler_deg: np.ndarray,
    shift_yx_px: np.ndarray,
    class_index: np.ndarray,
    *,
    symmetry_group: np.ndarray,
    angle_tolerance_deg: float,
    shift_tolerance_px: float,
) -> Consensus:
    """Combine ``R`` alignments per particle.

    Parameters
    ----------
    euler_deg : np.ndarray
        `(n, R, 3)` RELION angles of each repetition.
    shift_yx_px : np.ndarray
        `(n, R, 2)` shifts.
    class_index : np.ndarray
        `(n, R)` int classes.
    symmetry_group : np.ndarray
        `(G, 3, 3)` symmetry matrices.
    angle_tolerance_deg, shift_tolerance_px : float
        Agreement thresholds (ΔΦ and Δs of the iteration).

    Returns
    -------
    Consensus
    """
    n, reps, _ = euler_deg.shape
    mats = euler_to_matrix(euler_deg)  # (n, R, 3, 3)
    anchor = mats[:, :1]  # (n, 1, 3, 3)
    mates = equivalent_poses(mats, symmetry_group)  # (n, R, G, 3, 3): A·gᵀ
    d = angular_distance_deg(mates, anchor[:, :, None])  # (n, R, G)
    best = np.argmin(d, axis=2)
    aligned = np.take_along_axis(mates, best[..., None, None, None], axis=2)[:, :, 0]
    quats = Rotation.from_matrix(aligned.reshape(-1, 3, 3)).as_quat().reshape(n, reps, 4)
    m = np.einsum("nri,nrj->nij", quats, quats)
    _, vecs = np.linalg.eigh(m)
    mean_q = vecs[:, :, -1]
    mean = Rotation.from_quat(mean_q).as_matrix()
    ang = angular_distance_deg(aligned, mean[:, None])  # (n, R)
    centroid = shift_yx_px.mean(axis=1)
    sd = np.linalg.norm(shift_yx_px - centroid[:, None], axis=-1)
    counts = np.stack([(class_index == c).sum(axis=1) for c in range(int(class_index.max()) + 1)],
                      axis=1)
    majority = counts.argmax(axis=1)
    half = reps / 2.0
    keep = ((ang <= angle_tolerance_deg).sum(1) > half) & ((sd <= shift_tolerance_px).sum(1) > half)
    keep &= counts.max(axis=1) > half
    return Consensus(
        euler_deg=matrix_to_euler(mean),
        shift_yx_px=centroid,
        class_index=majority,
        keep=keep,
        angular_spread_deg=np.median(ang, axis=1),
        shift_spread_px=np.median(sd, axis=1),
    )
