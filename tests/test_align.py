"""Alignment accuracy: exact poses without noise, noisy sets within ΔΦ, index recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fourier_shift import fourier_shift_image_2d

from swiftalign.alignment import AlignConfig, align_particles
from swiftalign.conventions import euler_to_matrix
from swiftalign.evaluate import symmetric_angular_error_deg
from swiftalign.fourier import disc_to_vectors, images_to_disc, make_disc, normalise_vectors
from swiftalign.gallery import build_gallery
from swiftalign.io import ParticleImages, read_particles
from swiftalign.projection import project
from swiftalign.sampling import directions_to_rot_tilt, gallery_directions, shift_grid_px
from swiftalign.search import IndexSettings, merge_topk, search_gallery
from swiftalign.symmetry import symmetry_matrices


@pytest.fixture(scope="module")
def small_gallery(trpv1_map):
    rng = np.random.default_rng(3)
    disc = make_disc(48, 4.88 / 20.0)
    dirs = gallery_directions(12.0, symmetry_matrices("C1"), rng=rng)
    gallery = build_gallery(
        torch.as_tensor(trpv1_map.data),
        directions_rot_tilt_deg=directions_to_rot_tilt(dirs),
        psi_step_deg=12.0,
        shifts_yx_px=shift_grid_px(4.0, 2.0),
        disc=disc,
        metric="cosine",
        rng=rng,
    )
    return gallery


def _images_at(trpv1_map, euler, shifts):
    proj = project(torch.as_tensor(trpv1_map.data),
                   torch.as_tensor(euler_to_matrix(euler), dtype=torch.float32))
    return fourier_shift_image_2d(proj, torch.as_tensor(shifts, dtype=torch.float32))


def test_noiseless_gallery_pose_is_recovered_exactly(trpv1_map, small_gallery):
    g = small_gallery
    ids = np.random.default_rng(0).choice(g.n_poses, 25, replace=False)
    euler, shifts = g.poses(ids)
    images = _images_at(trpv1_map, euler, shifts)
    q = normalise_vectors(disc_to_vectors(images_to_disc(images, g.disc), 48), "cosine")
    res = search_gallery(g, q, k=1, settings=IndexSettings(factory="Flat"))
    found_euler, found_shift = g.poses(res.ids[:, 0])
    err = symmetric_angular_error_deg(found_euler, euler)
    np.testing.assert_allclose(err, 0.0, atol=1e-3)
    np.testing.assert_allclose(found_shift, shifts)


def test_trained_index_with_rescoring_matches_exact(trpv1_map, small_gallery):
    g = small_gallery
    rng = np.random.default_rng(5)
    ids = rng.choice(g.n_poses, 60, replace=False)
    euler, shifts = g.poses(ids)
    images = _images_at(trpv1_map, euler, shifts + rng.uniform(-0.5, 0.5, shifts.shape))
    gen = torch.Generator().manual_seed(1)
    images = images + 0.5 * images.std() * torch.randn(images.shape, generator=gen)
    q = normalise_vectors(disc_to_vectors(images_to_disc(images, g.disc), 48), "cosine")
    exact = search_gallery(g, q, k=1, settings=IndexSettings(factory="Flat"))
    approx = search_gallery(g, q, k=1, settings=IndexSettings(factory="IVF64,PQ64x4fs",
                                                               rerank=100))
    assert approx.recall >= 0.95
    agree = np.mean(exact.ids[:, 0] == approx.ids[:, 0])
    assert agree >= 0.9
    assert approx.bytes_per_pose <= 64


def test_merge_topk_across_chunks():
    d1, i1 = torch.tensor([[0.5, 0.9]]), torch.tensor([[10, 11]])
    d2, i2 = torch.tensor([[0.1, 0.7]]), torch.tensor([[20, 21]])
    d, i = merge_topk(d1, i1, d2, i2, 3)
    np.testing.assert_allclose(d.numpy(), [[0.1, 0.5, 0.7]])
    np.testing.assert_array_equal(i.numpy(), [[20, 10, 21]])


def _errors(result, truth, symmetry):
    true_euler = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    return symmetric_angular_error_deg(result.euler_deg[:, 0], true_euler, symmetry)


def test_noisy_set_median_error_below_step(trpv1_map, noisy_dataset):
    star, truth = noisy_dataset
    table = read_particles(star)
    results = {}
    for index in ("Flat", "ivfpq"):
        with ParticleImages(table) as parts:
            results[index] = align_particles(
                table, parts, trpv1_map,
                AlignConfig(resolution_angstrom=25.0, symmetry="C4", index=index),
            )
    dphi = results["Flat"].sampling.angular_step_deg
    med_flat = np.median(_errors(results["Flat"], truth, "C4"))
    med_ivf = np.median(_errors(results["ivfpq"], truth, "C4"))
    assert med_flat < dphi
    assert med_ivf <= 1.2 * med_flat
    true_shift = -truth[["rlnOriginYAngst", "rlnOriginXAngst"]].to_numpy() / 4.88
    shift_err = np.hypot(*(results["Flat"].shift_yx_px[:, 0] - true_shift).T)
    assert np.median(shift_err) < results["Flat"].sampling.shift_step_px / 2


def test_odd_box_refused_with_a_clear_message():
    """RELION's own 65-px projections: odd boxes are refused before any work (issue 5, 13)."""
    from tests.conftest import shared_file

    from swiftalign.errors import InputError
    from swiftalign.io import read_map

    ref = read_map(shared_file("aspire/clean70SRibosome_vol_65p.mrc"), voxel_size_angstrom=5.0)
    table = read_particles(shared_file("aspire/rln_proj_65.star"), angpix=5.0)
    with ParticleImages(table) as parts, pytest.raises(InputError, match="odd box size 65"):
        align_particles(table, parts, ref, AlignConfig(resolution_angstrom=30.0))
