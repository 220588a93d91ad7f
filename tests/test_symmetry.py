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
