"""Point-group symmetry and asymmetric units, as RELION 3.1 defines them.

Every group RELION knows is accepted under RELION's name (case free): ``Cn``,
``Ci``, ``Cs``, ``Cnv``, ``Cnh``, ``Sn`` (n even), ``Dn``, ``Dnv``, ``Dnh``,
``T``, ``Td``, ``Th``, ``O``, ``Oh``, ``I`` (= ``I2``), ``I1``, ``I3``, ``I4``
and ``Ih`` (= ``I2h``), ``I1h``, ``I3h``, ``I4h``. ``I5``/``I5h`` are refused,
as RELION refuses them. Each group is the closure of RELION's generators
(``SymList::fill_symmetry_class`` in ``src/symmetries.cpp``): ``rot_axis n
x y z`` is a rotation by 360°/n about the axis, ``inversion`` is ``-1`` and
``mirror_plane x y z`` the reflection ``1 - 2·n·nᵀ`` through the plane of
normal ``n``. So ``Dn`` has its 2-fold on x, ``T`` a 3-fold on z and a 2-fold
on (0, 0.816, 0.577), ``I``/``I2`` 2-folds on x, y, z with a 5-fold at
(0.526, 0, 0.851), ``I1`` the 5-fold at (0.851, 0, -0.526) … The matrices
equal the ones ``relion_refine --sym X --print_symmetry_ops`` prints (as a set).

Matrices ``g`` act on map coordinates (``V(g·y) = V(y)``). For a rotation
``g`` the poses ``A`` and ``A·gᵀ`` give identical projections. For an
improper ``g`` (det −1) the equivalent pose is ``F·A·(−g)ᵀ`` with ``F =
diag(−1, −1, 1)`` (the projection integral is unchanged by ``t → −t``), so its
direction is ``−g·d`` and its image is turned by 180° in plane.

Asymmetric units of projection directions are RELION's
(``HealpixSampling::removeSymmetryEquivalentPointsGeometric`` in
``src/healpix_sampling.cpp``) for the rotation groups ``Cn``, ``Dn``, ``T``,
``O`` and ``I1``–``I4``, so angular-distribution plots look as RELION's. For
groups with mirrors or an inversion RELION's units assume mirror-related
views are equal, which they are not (see above); there the unit is the
Dirichlet cell of a generic direction under the equivalent rotations.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np

from swiftalign.conventions import euler_to_matrix

__all__ = [
    "symmetry_matrices",
    "parse_symmetry",
    "relion_group_name",
    "pose_operators",
    "equivalent_poses",
    "in_asymmetric_unit",
    "to_asymmetric_unit",
    "symmetry_agreement",
    "check_reference_symmetry",
    "detect_near_symmetry",
    "NearSymmetry",
    "NEAR_SYMMETRY_MIN_CC",
    "symmetry_axes_text",
    "SYMMETRY_REFUSE_BELOW",
    "SYMMETRY_WARN_BELOW",
]

_REFERENCE_DIRECTION = np.array([0.17, 0.31, 0.935])
_REFERENCE_DIRECTION = _REFERENCE_DIRECTION / np.linalg.norm(_REFERENCE_DIRECTION)
_FLIP = np.diag([-1.0, -1.0, 1.0])
_TOL = 1e-6

_GROUP_NAMES = ("C<n>, Ci, Cs, C<n>v, C<n>h, S<n> (n even), D<n>, D<n>v, D<n>h, T, Td, Th, O, "
                "Oh, I (=I2), I1, I3, I4, Ih (=I2h), I1h, I3h, I4h")

# RELION's generators (symmetries.cpp, fill_symmetry_class) for the fixed groups.
_S23 = (0.0, math.sqrt(2.0 / 3.0), math.sqrt(1.0 / 3.0))
_ICOSAHEDRAL = {
    "I2": [("rot", 2, (0, 0, 1)), ("rot", 5, (0.525731114, 0, 0.850650807)),
           ("rot", 3, (0, 0.356822076, 0.934172364))],
    "I1": [("rot", 2, (1, 0, 0)), ("rot", 5, (0.85065080702670, 0, -0.5257311142635)),
           ("rot", 3, (0.9341723640, 0.3568220765, 0))],
    "I3": [("rot", 2, (-0.5257311143, 0, 0.8506508070)), ("rot", 5, (0, 0, 1)),
           ("rot", 3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "I4": [("rot", 2, (0.5257311143, 0, 0.8506508070)),
           ("rot", 5, (0.8944271932547096, 0, 0.4472135909903704)),
           ("rot", 3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
}
_ICOSAHEDRAL_MIRROR = {"I2": (1, 0, 0), "I1": (0, 0, -1), "I3": (0.850650807, 0, 0.525731114),
                       "I4": (0.850650807, 0, -0.525731114)}
_FIXED: dict[str, list] = {
    "T": [("rot", 3, (0, 0, 1)), ("rot", 2, _S23)],
    "TD": [("rot", 3, (0, 0, 1)), ("rot", 2, _S23), ("mirror", 0, (1.4142136, 2.4494897, 0))],
    "TH": [("rot", 3, (0, 0, 1)), ("rot", 2, tuple(-v for v in _S23)), ("inversion", 0, None)],
    "O": [("rot", 3, (1, 1, 1)), ("rot", 4, (0, 0, 1))],
    "OH": [("rot", 3, (1, 1, 1)), ("rot", 4, (0, 0, 1)), ("mirror", 0, (0, 1, 1))],
    **_ICOSAHEDRAL,
    **{f"{k}H": [*v, ("mirror", 0, _ICOSAHEDRAL_MIRROR[k])] for k, v in _ICOSAHEDRAL.items()},
}
_AXIAL = re.compile(r"([CDS])(\d{1,2})([VH]?)")


def parse_symmetry(symmetry: str) -> tuple[str, int]:
    """Validate a RELION symmetry name.

    Parameters
    ----------
    symmetry : str
        e.g. ``C4``, ``D7``, ``C3v``, ``Ci``, ``T``, ``I``, ``I3h`` (case free).

    Returns
    -------
    (str, int)
        Canonical family (``C``, ``CV``, ``CH``, ``S``, ``D``, ``DV``, ``DH``,
        ``CI``, ``CS``, ``T``, ``TD``, ``TH``, ``O``, ``OH``, ``I1``–``I4``,
        ``I1H``–``I4H``) and the order ``n`` of its principal axis (1 for the
        others). ``I`` is returned as ``I2``.

    Raises
    ------
    ValueError
        For a name RELION does not know, ``Sn`` with odd n, and ``I5``/``I5h``
        (not implemented in RELION).
    """
    s = symmetry.strip().upper()
    s = {"I": "I2", "IH": "I2H"}.get(s, s)
    if s in ("CI", "CS") or s in _FIXED:
        return s, 1
    m = _AXIAL.fullmatch(s)
    if m and int(m.group(2)) >= 1 and not (m.group(1) == "S" and m.group(3)):
        letter, order, suffix = m.group(1), int(m.group(2)), m.group(3)
        if letter == "S" and order % 2:
            raise ValueError(f"symmetry {symmetry!r}: S<n> needs an even n (as in RELION)")
        return letter + suffix, order
    if s in ("I5", "I5H"):
        raise ValueError(f"symmetry {symmetry!r} is not implemented in RELION; use I1-I4")
    raise ValueError(f"unknown symmetry {symmetry!r}: use one of {_GROUP_NAMES}")


def _rotation(fold: int, axis: tuple) -> np.ndarray:
    """Rotation by 360°/fold about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    angle = 2.0 * math.pi / fold
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _generator_matrix(kind: str, fold: int, vector: tuple | None) -> np.ndarray:
    """One RELION symmetry element as a 3×3 matrix."""
    if kind == "rot":
        assert vector is not None, "a rotation has an axis"
        return _rotation(fold, vector)
    if kind == "inversion":
        return -np.eye(3)
    n = np.asarray(vector, dtype=np.float64)
    n = n / np.linalg.norm(n)
    return np.eye(3) - 2.0 * np.outer(n, n)


