"""Symmetry groups, asymmetric units and symmetry-aware errors."""

from __future__ import annotations

import numpy as np
import pytest

from swiftalign.conventions import euler_to_matrix, matrix_to_euler
from swiftalign.evaluate import symmetric_angular_error_deg
from swiftalign.sampling import directions_to_rot_tilt, fibonacci_directions, gallery_directions
from swiftalign.symmetry import in_asymmetric_unit, symmetry_matrices, to_asymmetric_unit


@pytest.mark.parametrize("sym,order", [("C1", 1), ("C4", 4), ("D7", 14), ("T", 12), ("O", 24),
                                       ("I", 60)])
def test_group_orders_and_closure(sym, order):
    g = symmetry_matrices(sym)
    assert len(g) == order
    np.testing.assert_allclose(g[0], np.eye(3), atol=1e-12)
    prod = np.einsum("aij,bjk->abik", g, g).reshape(-1, 9)
    flat = g.reshape(-1, 9)
    d = np.abs(prod[:, None, :] - flat[None]).max(-1).min(1)
    assert d.max() < 1e-6  # RELION gives the icosahedral axes to 9-10 digits: products close to ~1e-7


@pytest.mark.parametrize("sym", ["C1", "C4", "D3", "T", "O", "I"])
def test_asymmetric_unit_tiles_the_sphere(sym):
    g = symmetry_matrices(sym)
    dirs = fibonacci_directions(20000)
    frac = in_asymmetric_unit(dirs, g).mean()
    assert frac == pytest.approx(1.0 / len(g), rel=0.1)


@pytest.mark.parametrize("sym", ["C4", "D2", "O", "I"])
def test_symmetry_equivalent_poses_have_zero_error(sym, rng):
    g = symmetry_matrices(sym)
    euler = rng.uniform([-180, 0, -180], [180, 180, 180], (20, 3))
    a = euler_to_matrix(euler)
    pick = rng.integers(0, len(g), 20)
    equivalent = matrix_to_euler(np.einsum("nij,nkj->nik", a, g[pick]))
    err = symmetric_angular_error_deg(euler, equivalent, sym)
    np.testing.assert_allclose(err, 0.0, atol=1e-5)
    # but not under C1 (for non-identity picks)
    err_c1 = symmetric_angular_error_deg(euler, equivalent, "C1")
    assert (err_c1[pick != 0] > 1.0).all()


def test_to_asymmetric_unit_is_equivalent_and_inside(rng):
    g = symmetry_matrices("D4")
    from scipy.spatial.transform import Rotation

    m = Rotation.random(50, random_state=1).as_matrix()
    r = to_asymmetric_unit(m, g)
    assert in_asymmetric_unit(r[:, 2, :], g).all()
    err = symmetric_angular_error_deg(matrix_to_euler(m), matrix_to_euler(r), "D4")
    np.testing.assert_allclose(err, 0.0, atol=1e-5)


def test_rot_tilt_give_the_direction(rng):
    dirs = gallery_directions(10.0, symmetry_matrices("C1"), rng=rng)
    rt = directions_to_rot_tilt(dirs)
    a = euler_to_matrix(np.concatenate([rt, np.zeros((len(rt), 1))], 1))
    np.testing.assert_allclose(a[:, 2, :], dirs, atol=1e-9)  # Aᵀ·ẑ


def _blobs(points: np.ndarray, n: int = 40, sigma_px: float = 2.0) -> np.ndarray:
    """`(n, n, n)` map of Gaussian blobs at ``points`` (x, y, z px from the centre n//2)."""
    z, y, x = np.indices((n,) * 3) - n // 2
    v = np.zeros((n,) * 3)
    for p in points:
        v += np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * sigma_px**2))
    return v


def _symmetric_blobs(name: str, frame: np.ndarray | None = None, extra: np.ndarray | None = None):
    frame = np.eye(3) if frame is None else frame
    base = np.random.default_rng(0).uniform(-9, 9, (6, 3))
    pts = np.concatenate([base @ (frame @ g @ frame.T).T for g in symmetry_matrices(name)])
    return _blobs(pts if extra is None else np.concatenate([pts, extra]))


