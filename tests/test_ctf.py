"""CTF against an independent implementation of RELION's formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swiftalign.ctf import CtfParams, ctf_rfft2, electron_wavelength_angstrom, wiener_filter


def relion_ctf(du, dv, azimuth_deg, kv, cs_mm, q0, phase_deg, pixel_size, box):
    """RELION's CTF (ctf.h): sin(K1·Δf(α)·k² − K2·k⁴ + K5 + K3) on the centred-rfft grid."""
    lam = 12.2643247 / np.sqrt(kv * 1e3 * (1 + 0.978466e-6 * kv * 1e3))
    ky = np.fft.fftfreq(box)[:, None] / pixel_size
    kx = np.fft.rfftfreq(box)[None, :] / pixel_size
    k2 = kx**2 + ky**2
    alpha = np.arctan2(ky, kx)
    df = (du + dv) / 2 + (du - dv) / 2 * np.cos(2 * (alpha - np.radians(azimuth_deg)))
    k1 = np.pi * lam
    k2c = np.pi / 2 * cs_mm * 1e7 * lam**3
    k3 = np.arctan(q0 / np.sqrt(1 - q0**2))
    return np.sin(k1 * df * k2 - k2c * k2**2 + np.radians(phase_deg) + k3)


@pytest.mark.parametrize(
    "du,dv,angle",
    [(15000.0, 14000.0, 30.0), (14000.0, 15000.0, 30.0), (20000.0, 19500.0, -70.0),
     (8000.0, 8000.0, 0.0)],
)
def test_ctf_matches_relion_formula(du, dv, angle):
    p = CtfParams(du, dv, angle, 300.0, 2.7, 0.1, 0.0)
    ours = ctf_rfft2(p, pixel_size_angstrom=1.5, box_size=64)[0].double().numpy()
    ref = relion_ctf(du, dv, angle, 300.0, 2.7, 0.1, 0.0, 1.5, 64)
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_ctf_at_zero_frequency_and_phase_shift_units():
    c0 = ctf_rfft2(CtfParams(10000, 10000, 0, 300, 2.7, 0.1, 0.0), pixel_size_angstrom=1,
                   box_size=32)
    c90 = ctf_rfft2(CtfParams(10000, 10000, 0, 300, 2.7, 0.1, 90.0), pixel_size_angstrom=1,
                    box_size=32)
    assert float(c0[0, 0, 0]) == pytest.approx(0.1000, abs=1e-4)
    assert float(c90[0, 0, 0]) == pytest.approx(0.9950, abs=1e-4)  # 0.8447 would be radians


def test_relativistic_wavelength():
    assert electron_wavelength_angstrom(300.0) == pytest.approx(0.0196876, abs=1e-7)
    assert electron_wavelength_angstrom(200.0) == pytest.approx(0.0250795, abs=1e-7)


def test_wiener_filter_inverts_where_ctf_is_strong():
    c = torch.tensor([[[0.0, 0.1, 0.5, -1.0]]])
    w = wiener_filter(c, constant_fraction=0.1)
    c_const = 0.1 * float((c**2).mean())
    np.testing.assert_allclose(w.numpy(), (c / (c**2 + c_const)).numpy(), rtol=1e-6)
    assert float(w[0, 0, 0]) == 0.0
    assert float((w * c)[0, 0, 3]) == pytest.approx(1.0, abs=0.1)
