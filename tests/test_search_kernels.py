"""Known answers for the fast search kernels: the exact search with shifts folded into
the queries, and the local refinement with its carried-over centre and lean slicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swiftalign.conventions import euler_to_matrix
from swiftalign.fourier import disc_to_vectors, images_to_disc, make_disc, normalise_vectors
from swiftalign.gallery import Gallery
from swiftalign.local_search import refine_local
from swiftalign.projection import VolumeSpectrum, project
from swiftalign.sampling import shift_grid_px
from swiftalign.search import _exact_search


def _random_gallery(metric: str, *, weights: bool) -> Gallery:
    gen = torch.Generator().manual_seed(11)
    disc = make_disc(24, 0.3)
    n_dir, n_psi = 30, 12
    coeffs = torch.randn(n_dir * n_psi, disc.n_coeff, dtype=torch.complex64, generator=gen)
    w = torch.rand(disc.n_coeff, generator=gen) + 0.5 if weights else None
    return Gallery(rot_tilt_deg=np.zeros((n_dir, 2)), psi_deg=np.zeros((n_dir, n_psi)),
                   shifts_yx_px=shift_grid_px(2.0, 1.0), coeffs=coeffs, disc=disc,
                   metric=metric, weights=w)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_folded_exact_search_equals_brute_force_over_shifted_references(metric):
    g = _random_gallery(metric, weights=True)
    gen = torch.Generator().manual_seed(12)
    ctf_disc = torch.rand(g.disc.n_coeff, generator=gen) * 2 - 1
    queries = normalise_vectors(torch.randn(70, g.disc.dim, generator=gen), metric)
    every = g.vectors(torch.arange(g.n_poses), ctf_disc=ctf_disc)  # (poses, dim)
    brute = torch.cdist(queries.double(), every.double()) ** 2
    want_d, want_i = torch.topk(brute, 3, dim=1, largest=False)
    # a small budget forces several gallery blocks and several query chunks
    d, i = _exact_search(g, queries, 3, ctf_disc=ctf_disc, budget=400_000)
    np.testing.assert_array_equal(i.numpy(), want_i.numpy())
    np.testing.assert_allclose(d.numpy(), want_d.numpy(), rtol=1e-4, atol=1e-4)
    d1, i1 = _exact_search(g, queries, 1, ctf_disc=None, budget=2**30)
    brute1 = torch.cdist(queries.double(), g.vectors(torch.arange(g.n_poses)).double()) ** 2
    np.testing.assert_array_equal(i1[:, 0].numpy(), brute1.argmin(1).numpy())


def _library_slices(spectrum: VolumeSpectrum, mats: torch.Tensor, disc) -> torch.Tensor:
    """Disc slices sampled by torch-image-interpolation (the previous implementation)."""
    from torch_image_interpolation import sample_image_3d

    f = disc.freqs_yx
    xyz = torch.stack([f[:, 1], f[:, 0], torch.zeros_like(f[:, 0])], dim=-1)
    coords = torch.einsum("kj,bji->bki", xyz, mats)
    conj = coords[..., 0] < 0
    coords = torch.where(conj[..., None], -coords, coords)
    m = spectrum.padded
    zyx = coords.flip(-1) * m
    zyx[..., :2] += m // 2
    values = sample_image_3d(spectrum.rfft, zyx, interpolation="trilinear")
    return torch.where(conj, values.conj(), values)


@pytest.mark.parametrize("radius", [4.88 / 12.0, 0.5])
def test_lean_disc_slices_equal_library_sampling_and_projections(trpv1_map, radius):
    """grid_sample slicing = torch-image-interpolation's samples (also at Nyquist, where
    points leave the grid) ≈ projecting the map and cutting the disc."""
    volume = torch.as_tensor(trpv1_map.data)
    euler = np.random.default_rng(4).uniform([0, 0, 0], [360, 180, 360], (6, 3))
    mats = torch.as_tensor(euler_to_matrix(euler), dtype=torch.float32)
    disc = make_disc(48, radius)
    spectrum = VolumeSpectrum(volume)
    sliced = spectrum.slice_disc(mats, disc)
    reference = _library_slices(spectrum, mats, disc)
    scale = reference.abs().max()
    assert float((sliced - reference).abs().max() / scale) < 1e-5
    projected = images_to_disc(project(volume, mats), disc)
    assert float((sliced - projected).norm() / projected.norm()) < 0.02


def test_local_search_recovers_an_off_grid_pose(trpv1_map):
    """Noiseless particles at poses 2° and 0.6 px away from the start: 3 rounds from a 2°
    step come back to within 0.3° and 0.15 px (distance near 0)."""
    from swiftalign.evaluate import symmetric_angular_error_deg

    rng = np.random.default_rng(9)
    volume = torch.as_tensor(trpv1_map.data)
    true_euler = rng.uniform([0, 20, 0], [360, 160, 360], (8, 3))
    true_shift = rng.uniform(-1.5, 1.5, (8, 2))
    from torch_fourier_shift import fourier_shift_image_2d

    images = fourier_shift_image_2d(
        project(volume, torch.as_tensor(euler_to_matrix(true_euler), dtype=torch.float32)),
        torch.as_tensor(true_shift, dtype=torch.float32))
    disc = make_disc(48, 4.88 / 12.0)
    q = normalise_vectors(disc_to_vectors(images_to_disc(images, disc), 48), "cosine")
    start = true_euler + rng.choice([-1.2, 1.2], (8, 3))
    e, s, d = refine_local(VolumeSpectrum(volume), q, start, true_shift + 0.6, disc=disc,
                           metric="cosine", angle_step_deg=2.0, shift_step_px=0.5, rounds=4)
    err = symmetric_angular_error_deg(e, true_euler)
    assert np.median(symmetric_angular_error_deg(start, true_euler)) > 1.5
    assert np.max(err) < 0.5 and np.median(err) < 0.3
    assert np.max(np.abs(s - true_shift)) < 0.15
    assert np.max(d) < 0.01
