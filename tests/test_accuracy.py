"""Issue 7: coloured noise, noise-whitened distances, DCT features, ctf-mode auto."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch
from torch_fourier_shift import fourier_shift_image_2d

from swiftalign.alignment import (
    AUTO_REFERENCE_CTF_BELOW_ANGSTROM,
    AlignConfig,
    align_particles,
    resolve_ctf_mode,
)
from swiftalign.conventions import euler_to_matrix
from swiftalign.evaluate import symmetric_angular_error_deg
from swiftalign.fourier import disc_to_vectors, images_to_disc, make_disc, normalise_vectors
from swiftalign.gallery import build_gallery
from swiftalign.io import ParticleImages, read_particles
from swiftalign.noise import coefficient_weights, estimate_noise_power
from swiftalign.projection import project
from swiftalign.sampling import directions_to_rot_tilt, gallery_directions, shift_grid_px
from swiftalign.search import IndexSettings, search_gallery
from swiftalign.simulate import SimulationConfig, noise_colour_filter, simulate_particles, write_dataset
from swiftalign.symmetry import symmetry_matrices


class _Stack:
    """Minimal image source for :func:`estimate_noise_power`."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self.box_size = images.shape[-1]

    def read(self, rows):
        return self.images[np.asarray(rows)]

    def batches(self, rows, batch_size, device="cpu"):
        rows = np.asarray(rows)
        for start in range(0, len(rows), batch_size):
            sl = slice(start, min(len(rows), start + batch_size))
            yield sl, rows[sl], torch.as_tensor(self.read(rows[sl]), device=device)


def _noise(n: int, box: int, exponent: float, seed: int) -> np.ndarray:
    from swiftalign.conventions import centred_irfft2, centred_rfft2

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, box, box), generator=gen)
    if exponent:
        x = centred_irfft2(centred_rfft2(x) * noise_colour_filter(box, exponent), (box, box))
    return x.numpy()


def test_coloured_noise_keeps_pixel_variance_and_has_the_asked_slope():
    x = _noise(400, 48, 1.0, seed=0)
    assert abs(x.var() - 1.0) < 0.03
    spec = estimate_noise_power(_Stack(x), np.arange(400), np.ones(400, int), mask_radius_px=10)
    p = spec.noise_power[0]
    # PSD ∝ 1/|k|: shell 4 holds ~5x the power of shell 20 (the mask blurs it a little)
    assert 3.5 < p[4] / p[20] < 6.5
    white = estimate_noise_power(_Stack(_noise(400, 48, 0.0, seed=1)), np.arange(400),
                                 np.ones(400, int), mask_radius_px=10).noise_power[0]
    np.testing.assert_allclose(white[2:24], 1.0, rtol=0.15)


def test_noise_estimate_is_per_optics_group():
    x = np.concatenate([_noise(200, 32, 0.0, 2), 3.0 * _noise(200, 32, 0.0, 3)])
    groups = np.repeat([1, 2], 200)
    spec = estimate_noise_power(_Stack(x), np.arange(400), groups, mask_radius_px=6)
    np.testing.assert_array_equal(spec.groups, [1, 2])
    ratio = spec.noise_power[1, 2:16] / spec.noise_power[0, 2:16]
    np.testing.assert_allclose(ratio, 9.0, rtol=0.2)
    with pytest.raises(ValueError, match="particle mask radius"):
        estimate_noise_power(_Stack(x), np.arange(10), np.ones(10, int), mask_radius_px=30)


def test_weights_whiten_and_have_unit_mean_square():
    x = _noise(300, 32, 1.0, 4)
    spec = estimate_noise_power(_Stack(x), np.arange(300), np.ones(300, int), mask_radius_px=6)
    disc = make_disc(32, 0.4)
    w = coefficient_weights(spec, disc, "noise")[0]
    assert abs(float((w**2).mean()) - 1.0) < 1e-5
    shell = disc.shell_index
    # whitening: w² · σ² is the same in every shell
    white = (w**2).numpy() * spec.noise_power[0][shell.numpy()]
    assert white.std() / white.mean() < 1e-5
    with pytest.raises(ValueError, match="--weighting"):
        coefficient_weights(spec, disc, "fancy")


@pytest.fixture(scope="module")
def coloured_dataset(trpv1_map, tmp_path_factory):
    cfg = SimulationConfig(n_particles=160, snr_db=-10.0, symmetry="C4", seed=21,
                           noise_psd_exponent=1.0)
    images, truth = simulate_particles(trpv1_map, cfg)
    out = tmp_path_factory.mktemp("coloured")
    return write_dataset(out, images, truth, pixel_size_angstrom=4.88, config=cfg), truth


def test_noise_weighting_lowers_median_error_on_coloured_noise(trpv1_map, coloured_dataset):
    star, truth = coloured_dataset
    table = read_particles(star)
    true_euler = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    med = {}
    for weighting in ("none", "noise"):
        with ParticleImages(table) as parts:
            res = align_particles(table, parts, trpv1_map, AlignConfig(
                resolution_angstrom=25.0, symmetry="C4", index="Flat", ctf_mode="wiener",
                weighting=weighting))
        med[weighting] = float(np.median(symmetric_angular_error_deg(
            res.euler_deg[:, 0], true_euler, "C4")))
    # measured 52° unweighted vs 11° whitened (300 particles); demand a clear margin
    assert med["noise"] < 0.5 * med["none"]
    assert med["noise"] < res.sampling.angular_step_deg * 3


