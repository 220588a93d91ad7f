"""Euler, origin and projection conventions against RELION's own projections."""

from __future__ import annotations

import numpy as np
import pytest
import starfile
import torch
from scipy.spatial.transform import Rotation
from tests.conftest import shared_file

from swiftalign.conventions import (
    angular_distance_deg,
    euler_to_matrix,
    matrix_to_euler,
    origin_angstrom_to_shift_px,
    shift_px_to_origin_angstrom,
)
from swiftalign.fourier import images_to_disc, make_disc
from swiftalign.gallery import rotate_images
from swiftalign.io import read_map
from swiftalign.projection import VolumeSpectrum, project


def _cc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_matrix_is_transpose_of_scipy_zyz():
    e = np.array([30.0, 60.0, -45.0])
    expected = Rotation.from_euler("ZYZ", e, degrees=True).as_matrix().T
    np.testing.assert_allclose(euler_to_matrix(e), expected, atol=1e-12)


@pytest.mark.parametrize(
    "euler",
    [(0, 0, 0), (30, 0, 0), (0, 180, 0), (-170, 179.9999, 10), (10, 1e-7, 20), (359.9, 90, 0.1),
     (123.4, 56.7, -89.0)],
)
def test_euler_round_trip_keeps_matrix(euler):
    m = euler_to_matrix(np.array(euler, dtype=float))
    back = euler_to_matrix(matrix_to_euler(m))
    np.testing.assert_allclose(back, m, atol=1e-6)


def test_gimbal_lock_equivalence():
    # (30, 0, 0) and (0, 0, 30) are the same rotation
    a = euler_to_matrix(np.array([30.0, 0.0, 0.0]))
    b = euler_to_matrix(np.array([0.0, 0.0, 30.0]))
    assert angular_distance_deg(a, b) < 1e-6


def test_origin_shift_round_trip():
    origin = np.array([[3.0, -1.5]])
    shift = origin_angstrom_to_shift_px(origin, 1.5)
    # particle centre = box centre - origin; shift is (y, x)
    np.testing.assert_allclose(shift, [[1.0, -2.0]])
    np.testing.assert_allclose(shift_px_to_origin_angstrom(shift, 1.5), origin)


def test_projection_matches_relion_project():
    """relion_project images with known angles: our A convention correlates, Aᵀ does not."""
    vol = read_map(shared_file("aspire/clean70SRibosome_vol_65p.mrc"), voxel_size_angstrom=5.0)
    import mrcfile

    stack = mrcfile.read(shared_file("aspire/rln_proj_65.mrcs"))
    df = starfile.read(shared_file("aspire/rln_proj_65.star"))
    euler = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    v = torch.as_tensor(vol.data)
    ours = project(v, torch.as_tensor(euler_to_matrix(euler), dtype=torch.float32)).numpy()
    wrong = project(
        v, torch.as_tensor(euler_to_matrix(euler).transpose(0, 2, 1), dtype=torch.float32)
    ).numpy()
    cc_ours = [_cc(ours[i], stack[i]) for i in range(len(stack))]
    cc_wrong = [_cc(wrong[i], stack[i]) for i in range(len(stack))]
    assert min(cc_ours) > 0.75
    assert max(cc_wrong) < 0.5


def test_in_plane_rotation_equals_psi(trpv1_map):
    euler = np.array([[20.0, 50.0, 0.0], [200.0, 120.0, 0.0]])
    psi = np.array([37.0, -100.0])
    v = torch.as_tensor(trpv1_map.data)
    p0 = project(v, torch.as_tensor(euler_to_matrix(euler), dtype=torch.float32))
    rotated = rotate_images(p0, torch.as_tensor(psi, dtype=torch.float32)).numpy()
    euler[:, 2] = psi
    direct = project(v, torch.as_tensor(euler_to_matrix(euler), dtype=torch.float32)).numpy()
    for i in range(2):
        assert _cc(rotated[i], direct[i]) > 0.99


def test_disc_slicing_equals_projection(trpv1_map):
    v = torch.as_tensor(trpv1_map.data)
    euler = np.random.default_rng(0).uniform(0, 180, (20, 3))
    mats = torch.as_tensor(euler_to_matrix(euler), dtype=torch.float32)
    disc = make_disc(48, 0.2)
    a = images_to_disc(project(v, mats), disc)
    b = VolumeSpectrum(v).slice_disc(mats, disc)
    cc = (a * b.conj()).sum(-1).real / (a.abs().norm(dim=-1) * b.abs().norm(dim=-1))
    assert float(cc.min()) > 0.999
    ratio = float(b.abs().norm() / a.abs().norm())
    assert abs(ratio - 1) < 0.01
