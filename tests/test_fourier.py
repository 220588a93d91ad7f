"""Search vectors: Parseval weighting, disc selection, shift filters."""

from __future__ import annotations

import numpy as np
import torch

from swiftalign.conventions import centred_irfft2, centred_rfft2
from swiftalign.fourier import (
    disc_to_vectors,
    images_to_disc,
    make_disc,
    normalise_vectors,
    shift_phase_ramps,
)


def _band_limit(images: torch.Tensor, radius: float) -> torch.Tensor:
    """Independent reference: zero every full-FFT coefficient outside 0 < |k| <= r."""
    n = images.shape[-1]
    f = torch.fft.fft2(images.double())
    k = torch.fft.fftfreq(n, dtype=torch.float64)
    kk = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    mask = (kk > 0) & (kk <= radius + 1e-9) & (kk < 0.5)
    return torch.fft.ifft2(f * mask).real


def test_vector_distance_equals_band_limited_image_distance(rng):
    for box in (32, 33):
        a = torch.as_tensor(rng.normal(size=(4, box, box)))
        b = torch.as_tensor(rng.normal(size=(4, box, box)))
        radius = 0.23
        disc = make_disc(box, radius)
        va = disc_to_vectors(images_to_disc(a, disc), box).double()
        vb = disc_to_vectors(images_to_disc(b, disc), box).double()
        d_vec = ((va - vb) ** 2).sum(-1)
        d_img = ((_band_limit(a, radius) - _band_limit(b, radius)) ** 2).sum((-2, -1))
        np.testing.assert_allclose(d_vec.numpy(), d_img.numpy(), rtol=1e-4)


def test_disc_has_no_dc_and_no_redundant_half():
    disc = make_disc(16, 0.5)
    ky, kx = disc.freqs_yx[:, 0], disc.freqs_yx[:, 1]
    assert not bool(((ky == 0) & (kx == 0)).any())
    assert not bool(((kx == 0) & (ky < 0)).any())
    assert bool((kx >= 0).all())
    # one of each Friedel pair: the full-FFT disc holds exactly twice as many
    k = torch.fft.fftfreq(16)
    kk = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    assert 2 * disc.n_coeff == int(((kk > 0) & (kk < 0.5)).sum())


def test_shift_filter_moves_content(rng):
    img = torch.zeros(1, 32, 32)
    img[0, 16, 16] = 1.0  # the box centre
    disc = make_disc(32, 0.5)
    spec = centred_rfft2(img)
    ramp_full = shift_phase_ramps(
        torch.stack(torch.meshgrid(torch.fft.fftfreq(32), torch.fft.rfftfreq(32), indexing="ij"),
                    -1).reshape(-1, 2),
        torch.tensor([[3.0, -2.0]]),
    ).reshape(1, 32, 17)
    moved = centred_irfft2(spec * ramp_full, (32, 32))
    y, x = np.unravel_index(int(moved.argmax()), (32, 32))
    assert (y, x) == (19, 14)  # content moved by (+3, -2) in (y, x)
    assert disc.n_coeff > 0


def test_cosine_normalisation_is_unit_norm(rng):
    v = torch.as_tensor(rng.normal(size=(5, 20)), dtype=torch.float32)
    for metric in ("cosine", "pearson"):
        n = normalise_vectors(v, metric)
        np.testing.assert_allclose(n.norm(dim=-1).numpy(), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(normalise_vectors(v, "l2").numpy(), v.numpy())