def test_near_symmetry_of_the_c4_map_is_c4_about_z(trpv1_map):
    from swiftalign.symmetry import detect_near_symmetry

    kw = dict(pixel_size_angstrom=trpv1_map.voxel_size_angstrom, resolution_angstrom=20.0)
    near = detect_near_symmetry(trpv1_map.data, symmetry_matrices("C1"), **kw)
    assert near is not None and near.name == "C4" and near.twofold_axis is None
    assert abs(near.axis[2]) > 0.9995  # within 1.8° of z
    assert near.correlation > 0.95 and len(near.group) == 4
    assert "near-symmetry C4 about axis" in near.describe()
    # the same map refined with its own C4 has nothing beyond it
    assert detect_near_symmetry(trpv1_map.data, symmetry_matrices("C4"), **kw) is None


def test_asymmetric_map_has_no_near_symmetry():
    from swiftalign.symmetry import detect_near_symmetry

    v = _symmetric_blobs("C1")
    assert detect_near_symmetry(v, symmetry_matrices("C1"), pixel_size_angstrom=2.0,
                                resolution_angstrom=10.0) is None


def test_near_symmetry_finds_dihedral_and_tilted_axes():
    from swiftalign.symmetry import _rotation_angle, detect_near_symmetry

    kw = dict(pixel_size_angstrom=2.0, resolution_angstrom=10.0)
    near = detect_near_symmetry(_symmetric_blobs("D3"), symmetry_matrices("C1"), **kw)
    assert near is not None and near.name == "D3" and len(near.group) == 6
    assert abs(near.axis[2]) > 0.9995 and abs(near.twofold_axis @ near.axis) < 1e-9
    # the 2-fold is one of D3's (x, and x turned by 60°, 120°)
    assert np.cos(3 * np.arctan2(near.twofold_axis[1], near.twofold_axis[0])) ** 2 > 0.999
    # imposing C3 on the D3 map leaves the 2-folds as the near-symmetry, closed with C3
    near = detect_near_symmetry(_symmetric_blobs("D3"), symmetry_matrices("C3"), **kw)
    assert near is not None and near.name == "D3" and len(near.group) == 6
    # a 5-fold on a tilted axis
    axis = np.array([1.0, 1.0, 1.0]) / np.sqrt(3)
    frame = _rotation_angle(np.array([1.0, -1.0, 0.0]), np.arccos(axis[2]))  # z → axis
    near = detect_near_symmetry(_symmetric_blobs("C5", frame), symmetry_matrices("C1"), **kw)
    assert near is not None and near.name == "C5"
    assert abs(near.axis @ (frame @ [0, 0, 1])) > 0.999


def test_pseudo_symmetric_map_with_a_ligand():
    from swiftalign.symmetry import detect_near_symmetry

    kw = dict(pixel_size_angstrom=2.0, resolution_angstrom=10.0)
    core = _symmetric_blobs("C4")
    ligand = _symmetric_blobs("C4", extra=np.array([[0.0, 12.0, 6.0]]))  # one blob, 1/25 mass
    near = detect_near_symmetry(ligand, symmetry_matrices("C1"), **kw)
    assert near is not None and near.name == "C4" and 0.9 <= near.correlation < 0.999
    assert detect_near_symmetry(core, symmetry_matrices("C1"), **kw).correlation > 0.999
    # a heavier asymmetric part breaks it
    heavy = np.array([[0.0, 12.0, 6.0], [2.0, 11.0, 8.0], [-3.0, 13.0, 4.0], [0.0, 9.0, 9.0]])
    assert detect_near_symmetry(_symmetric_blobs("C4", extra=heavy), symmetry_matrices("C1"),
                                **kw) is None


def test_symmetry_refusal_hint_names_the_groups_own_axes():
    """The hint is RELION's generators of the group asked for, not the Cn/Dn rule for all."""
    from swiftalign.symmetry import symmetry_axes_text

    assert symmetry_axes_text("c4") == "RELION's C4: 4-fold on z"
    assert symmetry_axes_text("D7") == "RELION's D7: 7-fold on z, 2-fold on x"
    assert symmetry_axes_text("T") == "RELION's T: 3-fold on z, 2-fold on (0.000, 0.816, 0.577)"
    assert symmetry_axes_text("O") == ("RELION's O: 3-fold on (0.577, 0.577, 0.577), "
                                       "4-fold on z")
    assert symmetry_axes_text("I").startswith("RELION's I (= I2): 2-fold on z, 5-fold on "
                                              "(0.526, 0.000, 0.851)")
    assert "5-fold on z" in symmetry_axes_text("I3")
    assert symmetry_axes_text("C3v") == "RELION's C3v: 3-fold on z, mirror normal to y"
