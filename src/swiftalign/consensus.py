"""Consensus of repeated alignments of the same particle (thesis §4.3).

Rotations are averaged as quaternions by the principal eigenvector of
``Σ q qᵀ`` (Markley et al. 2007, J. Guid. Control Dyn. 30:1193), after each
repetition's rotation is replaced by its symmetry-equivalent closest to the
anchor repetition's, so that symmetry mates do not average to nonsense. A
particle is kept when more than half of the repetitions lie within
``angle_tolerance_deg`` of the mean rotation, more than half of the shifts
within ``shift_tolerance_px`` of their centroid, and more than half vote for
the same class.

Symmetry the user did not impose: given a near-symmetry of the map
(:func:`swiftalign.symmetry.detect_near_symmetry`, the imposed group closed with
the rotations the map almost has), repetitions that agree up to one of its
operators agree, and the anchor is the best-scoring repetition (smallest
distance): the particle takes that repetition's pose (averaged with the other
repetitions' mates closest to it) instead of being rejected. Without one, the
anchor is the first repetition, as before. Rejected particles get one reason,
the first test they fail in the order classes, poses, shifts
(:data:`REJECTION_REASONS`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from swiftalign.conventions import angular_distance_deg, euler_to_matrix, matrix_to_euler
from swiftalign.symmetry import NearSymmetry, detect_near_symmetry, equivalent_poses

__all__ = ["Consensus", "consensus", "consensus_summary", "near_symmetry_of_references",
           "REJECTION_REASONS"]

log = logging.getLogger(__name__)

#: Why a particle was rejected (``Consensus.reason`` 1, 2, 3; 0 is kept).
REJECTION_REASONS = ("classes", "poses", "shifts")


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
    reason : np.ndarray
        `(n,)` int: 0 kept, else 1 + the index in :data:`REJECTION_REASONS` of
        the first test failed (classes, poses, shifts).
    via_near_symmetry : np.ndarray
        `(n,)` bool: kept only because repetitions agree up to a near-symmetry
        operator (rejected under the imposed symmetry alone).
    """

    euler_deg: np.ndarray
    shift_yx_px: np.ndarray
    class_index: np.ndarray
    keep: np.ndarray
    angular_spread_deg: np.ndarray
    shift_spread_px: np.ndarray
    reason: np.ndarray
    via_near_symmetry: np.ndarray