def _dct_gallery(trpv1_map, weights=None):
    rng = np.random.default_rng(3)
    disc = make_disc(48, 4.88 / 20.0, transform="dct")
    dirs = gallery_directions(15.0, symmetry_matrices("C1"), rng=rng)
    return build_gallery(torch.as_tensor(trpv1_map.data),
                         directions_rot_tilt_deg=directions_to_rot_tilt(dirs), psi_step_deg=15.0,
                         shifts_yx_px=shift_grid_px(3.0, 1.5), disc=disc, metric="cosine", rng=rng,
                         coefficient_weights=weights)


def test_dct_disc_matches_dft_size_and_shift_is_exact(trpv1_map):
    dft = make_disc(48, 0.2)
    dct = make_disc(48, 0.2, transform="dct")
    assert abs(dct.dim - dft.dim) / dft.dim < 0.1  # the quarter disc holds as many reals
    g = _dct_gallery(trpv1_map)
    image = torch.tensor([5])
    shift = torch.tensor([[1.5, -2.0]])
    got = g.features(image, shift)[0]
    # reference: shift the rotated projection in real space, then the orthonormal DCT
    from swiftalign.conventions import centred_irfft2

    img = centred_irfft2(g.coeffs[5], (48, 48))
    shifted = fourier_shift_image_2d(img[None], shift)[0].numpy()
    want = scipy.fft.dctn(shifted, norm="ortho").reshape(-1)[g.disc.flat_indices.numpy()]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4 * np.abs(want).max())


def test_noiseless_dct_and_weighted_gallery_poses_are_recovered_exactly(trpv1_map):
    w = torch.linspace(0.5, 2.0, make_disc(48, 4.88 / 20.0, transform="dct").n_coeff)
    g = _dct_gallery(trpv1_map, weights=w)
    ids = np.random.default_rng(0).choice(g.n_poses, 20, replace=False)
    euler, shifts = g.poses(ids)
    proj = project(torch.as_tensor(trpv1_map.data),
                   torch.as_tensor(euler_to_matrix(euler), dtype=torch.float32))
    images = fourier_shift_image_2d(proj, torch.as_tensor(shifts, dtype=torch.float32))
    q = normalise_vectors(disc_to_vectors(images_to_disc(images, g.disc) * w, 48), "cosine")
    res = search_gallery(g, q, k=1, settings=IndexSettings(factory="Flat"))
    found, found_shift = g.poses(res.ids[:, 0])
    np.testing.assert_allclose(symmetric_angular_error_deg(found, euler), 0.0, atol=1e-3)
    np.testing.assert_allclose(found_shift, shifts)


def test_ctf_mode_auto_follows_the_measured_rule():
    # benchmarks/results/accuracy{_ctf}.md: reference CTFs are the more accurate at 6, 10, 15
    # and 20 Å; at 30 Å they tie with whitened Wiener-corrected particles
    assert resolve_ctf_mode("auto", 6.0) == "reference"
    assert resolve_ctf_mode("auto", 20.0) == "reference"
    assert resolve_ctf_mode("auto", AUTO_REFERENCE_CTF_BELOW_ANGSTROM) == "wiener"
    assert resolve_ctf_mode("auto", 25.0) == "wiener"
    assert resolve_ctf_mode("wiener", 4.0) == "wiener"
    assert AlignConfig(resolution_angstrom=6.0).ctf_mode == "auto"


def test_simulator_refuses_negative_colour(trpv1_map):
    with pytest.raises(ValueError, match="noise-color"):
        simulate_particles(trpv1_map, SimulationConfig(n_particles=2, noise_psd_exponent=-1))


def test_residual_noise_estimate_recovers_the_coloured_spectrum(trpv1_map, coloured_dataset):
    """During refinement σ² comes from particle − a·CTF·projection at the assigned pose: with
    the true poses and map it must equal the background estimate (both measure the simulated
    1/|k| noise), and with wrong poses it must be larger (signal left in the residual)."""
    from swiftalign.alignment import ctf_params_from_table
    from swiftalign.conventions import origin_angstrom_to_shift_px
    from swiftalign.noise import estimate_residual_noise_power, merge_spectra

    star, truth = coloured_dataset
    table = read_particles(star)
    euler = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    origin = truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    shift = origin_angstrom_to_shift_px(origin, 4.88)  # (y, x) px
    rows = np.arange(len(table))
    groups = np.ones(len(rows), int)
    vol = torch.as_tensor(trpv1_map.data)
    ctf = ctf_params_from_table(table)
    with ParticleImages(table) as parts:
        resid = estimate_residual_noise_power(parts, rows, groups, vol, euler, shift, ctf=ctf,
                                              pixel_size_angstrom=4.88)
        background = estimate_noise_power(parts, rows, groups, mask_radius_px=0.4 * 48)
        wrong = estimate_residual_noise_power(parts, rows, groups, vol, euler[::-1].copy(),
                                              shift, ctf=ctf, pixel_size_angstrom=4.88)
    r, b = resid.noise_power[0], background.noise_power[0]
    np.testing.assert_allclose(r[2:22] / b[2:22], 1.0, rtol=0.2)
    assert 3.0 < r[3] / r[20] < 8.0  # the 1/|k| slope
    assert wrong.noise_power[0][2:8].mean() > 1.1 * r[2:8].mean()
    both = merge_spectra([resid, wrong])
    np.testing.assert_allclose(both.noise_power[0], (r + wrong.noise_power[0]) / 2)