def _generators(family: str, order: int) -> list:
    """RELION's symmetry elements for a parsed group (``fill_symmetry_class``)."""
    if family in _FIXED:
        return list(_FIXED[family])
    z_axis = [("rot", order, (0, 0, 1))] if order > 1 else []
    by_family: dict[str, list] = {
        "C": z_axis,
        "CI": [("inversion", 0, None)],
        "CS": [("mirror", 0, (0, 0, 1))],
        "CV": [*z_axis, ("mirror", 0, (0, 1, 0))],
        "CH": [*z_axis, ("mirror", 0, (0, 0, 1))],
        "S": [("rot", order // 2, (0, 0, 1)), ("inversion", 0, None)] if order > 2
        else [("inversion", 0, None)],
        "D": [*z_axis, ("rot", 2, (1, 0, 0))],
        "DV": [*z_axis, ("rot", 2, (1, 0, 0)), ("mirror", 0, (1, 0, 0))],
        "DH": [*z_axis, ("rot", 2, (1, 0, 0)), ("mirror", 0, (0, 0, 1))],
    }
    return by_family[family]


def _close(generators: list[np.ndarray]) -> np.ndarray:
    """The finite group generated by ``generators`` (identity first)."""
    mats = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for a in frontier:
            for g in generators:
                p = a @ g
                if not any(np.abs(p - m).max() < 1e-5 for m in mats):
                    mats.append(p)
                    new.append(p)
        frontier = new
        if len(mats) > 240:
            raise RuntimeError("internal: symmetry generators do not close into a point group")
    return np.stack(mats)


def symmetry_matrices(symmetry: str) -> np.ndarray:
    """Matrices of a point group, equal (as a set) to RELION's.

    Parameters
    ----------
    symmetry : str
        RELION name: ``C1``, ``C4``, ``D7``, ``C3v``, ``T``, ``O``, ``I``, ``I3h`` …

    Returns
    -------
    np.ndarray
        `(G, 3, 3)` float64, identity first; improper elements (det −1) for
        groups with mirrors or an inversion.

    Raises
    ------
    ValueError
        For a name RELION does not know (see :func:`parse_symmetry`).
    """
    return _cached_group(*parse_symmetry(symmetry)).copy()


@functools.lru_cache(maxsize=64)
def _cached_group(family: str, order: int) -> np.ndarray:
    """The closed group of a parsed name (cached: closure costs ~G² products)."""
    return _close([_generator_matrix(*g) for g in _generators(family, order)])


def pose_operators(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rotations that give equivalent poses, and whether each turns the image by 180°.

    Parameters
    ----------
    group : np.ndarray
        `(G, 3, 3)` symmetry matrices.

    Returns
    -------
    (np.ndarray, np.ndarray)
        `(G', 3, 3)` rotations ``r = det(g)·g`` (duplicates removed, identity
        first) and `(G',)` bool, true where ``g`` was improper: the pose
        ``A`` is then equivalent to ``F·A·rᵀ`` with ``F = diag(−1, −1, 1)``.
    """
    det = np.linalg.det(group)
    rots = group * np.sign(det)[:, None, None]
    keep: list[int] = []
    for i, r in enumerate(rots):
        if not any(np.abs(r - rots[j]).max() < _TOL and det[i] * det[j] > 0 for j in keep):
            keep.append(i)
    return rots[keep], det[keep] < 0


def equivalent_poses(matrices: np.ndarray, group: np.ndarray) -> np.ndarray:
    """All poses giving the same projection as each pose under a point group.

    Parameters
    ----------
    matrices : np.ndarray
        `(..., 3, 3)` RELION matrices ``A``.
    group : np.ndarray
        `(G, 3, 3)` symmetry matrices.

    Returns
    -------
    np.ndarray
        `(..., G', 3, 3)` rotations ``A·gᵀ`` (proper ``g``) or ``F·A·(−g)ᵀ``
        (improper ``g``), see :func:`pose_operators`.
    """
    rots, flips = pose_operators(group)
    out = np.einsum("...ij,gkj->...gik", matrices, rots)
    left = np.where(flips[:, None, None], _FLIP, np.eye(3))
    return np.einsum("gij,...gjk->...gik", left, out)


def _group_key(mats: np.ndarray) -> np.ndarray:
    """Matrices sorted into a canonical order, to compare groups as sets."""
    flat = np.round(mats.reshape(len(mats), 9), 4) + 0.0
    return flat[np.lexsort(flat.T[::-1])]


def relion_group_name(group: np.ndarray) -> str | None:
    """The RELION rotation group (``Cn``, ``Dn``, ``T``, ``O``, ``I1``–``I4``) equal to ``group``.

    Returns
    -------
    str or None
        The name, or None for groups with improper elements and other settings.
    """
    if np.any(np.linalg.det(group) < 0):
        return None
    n = len(group)
    names = {1: ["C1"], 12: ["T"], 24: ["O"], 60: ["I1", "I2", "I3", "I4"]}.get(n, [])
    names = [f"C{n}", *names] + ([f"D{n // 2}"] if n % 2 == 0 else [])
    key = _group_key(group)
    for name in names:
        cand = symmetry_matrices(name)
        if len(cand) == n and np.abs(_group_key(cand) - key).max() < 2e-4:
            return name
    return None


def _planes_inside(d: np.ndarray, normals: np.ndarray, rotate_deg: float = 0.0,
                   sign: float = 1.0) -> np.ndarray:
    """RELION's test ``sign·(d · (A·nᵢ)) ≥ 0`` for all normals, ``A = Euler(0, rotate_deg, 0)``."""
    a = euler_to_matrix(np.array([0.0, rotate_deg, 0.0]))
    n = normals @ a.T
    n = n / np.linalg.norm(n, axis=1, keepdims=True)
    return np.all(sign * (d @ n.T) >= -1e-9, axis=1)


_I_NORMALS = np.array([[0.0, 1.0, 0.0], [-0.4999999839058737, -0.8090170074556163, 0.3090169861701543],
                       [0.4999999839058737, -0.8090170074556163, 0.3090169861701543]])
_I4_NORMALS = np.array([[0.0, 0.0, 1.0], [0.187592467856686, -0.303530987314591, -0.491123477863004],
                        [0.187592467856686, 0.303530987314591, -0.491123477863004]])
_T_NORMALS = np.array([[-0.942809, 0.0, 0.0], [0.471405, 0.272165, 0.7698],
                       [0.471404, 0.816497, 0.0]])
_O_NORMALS = np.array([[0.0, -1.0, 1.0], [1.0, 1.0, 0.0], [-1.0, 1.0, 0.0]])


def _relion_unit(directions: np.ndarray, name: str) -> np.ndarray:
    """RELION's asymmetric unit of a rotation group (healpix_sampling.cpp), `(n,)` bool."""
    d = directions
    rot = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    upper = d[:, 2] >= -1e-9  # tilt <= 90°
    pole = np.hypot(d[:, 0], d[:, 1]) < 1e-9  # RELION's rot == 0 at the poles
    eps = 1e-9
    letter, n = name[0], int(name[1:]) if name[1:].isdigit() else 0
    if letter == "C":
        return pole | ((rot >= -180.0 / n - eps) & (rot <= 180.0 / n + eps))
    if letter == "D":
        if n == 1:
            return upper
        return upper & (pole | ((rot >= 90 - 180.0 / n - eps) & (rot <= 90 + 180.0 / n + eps)))
    if name == "T":
        return (pole | ((rot >= 90 - eps) & (rot <= 150 + eps))) & _planes_inside(d, _T_NORMALS)
    if name == "O":
        return (pole | ((rot >= 45 - eps) & (rot <= 135 + eps) & upper)) & _planes_inside(
            d, _O_NORMALS)
    if name == "I4":
        return _planes_inside(d, _I4_NORMALS, -31.7174745559, sign=-1.0)
    return _planes_inside(d, _I_NORMALS, {"I1": 90.0, "I2": 0.0, "I3": 31.7174745559}[name])


def in_asymmetric_unit(directions: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Whether projection directions lie in the asymmetric unit.

    RELION's unit for its rotation groups; otherwise the Dirichlet cell of a
    generic direction under the equivalent rotations (module docstring).

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
    name = relion_group_name(group)
    if name is not None:
        return _relion_unit(np.asarray(directions, dtype=np.float64), name)
    rots, _ = pose_operators(group)
    unique = [0]  # the identity; a rotation met twice (from g and from -g) counts once
    for i in range(1, len(rots)):
        if all(np.abs(rots[i] - rots[j]).max() > 1e-5 for j in unique):
            unique.append(i)
    mates = np.einsum("gij,nj->ngi", rots[unique], directions)  # (n, G'', 3)
    return np.argmax(mates @ _REFERENCE_DIRECTION, axis=1) == 0


def to_asymmetric_unit(matrices: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Replace each pose by its equivalent whose direction is in the asymmetric unit.

    Parameters
    ----------
    matrices : np.ndarray
        `(n, 3, 3)` RELION matrices ``A``.
    group : np.ndarray
        `(G, 3, 3)` symmetry matrices.

    Returns
    -------
    np.ndarray
        `(n, 3, 3)` equivalent matrices (see :func:`equivalent_poses`); a pose
        on a boundary keeps the first equivalent inside.
    """
    mates = equivalent_poses(matrices, group)  # (n, G', 3, 3)
    n, g = mates.shape[:2]
    inside = in_asymmetric_unit(mates[:, :, 2, :].reshape(-1, 3), group).reshape(n, g)
    best = np.argmax(inside, axis=1)  # first inside (identity when already inside)
    return mates[np.arange(n), best]


#: The reference is refused below this agreement with its own symmetry (unless forced).
SYMMETRY_REFUSE_BELOW = 0.9
#: A warning is given below this agreement.
SYMMETRY_WARN_BELOW = 0.95


def _fourier_crop(volume: np.ndarray, box: int) -> np.ndarray:
    """`(N, N, N)` map to `(box, box, box)` keeping the lowest frequencies (same extent in Å)."""
    n = volume.shape[0]
    if box >= n:
        return np.asarray(volume, dtype=np.float64)
    spec = np.fft.fftshift(np.fft.rfftn(volume), axes=(0, 1))
    lo = n // 2 - box // 2
    small = spec[lo:lo + box, lo:lo + box, : box // 2 + 1]
    small = np.fft.ifftshift(small, axes=(0, 1))
    return np.fft.irfftn(small, s=(box,) * 3, axes=(0, 1, 2)) * (box / n) ** 3


class _Comparison:
    """A map low-passed for map-to-rotated-map correlations, with its soft spherical mask.

    The map is Fourier-cropped to a box of ``resolution/3`` Å pixels (at least
    24, at most the map's box); rotations are about the box centre ``N//2``;
    the mask is a soft sphere of radius ``0.45·N`` (invariant under every
    rotation about the centre).
    """

    def __init__(self, volume: np.ndarray, pixel_size_angstrom: float,
                 resolution_angstrom: float) -> None:
        n = volume.shape[0]
        box = int(min(n, max(24, 2 * round(1.5 * n * pixel_size_angstrom / resolution_angstrom))))
        self.small = _fourier_crop(volume, box)
        self.centre = np.full(3, box // 2, dtype=np.float64)
        grid = np.indices(self.small.shape).reshape(3, -1).T - self.centre
        r = np.linalg.norm(grid, axis=1).reshape(self.small.shape)
        edge = 0.45 * box
        mask = np.clip(0.5 * (1 + np.cos(np.pi * (r - (edge - 3)) / 3)), 0, 1)
        mask[r < edge - 3] = 1.0
        mask[r > edge] = 0.0
        self.weights = mask / mask.sum()
        self._xyz = grid[:, ::-1]  # voxel offsets from the centre, (x, y, z)

    def correlation(self, g: np.ndarray) -> float:
        """Masked Pearson correlation of ``V(y)`` and ``V(g·y)`` (trilinear), g in xyz."""
        from scipy.ndimage import affine_transform

        gz = g[::-1, ::-1]  # xyz → (z, y, x) array axes
        c = self.centre
        moved = affine_transform(self.small, gz, offset=c - gz @ c, order=1)
        w, a = self.weights, self.small
        da, db = a - (w * a).sum(), moved - (w * moved).sum()
        den = np.sqrt((w * da * da).sum() * (w * db * db).sum())
        return float((w * da * db).sum() / den) if den > 0 else 0.0

    def principal_axes(self) -> np.ndarray:
        """`(3, 3)` rows: the inertia axes (xyz) of the positive density about the centre."""
        w = np.clip(self.small, 0, None).ravel() * self.weights.ravel()
        r = self._xyz
        inertia = np.eye(3) * (w * (r * r).sum(1)).sum() - np.einsum("n,ni,nj->ij", w, r, r)
        return np.linalg.eigh(inertia)[1].T


def symmetry_agreement(volume: np.ndarray, group: np.ndarray, *, pixel_size_angstrom: float,
                       resolution_angstrom: float) -> np.ndarray:
    """How well a map agrees with itself under each element of a point group.

    The map is low-passed to ``resolution_angstrom`` (Fourier crop to a box of
    ``resolution/3`` Å pixels, at most the map's box), then for each group
    element ``g`` the Pearson correlation of ``V(y)`` and ``V(g·y)`` (trilinear
    interpolation about the box centre ``N//2``) is taken inside a soft sphere
    of radius ``0.45·N`` (invariant under every ``g``).

    Parameters
    ----------
    volume : np.ndarray
        `(N, N, N)` map, axes (z, y, x).
    group : np.ndarray
        `(G, 3, 3)` symmetry matrices (xyz).
    pixel_size_angstrom, resolution_angstrom : float
        Voxel size and the resolution to compare at (Å).

    Returns
    -------
    np.ndarray
        `(G,)` correlations, 1 for the identity.
    """
    comparison = _Comparison(volume, pixel_size_angstrom, resolution_angstrom)
    return np.array([comparison.correlation(g) for g in group])


def _axis_text(vector: tuple) -> str:
    v = np.asarray(vector, dtype=np.float64)
    v = v / np.linalg.norm(v)
    for name, unit in zip("xyz", np.eye(3), strict=True):
        if np.allclose(np.abs(v), unit, atol=1e-6):
            return f"-{name}" if v @ unit < 0 else name
    return "(" + ", ".join(f"{c:.3f}" for c in v) + ")"


def symmetry_axes_text(symmetry: str) -> str:
    """RELION's generators of ``symmetry`` in words, e.g. ``"D7: 7-fold on z, 2-fold on x"``.

    ``T``: ``3-fold on z, 2-fold on (0.000, 0.816, 0.577)``; ``O``: ``3-fold on
    (0.577, 0.577, 0.577), 4-fold on z``; mirrors are named by their normal.

    Raises
    ------
    ValueError
        For a name RELION does not know (:func:`parse_symmetry`).
    """
    family, order = parse_symmetry(symmetry)
    parts = []
    for kind, fold, vector in _generators(family, order):
        if kind == "rot":
            parts.append(f"{fold}-fold on {_axis_text(vector)}")
        elif kind == "inversion":
            parts.append("inversion")
        else:
            parts.append(f"mirror normal to {_axis_text(vector)}")
    spelled = symmetry.strip()
    name = {"I2": "I (= I2)", "I2H": "Ih (= I2h)"}.get(family, spelled[:1].upper()
                                                       + spelled[1:].lower())
    return f"RELION's {name}: {', '.join(parts) or 'identity only'}"


def check_reference_symmetry(volume: np.ndarray, symmetry: str, *, pixel_size_angstrom: float,
                             resolution_angstrom: float, force: bool = False,
                             name: str = "reference") -> float:
    """Refuse (or warn about) a reference that does not have the symmetry it is refined with.

    The agreement is the lowest of :func:`symmetry_agreement` over the group's
    non-identity elements: 1 for a map with the symmetry, low when an axis is
    elsewhere (e.g. a D7 map with its 2-fold on y: RELION's is on x). Below
    ``SYMMETRY_REFUSE_BELOW`` (0.9) the reference is refused unless ``force``;
    below ``SYMMETRY_WARN_BELOW`` (0.95) a warning is logged. Measured on a
    synthetic D7 map (2 Å/px, compared at 5–12 Å): 0.984–0.998 with its
    2-fold on x, 0.73–0.84 with it on y; the TRPV1 map: 1.00 under C4, 0.33
    under D4.

    Parameters
    ----------
    volume : np.ndarray
        `(N, N, N)` reference map.
    symmetry : str
        RELION group name.
    pixel_size_angstrom, resolution_angstrom : float
        Voxel size and the resolution of the comparison (Å), e.g. the initial
        low-pass of refinement.
    force : bool
        Warn instead of refusing (``--force-symmetry``).
    name : str
        The map's file name, for the message.

    Returns
    -------
    float
        The agreement (1.0 for C1).

    Raises
    ------
    InputError
        Agreement below ``SYMMETRY_REFUSE_BELOW`` without ``force``.
    """
    import logging

    from swiftalign.errors import InputError

    group = symmetry_matrices(symmetry)
    if len(group) == 1:
        return 1.0
    agreement = float(symmetry_agreement(volume, group, pixel_size_angstrom=pixel_size_angstrom,
                                         resolution_angstrom=resolution_angstrom)[1:].min())
    msg = (f"{name}: agrees with its own {symmetry.upper()} symmetry at only {agreement:.2f} "
           f"(lowest map-to-rotated-copy correlation at {resolution_angstrom:g} Å; 1 = symmetric)")
    if agreement < SYMMETRY_REFUSE_BELOW and not force:
        raise InputError(f"{msg}, below {SYMMETRY_REFUSE_BELOW}: its axes are not where RELION "
                         f"puts them for {symmetry.upper()} ({symmetry_axes_text(symmetry)}); "
                         "rotate the map, or pass --force-symmetry")
    if agreement < SYMMETRY_WARN_BELOW:
        logging.getLogger(__name__).warning("%s", msg)
    return agreement


#: Near-symmetries are kept when every element of the group they generate with the imposed
#: symmetry correlates at least this well with the map (:func:`detect_near_symmetry`).
NEAR_SYMMETRY_MIN_CC = 0.9
_MAX_FOLD = 8
_SNAP_DEG = 3.0
_SCAN_AXES = 64  # directions of the coarse axis scan (≈ 15° apart on the hemisphere)
_REFINED_AXES = 6  # promising axes refined and tested at full resolution


@dataclass(frozen=True)
class NearSymmetry:
    """Rotations a map almost has beyond the symmetry imposed on it.

    Attributes
    ----------
    name : str
        The detected group alone, ``Cn`` or ``Dn`` (n = 2..8), about ``axis``.
    axis : np.ndarray
        `(3,)` its n-fold axis, unit vector in map coordinates (x, y, z).
    twofold_axis : np.ndarray or None
        `(3,)` its 2-fold perpendicular to ``axis`` (``Dn``), else None.
    correlation : float
        Lowest map-to-rotated-map correlation over the elements of ``group``.
    group : np.ndarray
        `(G', 3, 3)` the imposed group and the detected rotations, closed (identity first).
    resolution_angstrom : float
        Resolution of the comparison (Å).
    """

    name: str
    axis: np.ndarray
    twofold_axis: np.ndarray | None
    correlation: float
    group: np.ndarray
    resolution_angstrom: float

    def describe(self) -> str:
        """One line: ``near-symmetry C7 about axis (0.00, 0.00, 1.00) (CC 0.97 at 20 Å)``."""
        def fmt(v: np.ndarray) -> str:
            return "(" + ", ".join(f"{x:.2f}" for x in v + 0.0) + ")"

        two = f", 2-fold about {fmt(self.twofold_axis)}" if self.twofold_axis is not None else ""
        return (f"near-symmetry {self.name} about axis {fmt(self.axis)}{two} "
                f"(CC ≥ {self.correlation:.2f} at {self.resolution_angstrom:g} Å, "
                f"{len(self.group)} operators with the imposed symmetry)")


def _rotation_angle(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation by ``angle_rad`` about the unit vector ``axis``."""
    k = axis / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle_rad) * cross + (1 - math.cos(angle_rad)) * cross @ cross


def _rotation_axes(group: np.ndarray) -> list[np.ndarray]:
    """Unit axes of the proper non-identity rotations of a group."""
    axes = []
    for g in group:
        if np.linalg.det(g) < 0 or np.abs(g - np.eye(3)).max() < 1e-6:
            continue
        w, v = np.linalg.eig(g)
        axes.append(np.real(v[:, np.argmin(np.abs(w - 1))]))
    return [a / np.linalg.norm(a) for a in axes]


def _snap(axis: np.ndarray, targets: list[np.ndarray]) -> np.ndarray:
    """``axis`` replaced by the first of ``targets`` within ``_SNAP_DEG`` (sign kept free)."""
    for t in targets:
        if abs(float(axis @ t)) >= math.cos(math.radians(_SNAP_DEG)):
            return t
    return axis / np.linalg.norm(axis)


def _highest_fold(comp: _Comparison, axis: np.ndarray, threshold: float,
                  cache: dict) -> tuple[int, float]:
    """The largest n ≤ 8 whose rotations about ``axis`` all correlate ≥ threshold (1: none)."""
    def cc(angle_deg: float) -> float:
        key = (tuple(np.round(axis, 6)), round(angle_deg, 6))
        if key not in cache:
            cache[key] = comp.correlation(_rotation_angle(axis, math.radians(angle_deg)))
        return cache[key]

    for n in range(_MAX_FOLD, 1, -1):
        lowest = 1.0
        for k in range(1, n // 2 + 1):  # k and n − k give the same correlation
            lowest = min(lowest, cc(360.0 * k / n))
            if lowest < threshold:
                break
        if lowest >= threshold:
            return n, lowest
    return 1, 0.0


def _refine_axis(comp: _Comparison, axis: np.ndarray, angle_rad: float,
                 steps_deg: tuple[float, ...] = (6.0, 3.0, 1.5, 0.75)) -> np.ndarray:
    """Axis maximising the correlation of the rotation by ``angle_rad`` (3×3 grids, steps)."""
    best, best_cc = axis, comp.correlation(_rotation_angle(axis, angle_rad))
    for step in steps_deg:
        u = np.cross(best, [1.0, 0, 0] if abs(best[0]) < 0.9 else [0, 1.0, 0])
        u /= np.linalg.norm(u)
        v = np.cross(best, u)
        centre = best
        for a in (-1, 0, 1):
            for b in (-1, 0, 1):
                if a == b == 0:
                    continue
                cand = centre + math.radians(step) * (a * u + b * v)
                cand /= np.linalg.norm(cand)
                c = comp.correlation(_rotation_angle(cand, angle_rad))
                if c > best_cc:
                    best, best_cc = cand, c
    return best


def _hemisphere(count: int) -> np.ndarray:
    """`(count, 3)` quasi-uniform unit vectors with z ≥ 0 (Fibonacci spiral)."""
    i = np.arange(count) + 0.5
    z = 1.0 - i / count
    phi = math.pi * (3.0 - math.sqrt(5.0)) * i
    r = np.sqrt(1.0 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _screen_axes(volume: np.ndarray, candidates: list[np.ndarray], pixel_size_angstrom: float,
                 resolution_angstrom: float, threshold: float) -> list[tuple[int, float, int]]:
    """``(n, correlation, candidate index)`` of promising axes, highest correlation first.

    On a comparison box of at most 32 voxels, the rotation by 360°/n about each
    candidate for n = 2..8, kept from ``threshold − 0.25``.
    """
    coarse = max(resolution_angstrom, 3.0 * volume.shape[0] * pixel_size_angstrom / 32)
    comp = _Comparison(volume, pixel_size_angstrom, coarse)
    found = []
    for i, a in enumerate(candidates):
        for n in range(2, _MAX_FOLD + 1):
            cc = comp.correlation(_rotation_angle(a, 2 * math.pi / n))
            if cc >= threshold - 0.25:
                found.append((cc, n, i))
    best_per_axis: dict[int, tuple[int, float, int]] = {}
    for cc, n, i in sorted(found, reverse=True):  # each axis at its best-correlating n
        best_per_axis.setdefault(i, (n, cc, i))
    return sorted(best_per_axis.values(), key=lambda t: -t[1])


def _perpendicular_twofold(comp: _Comparison, axis: np.ndarray,
                           fold: int) -> tuple[np.ndarray, float]:
    """The best 2-fold perpendicular to ``axis`` (scan of 180°/fold by 2°, then 0.5°)."""
    u = np.cross(axis, [1.0, 0, 0] if abs(axis[0]) < 0.9 else [0, 1.0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(axis, u)

    def at(phi_deg: float) -> np.ndarray:
        p = math.radians(phi_deg)
        return math.cos(p) * u + math.sin(p) * v

    scores = {phi: comp.correlation(_rotation_angle(at(phi), math.pi))
              for phi in np.arange(0.0, 180.0 / fold, 2.0)}
    best = max(scores, key=lambda p: scores[p])
    for phi in (best - 1.0, best - 0.5, best + 0.5, best + 1.0):
        scores[phi] = comp.correlation(_rotation_angle(at(phi), math.pi))
    best = max(scores, key=lambda p: scores[p])
    return at(best), scores[best]


def _closed_or_none(mats: list[np.ndarray]) -> np.ndarray | None:
    """The finite group ``mats`` generate, or None when they do not close (axes inconsistent)."""
    try:
        return _close(mats)
    except RuntimeError:
        return None


def detect_near_symmetry(volume: np.ndarray, imposed_group: np.ndarray, *,
                         pixel_size_angstrom: float, resolution_angstrom: float,
                         threshold: float = NEAR_SYMMETRY_MIN_CC) -> NearSymmetry | None:
    """Rotations (``Cn``, ``Dn``, n ≤ 8) a map almost has beyond the imposed symmetry.

    Candidate n-fold axes are the imposed group's axes, the map's three inertia
    axes (positive density about the box centre) and 64 directions ≈ 15° apart;
    each is screened on a coarse copy (box ≤ 32) with the rotation by 360°/n,
    n = 2..8; the 6 most promising are refined on 6°…0.75° grids (or snapped to
    an imposed axis within 3°) and the largest n whose rotations all give a
    map-to-rotated-map correlation (as in :func:`symmetry_agreement`) ≥
    ``threshold`` wins; then 2-folds perpendicular to it are scanned (``Dn``). The
    detected rotations are closed with the imposed group and kept only if
    every element of the result correlates ≥ ``threshold`` (else the 2-fold
    is dropped, then everything). Axes pass through the box centre ``N//2``;
    T, O and I near-symmetries are not searched.

    Parameters
    ----------
    volume : np.ndarray
        `(N, N, N)` map, axes (z, y, x).
    imposed_group : np.ndarray
        `(G, 3, 3)` the symmetry already imposed (xyz).
    pixel_size_angstrom, resolution_angstrom : float
        Voxel size and the resolution of the comparison (Å); refinement uses
        its global-search resolution, where symmetry mates get confused.
    threshold : float
        Lowest correlation accepted.

    Returns
    -------
    NearSymmetry or None
        None when the map has no rotation beyond the imposed group.
    """
    volume = np.asarray(volume, dtype=np.float64)
    comp = _Comparison(volume, pixel_size_angstrom, resolution_angstrom)
    imposed_axes = _rotation_axes(imposed_group)
    candidates = list(imposed_axes)
    for a in (*comp.principal_axes(), *_hemisphere(_SCAN_AXES)):
        if all(abs(float(a @ c)) < math.cos(math.radians(_SNAP_DEG)) for c in candidates):
            candidates.append(a)
    cache: dict = {}
    best: tuple[int, float, np.ndarray] = (1, 0.0, candidates[0] if candidates else comp.centre)
    for n, _, i in _screen_axes(volume, candidates, pixel_size_angstrom, resolution_angstrom,
                                threshold)[:_REFINED_AXES]:
        axis = candidates[i]
        if not any(axis is t for t in imposed_axes):
            axis = _snap(_refine_axis(comp, axis, 2 * math.pi / n), imposed_axes)
        fold, cc = _highest_fold(comp, axis, threshold, cache)
        if (fold, cc) > best[:2]:
            best = (fold, cc, axis)
    fold, _, axis = best
    if fold == 1:
        return None
    gens = [_rotation_angle(axis, 2 * math.pi / fold)]
    two, two_cc = _perpendicular_twofold(comp, axis, fold)
    options: list[tuple[list[np.ndarray], np.ndarray | None, str]] = []
    if two_cc >= threshold:
        two = _snap(two, imposed_axes)
        options.append(([*gens, _rotation_angle(two, math.pi)], two, f"D{fold}"))
    options.append((gens, None, f"C{fold}"))
    for extra, twofold, name in options:
        group = _closed_or_none([*imposed_group, *extra])
        if group is None or len(group) <= len(_close(list(imposed_group))):
            continue
        lowest = min(comp.correlation(g) for g in group[1:])
        if lowest >= threshold:
            return NearSymmetry(name, axis, twofold, lowest, group, resolution_angstrom)
    return None