def _mean_rotation(mats: np.ndarray, anchor: np.ndarray,
                   group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quaternion mean of the repetitions' mates closest to the anchor repetition's pose.

    Parameters
    ----------
    mats : np.ndarray
        `(n, R, 3, 3)` RELION matrices.
    anchor : np.ndarray
        `(n,)` int, the anchor repetition of each particle.
    group : np.ndarray
        `(G, 3, 3)` symmetry matrices.

    Returns
    -------
    (np.ndarray, np.ndarray)
        `(n, 3, 3)` mean matrices and `(n, R)` angles of the mates to the mean (°).
    """
    n, reps = mats.shape[:2]
    ref = mats[np.arange(n), anchor][:, None]  # (n, 1, 3, 3)
    mates = equivalent_poses(mats, group)  # (n, R, G, 3, 3): A·gᵀ
    d = angular_distance_deg(mates, ref[:, :, None])  # (n, R, G)
    best = np.argmin(d, axis=2)
    aligned = np.take_along_axis(mates, best[..., None, None, None], axis=2)[:, :, 0]
    quats = Rotation.from_matrix(aligned.reshape(-1, 3, 3)).as_quat().reshape(n, reps, 4)
    m = np.einsum("nri,nrj->nij", quats, quats)
    _, vecs = np.linalg.eigh(m)
    mean = Rotation.from_quat(vecs[:, :, -1]).as_matrix()
    return mean, angular_distance_deg(aligned, mean[:, None])


def consensus(
    euler_deg: np.ndarray,
    shift_yx_px: np.ndarray,
    class_index: np.ndarray,
    *,
    symmetry_group: np.ndarray,
    angle_tolerance_deg: float,
    shift_tolerance_px: float,
    distance: np.ndarray | None = None,
    near_symmetry_group: np.ndarray | None = None,
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
        `(G, 3, 3)` the imposed symmetry matrices.
    angle_tolerance_deg, shift_tolerance_px : float
        Agreement thresholds (ΔΦ and Δs of the iteration).
    distance : np.ndarray, optional
        `(n, R)` each repetition's distance (smaller is better); with a
        near-symmetry the best repetition is the anchor.
    near_symmetry_group : np.ndarray, optional
        `(G', 3, 3)` the imposed group closed with a near-symmetry of the map
        (:attr:`swiftalign.symmetry.NearSymmetry.group`); None: only the
        imposed symmetry (the first repetition is the anchor).

    Returns
    -------
    Consensus
    """
    n, reps, _ = euler_deg.shape
    mats = euler_to_matrix(euler_deg)  # (n, R, 3, 3)
    first = np.zeros(n, dtype=int)
    mean, ang = _mean_rotation(mats, first, symmetry_group)
    half = reps / 2.0
    pose_ok = (ang <= angle_tolerance_deg).sum(1) > half
    imposed_ok = pose_ok
    if near_symmetry_group is not None:
        anchor = first if distance is None else np.argmin(distance, axis=1)
        near_mean, near_ang = _mean_rotation(mats, anchor, near_symmetry_group)
        near_ok = (near_ang <= angle_tolerance_deg).sum(1) > half
        use = near_ok | ~imposed_ok  # agreeing under the imposed group alone stays as before
        mean = np.where(use[:, None, None], near_mean, mean)
        ang = np.where(use[:, None], near_ang, ang)
        pose_ok = near_ok | imposed_ok
    centroid = shift_yx_px.mean(axis=1)
    sd = np.linalg.norm(shift_yx_px - centroid[:, None], axis=-1)
    counts = np.stack([(class_index == c).sum(axis=1) for c in range(int(class_index.max()) + 1)],
                      axis=1)
    class_ok = counts.max(axis=1) > half
    shift_ok = (sd <= shift_tolerance_px).sum(1) > half
    keep = class_ok & pose_ok & shift_ok
    reason = np.select([~class_ok, ~pose_ok, ~shift_ok], [1, 2, 3], default=0)
    return Consensus(
        euler_deg=matrix_to_euler(mean),
        shift_yx_px=centroid,
        class_index=counts.argmax(axis=1),
        keep=keep,
        angular_spread_deg=np.median(ang, axis=1),
        shift_spread_px=np.median(sd, axis=1),
        reason=reason,
        via_near_symmetry=keep & ~imposed_ok,
    )


def consensus_summary(cons: Consensus) -> dict:
    """The history record's consensus figures.

    Returns
    -------
    dict
        ``kept_fraction``, ``rejected_by`` (reason → particles, each rejected
        particle counted once, :data:`REJECTION_REASONS`) and
        ``kept_by_near_symmetry`` (kept only thanks to a near-symmetry).
    """
    return {
        "kept_fraction": float(cons.keep.mean()) if len(cons.keep) else 0.0,
        "rejected_by": {name: int((cons.reason == i + 1).sum())
                        for i, name in enumerate(REJECTION_REASONS)},
        "kept_by_near_symmetry": int(cons.via_near_symmetry.sum()),
    }


def _same_group(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two `(G, 3, 3)` groups hold the same matrices (as sets, to 1e-3)."""
    if len(a) != len(b):
        return False
    return all(np.abs(b - g).max(axis=(1, 2)).min() < 1e-3 for g in a)


def near_symmetry_of_references(references: dict[tuple[int, int], np.ndarray],
                                imposed_group: np.ndarray, *, pixel_size_angstrom: float,
                                resolution_angstrom: float) -> NearSymmetry | None:
    """The near-symmetry of the current references (logged), or None.

    Each class's two half references are averaged and searched
    (:func:`swiftalign.symmetry.detect_near_symmetry`); with several classes the
    near-symmetry is used only when every class has the same one.

    Parameters
    ----------
    references : dict
        ``(class, half)`` → `(N, N, N)` reference.
    imposed_group : np.ndarray
        `(G, 3, 3)` the imposed symmetry.
    pixel_size_angstrom, resolution_angstrom : float
        Voxel size and the resolution of the comparison (Å).

    Returns
    -------
    NearSymmetry or None
    """
    found = []
    for c in sorted({c for c, _ in references}):
        mean = 0.5 * (references[(c, 1)] + references[(c, 2)])
        found.append(detect_near_symmetry(mean, imposed_group,
                                          pixel_size_angstrom=pixel_size_angstrom,
                                          resolution_angstrom=resolution_angstrom))
    first = found[0]
    if first is None or not all(f is not None and _same_group(f.group, first.group)
                                for f in found[1:]):
        if any(f is not None for f in found):
            log.info("near-symmetries differ between classes: none used (%s)",
                     "; ".join(f"class {i + 1}: {f.describe() if f else 'none'}"
                               for i, f in enumerate(found)))
        return None
    log.info("%s: repetitions agreeing up to it are kept", first.describe())
    return first
