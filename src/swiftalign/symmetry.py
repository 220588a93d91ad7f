"""Point-group symmetry and asymmetric units.

Groups are ``C1``, ``Cn``, ``Dn``, ``T``, ``O``, ``I`` as in RELION: ``Cn``
about z; ``Dn`` with its n-fold axis on z and a 2-fold axis on x. ``T``, ``O``
and ``I`` use the standard orientation with 2-fold (``T``, ``I``) or 4-fold
(``O``) axes along x, y and z (scipy's ``Rotation.create_group``); ``I`` has
its 5-fold axes in the xz plane (0.851, 0, 0.526). Maps in another
icosahedral setting must be rotated to this one first.

Matrices ``g`` act on map coordinates (``V(g·y) = V(y)``): the poses ``A`` and
``A·gᵀ`` give identical projections, and projection directions ``d`` and
``g·d`` are equivalent. The asymmetric unit used here is the Dirichlet cell of
a generic direction ``r``: a direction is kept when ``r`` is closer to it than
to any of its symmetry mates. It works for every group and tiles the sphere
exactly.
"""

from __future__ import annotations

import re

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = ["symmetry_matrices", "in_asymmetric_unit", "to_asymmetric_unit", "parse_symmetry"]

_REFERENCE_DIRECTION = np.array([0.17, 0.31, 0.935])
_REFERENCE_DIRECTION = _REFERENCE_DIRECTION / np.linalg.norm(_REFERENCE_DIRECTION)


def parse_symmetry(symmetry: str) -> tuple[str, int]:
    """Validate a symmetry name.

    Returns
    -------
    (str, int)
        Group letter and order (1 for T, O, I).

    Raises
    ------
    ValueError
        For anything but C<n>, D<n>, T, O, I.
    """
    s = symmetry.strip().upper()
    m = re.fullmatch(r"([CD])(\d+)", s)
    if m and int(m.group(2)) >= 1:
        return m.group(1), int(m.group(2))
    if s in ("T", "O", "I", "I2"):
        return s[0], 1
    raise ValueError(f"unknown symmetry {symmetry!r}: use C1, Cn, Dn, T, O or I")


def symmetry_matrices(symmetry: str) -> np.ndarray:
    """Rotation matrices of a point group.

    Parameters
    ----------
    symmetry : str
        ``C1``, ``C4``, ``D7``, ``T``, ``O``, ``I`` …

    Returns
    -------
    np.ndarray
        `(G, 3, 3)` float64, identity first.
    """
    letter, order = parse_symmetry(symmetry)
    if letter == "C" and order == 1:
        return np.eye(3)[None]
    if letter == "D" and order == 1:
        group = Rotation.concatenate([Rotation.identity(), Rotation.from_rotvec([np.pi, 0, 0])])
    else:
        group = Rotation.create_group(letter if letter in "TOI" else f"{letter}{order}", axis="Z")
    mats = group.as_matrix()
    if letter == "D" and order > 1:
        # scipy's Dn has its 2-fold axes on the xy plane including x? make sure x is one.
        x_flip = Rotation.from_rotvec([np.pi, 0, 0]).as_matrix()
        if not np.any(np.all(np.isclose(mats, x_flip, atol=1e-9), axis=(1, 2))):
            raise RuntimeError("internal: Dn group lacks the 2-fold about x")
    ident = np.all(np.isclose(mats, np.eye(3), atol=1e-9), axis=(1, 2))
    order_idx = np.argsort(~ident, kind="stable")
    return mats[order_idx]


def in_asymmetric_unit(directions: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Whether projection directions lie in the asymmetric unit.

    Parameters
    ----------
    directions : np.ndarray
        `(n, 3)` unit vectors (map coordinates).
    group : np.ndarray
        `(G, 3, 3)` symmetry matrices.

    Returns
    -------
    np.ndarray
        `(n,)` bool.
    """
    mates = np.einsum("gij,nj->ngi", group, directions)  # (n, G, 3)
    score = mates @ _REFERENCE_DIRECTION
    return np.argmax(score, axis=1) == 0


def to_asymmetric_unit(matrices: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Replace each pose ``A`` by its equivalent ``A·gᵀ`` whose direction is in the asymmetric unit.

    Parameters
    ----------
    matrices : np.ndarray
        `(n, 3, 3)` RELION matrices ``A``.
    group : np.ndarray
        `(G, 3, 3)` symmetry matrices.

    Returns
    -------
    np.ndarray
        `(n, 3, 3)` equivalent matrices.
    """
    directions = matrices[:, 2, :]  # Aᵀ·ẑ = third row of A
    mates = np.einsum("gij,nj->ngi", group, directions)
    best = np.argmax(mates @ _REFERENCE_DIRECTION, axis=1)
    g = group[best]
    return np.einsum("nij,nkj->nik", matrices, g)
