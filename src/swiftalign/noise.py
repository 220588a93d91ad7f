"""Noise power spectra of particle images and noise-whitening coefficient weights.

The thesis (eq. 3.8, 4.11–4.12, ch. 7) notes that the distance between a
particle and a reference should weight each Fourier coefficient by the inverse
noise power ``1/σ²(|k|)`` (the negative log-likelihood under coloured Gaussian
noise), which it could not finish. Here:

- :func:`estimate_noise_power`: per optics group, the radially averaged power of
  the particle images *outside* a circular mask (the background, where only
  noise is), ``σ²(s) = ⟨|F[m·x](k)|²⟩_{|k|N≈s} / Σ m²`` with ``m`` a soft
  (raised-cosine edge) background mask and ``F`` the unnormalised DFT. For white
  noise of variance ``σ²`` it is ``σ²`` in every shell. It also returns the total
  power of the whole images in the same units, from which the spectral SNR is
  ``SSNR(s) = max(P_total(s) − σ²(s), 0) / σ²(s)``.
- :func:`estimate_residual_noise_power`: during refinement, the radially averaged
  power of the residual ``x − a·C·P`` of each particle ``x`` and the CTF-modulated
  projection ``C·P`` of its half map at its assigned pose and shift (``a`` the
  least-squares scale, since particles are not on the map's intensity scale),
  in the same units — as RELION re-estimates σ² from the residuals of the
  expectation step (Scheres 2012, eq. 12). Unlike the background estimate it
  sees the noise under the particle too, and needs no particle diameter.
- :func:`coefficient_weights`: the per-shell weights ``w(|k|)`` that multiply the
  complex (or DCT) coefficients of particles *and* references before the
  normalisation of the metric, so that for ``cosine``/``pearson`` the distance is
  the noise-weighted one, ``Σ_k w² |x_k − r_k|²``:

  ``none``  ``w = 1``;
  ``noise`` ``w = 1/σ(|k|)`` (whitening, eq. 3.8);
  ``ssnr``  ``w² = SSNR/(1 + SSNR) · 1/σ²`` (whitening times the shell
  reliability SSNR/(1+SSNR), the FRC-like weight of eq. 4.11–4.12, which also
  down-weights shells where the data hold no signal).

  Weights are scaled so that their mean square over the disc is 1 (this keeps
  ``l2`` distances on the scale of the unweighted ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from swiftalign.conventions import centred_rfft2, fftfreq_grid_rfft2
from swiftalign.fourier import Disc

__all__ = ["NoiseSpectrum", "WEIGHTINGS", "estimate_noise_power", "coefficient_weights",
           "background_mask", "estimate_residual_noise_power", "merge_spectra"]

#: Coefficient weightings (``--weighting``).
WEIGHTINGS = ("none", "noise", "ssnr")


@dataclass
class NoiseSpectrum:
    """Radial power spectra per optics group.

    Attributes
    ----------
    groups : np.ndarray
        `(G,)` optics-group numbers.
    noise_power : np.ndarray
        `(G, N // 2 + 1)` noise power σ² per Fourier shell ``s = round(|k|·N)``
        (units of pixel variance).
    total_power : np.ndarray
        `(G, N // 2 + 1)` power of the whole images per shell (same units).
    counts : np.ndarray
        `(G,)` particles used per group.
    """

    groups: np.ndarray
    noise_power: np.ndarray
    total_power: np.ndarray
    counts: np.ndarray

    @property
    def ssnr(self) -> np.ndarray:
        """`(G, N // 2 + 1)` spectral SNR ``max(P_total − σ², 0) / σ²``."""
        sigma2 = np.maximum(self.noise_power, 1e-30)
        return np.maximum(self.total_power - self.noise_power, 0.0) / sigma2

    def pooled(self) -> NoiseSpectrum:
        """One spectrum for all groups (particle-count weighted mean)."""
        w = self.counts / max(self.counts.sum(), 1)
        return NoiseSpectrum(np.array([0]), (w[:, None] * self.noise_power).sum(0, keepdims=True),
                             (w[:, None] * self.total_power).sum(0, keepdims=True),
                             np.array([self.counts.sum()]))


def background_mask(box_size: int, radius_px: float, *, edge_px: float = 3.0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """`(N, N)` soft background mask.

    0 inside ``radius_px`` of pixel ``N // 2``, 1 beyond ``radius_px + edge_px``,
    raised cosine in between.
    """
    c = box_size // 2
    y = torch.arange(box_size, device=device, dtype=torch.float32) - c
    r = torch.sqrt(y[:, None] ** 2 + y[None, :] ** 2)
    t = ((r - radius_px) / max(edge_px, 1e-6)).clamp(0.0, 1.0)
    return 0.5 - 0.5 * torch.cos(math.pi * t)


def estimate_noise_power(
    images,
    rows: np.ndarray,
    optics_groups: np.ndarray,
    *,
    mask_radius_px: float,
    max_particles_per_group: int = 2000,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "cpu",
) -> NoiseSpectrum:
    """Radially averaged noise power outside a circular mask, per optics group.

    Parameters
    ----------
    images : swiftalign.io.particles.ParticleImages
        The particle stack(s).
    rows : np.ndarray
        `(m,)` STAR rows to use.
    optics_groups : np.ndarray
        `(m,)` optics group of each row.
    mask_radius_px : float
        Radius (px) of the particle region left out; the background starts 3 px
        beyond it (raised-cosine edge).
    max_particles_per_group : int
        At most this many particles (seeded random choice) per group.
    batch_size : int
        Images read at a time.
    seed : int
        Seed of the choice.
    device : str
        Compute device.

    Returns
    -------
    NoiseSpectrum

    Raises
    ------
    ValueError
        If the background mask leaves fewer than 5 % of the box (``mask_radius_px``
        too large for the box).
    """
    box = images.box_size
    mask = background_mask(box, mask_radius_px, device=device)
    if float(mask.mean()) < 0.05:
        raise ValueError(
            f"particle mask radius {mask_radius_px:.1f} px leaves {float(mask.mean()):.1%} of the "
            f"{box}-px box as background: give a smaller particle diameter"
        )
    mask_power = float((mask**2).sum())
    freqs = fftfreq_grid_rfft2(box, device=device, dtype=torch.float64)
    shell = torch.round(freqs.norm(dim=-1) * box).long().clamp_max(box // 2).reshape(-1)
    # rfft columns 1 .. N/2-1 stand for two coefficients of the full grid
    mult = torch.full((box, box // 2 + 1), 2.0, dtype=torch.float64, device=device)
    mult[:, 0] = 1.0
    if box % 2 == 0:
        mult[:, -1] = 1.0
    mult = mult.reshape(-1)
    n_shells = box // 2 + 1
    per_shell = torch.zeros(n_shells, dtype=torch.float64, device=device).index_add_(0, shell, mult)
    rng = np.random.default_rng(seed)
    groups = np.unique(optics_groups)
    noise = np.zeros((len(groups), n_shells))
    total = np.zeros((len(groups), n_shells))
    counts = np.zeros(len(groups), dtype=np.int64)
    for gi, g in enumerate(groups):
        sel = np.asarray(rows)[optics_groups == g]
        if len(sel) > max_particles_per_group:
            sel = np.sort(rng.choice(sel, max_particles_per_group, replace=False))
        acc_n = torch.zeros(n_shells, dtype=torch.float64, device=device)
        acc_t = torch.zeros_like(acc_n)
        for _, _, batch in images.batches(sel, batch_size, device):
            bg_mean = (batch * mask).sum((-2, -1), keepdim=True) / mask.sum()
            x = batch - bg_mean
            p_bg = (centred_rfft2(x * mask).abs() ** 2).double().sum(0).reshape(-1) * mult
            p_all = (centred_rfft2(x).abs() ** 2).double().sum(0).reshape(-1) * mult
            acc_n.index_add_(0, shell, p_bg)
            acc_t.index_add_(0, shell, p_all)
        denom = per_shell.clamp_min(1) * max(len(sel), 1)
        noise[gi] = (acc_n / denom).cpu().numpy() / mask_power
        total[gi] = (acc_t / denom).cpu().numpy() / (box * box)
        counts[gi] = len(sel)
    return NoiseSpectrum(groups, noise, total, counts)


def merge_spectra(spectra: list[NoiseSpectrum]) -> NoiseSpectrum:
    """Particle-count weighted mean of spectra over the same or different groups.

    Parameters
    ----------
    spectra : list of NoiseSpectrum
        Each with `(G_i, N // 2 + 1)` powers (same box), e.g. one per class and half set.

    Returns
    -------
    NoiseSpectrum
        `(G, N // 2 + 1)` over the union of the groups, each shell the mean weighted by
        ``counts``; ``counts`` summed.

    Raises
    ------
    ValueError
        For an empty list or spectra of different lengths.
    """
    if not spectra:
        raise ValueError("no noise spectra to merge")
    groups = np.unique(np.concatenate([s.groups for s in spectra]))
    n_shells = spectra[0].noise_power.shape[1]
    noise = np.zeros((len(groups), n_shells))
    total = np.zeros_like(noise)
    counts = np.zeros(len(groups), dtype=np.int64)
    for spec in spectra:
        if spec.noise_power.shape[1] != n_shells:
            raise ValueError("noise spectra of different box sizes")
        gi = np.searchsorted(groups, spec.groups)
        np.add.at(noise, gi, spec.noise_power * spec.counts[:, None])
        np.add.at(total, gi, spec.total_power * spec.counts[:, None])
        np.add.at(counts, gi, spec.counts)
    c = np.maximum(counts, 1)[:, None]
    return NoiseSpectrum(groups, noise / c, total / c, counts)


def estimate_residual_noise_power(
    images,
    rows: np.ndarray,
    optics_groups: np.ndarray,
    volume: torch.Tensor,
    euler_deg: np.ndarray,
    shift_yx_px: np.ndarray,
    *,
    ctf=None,
    pixel_size_angstrom: float,
    max_particles_per_group: int = 2000,
    batch_size: int = 256,
    seed: int = 0,
) -> NoiseSpectrum:
    """Radially averaged power of particle − scaled CTF·projection, per optics group.

    Parameters
    ----------
    images : swiftalign.io.particles.ParticleImages
        The particle stack(s).
    rows : np.ndarray
        `(m,)` STAR rows of the particles.
    optics_groups : np.ndarray
        `(m,)` optics group of each row.
    volume : torch.Tensor
        `(N, N, N)` map the particles were aligned to (on the compute device).
    euler_deg : np.ndarray
        `(m, 3)` RELION (rot, tilt, psi) of each particle.
    shift_yx_px : np.ndarray
        `(m, 2)` particle-centre shifts (y, x) in px (origin = −shift).
    ctf : swiftalign.ctf.CtfParams, optional
        CTF of every STAR row (indexed by ``rows``); ``None``: no CTF.
    pixel_size_angstrom : float
        Pixel size (Å/px).
    max_particles_per_group : int
        At most this many particles (seeded random choice) per group.
    batch_size : int
        Particles at a time.
    seed : int
        Seed of the choice.

    Returns
    -------
    NoiseSpectrum
        Residual power as ``noise_power`` and the images' power as
        ``total_power``, both per shell in the units of
        :func:`estimate_noise_power` (``Σ|F|² / N²`` per coefficient); shell 0
        (DC, not compared) copies shell 1.
    """
    from swiftalign.conventions import euler_to_matrix
    from swiftalign.ctf import ctf_rfft2
    from swiftalign.fourier import extract_disc, make_disc, shift_phase_ramps
    from swiftalign.projection import VolumeSpectrum

    box = images.box_size
    device = volume.device
    disc = make_disc(box, 0.5, device=device)
    shells = disc.shell_index.to(device)
    n_shells = box // 2 + 1
    per_shell = torch.zeros(n_shells, dtype=torch.float64, device=device).index_add_(
        0, shells, torch.ones_like(shells, dtype=torch.float64))
    spectrum = VolumeSpectrum(volume.to(torch.float32))
    rng = np.random.default_rng(seed)
    rows = np.asarray(rows)
    groups = np.unique(optics_groups)
    noise = np.zeros((len(groups), n_shells))
    total = np.zeros_like(noise)
    counts = np.zeros(len(groups), dtype=np.int64)
    for gi, g in enumerate(groups):
        pos = np.nonzero(optics_groups == g)[0]
        if len(pos) > max_particles_per_group:
            pos = np.sort(rng.choice(pos, max_particles_per_group, replace=False))
        acc_r = torch.zeros(n_shells, dtype=torch.float64, device=device)
        acc_t = torch.zeros_like(acc_r)
        for sl, _, batch in images.batches(rows[pos], batch_size, device):
            p = pos[sl]
            x = extract_disc(centred_rfft2(batch), disc)
            mats = torch.as_tensor(euler_to_matrix(euler_deg[p]), dtype=torch.float32)
            model = spectrum.slice_disc(mats, disc)
            model = model * shift_phase_ramps(
                disc.freqs_yx, torch.as_tensor(shift_yx_px[p], dtype=torch.float32,
                                               device=device))
            if ctf is not None:
                c = ctf_rfft2(ctf.subset(rows[p]), pixel_size_angstrom=pixel_size_angstrom,
                              box_size=box, device=device)
                model = model * extract_disc(c.to(torch.complex64), disc)
            num = (model.conj() * x).real.sum(-1, keepdim=True)
            den = (model.abs() ** 2).sum(-1, keepdim=True).clamp_min(1e-30)
            resid = x - (num / den) * model
            acc_r.index_add_(0, shells, (resid.abs() ** 2).double().sum(0))
            acc_t.index_add_(0, shells, (x.abs() ** 2).double().sum(0))
        denom = per_shell.clamp_min(1) * max(len(pos), 1) * box * box
        noise[gi] = (acc_r / denom).cpu().numpy()
        total[gi] = (acc_t / denom).cpu().numpy()
        counts[gi] = len(pos)
    for arr in (noise, total):  # shells the disc does not reach (DC, corners)
        arr[:, 0] = arr[:, 1]
        empty = (per_shell == 0).cpu().numpy()
        empty[0] = False
        for s in np.nonzero(empty)[0]:
            arr[:, s] = arr[:, s - 1]
    return NoiseSpectrum(groups, noise, total, counts)


def coefficient_weights(spectrum: NoiseSpectrum, disc: Disc, weighting: str) -> torch.Tensor:
    """Per-coefficient weights ``w(|k|)`` of every group on a disc.

    Parameters
    ----------
    spectrum : NoiseSpectrum
        `G` groups' spectra.
    disc : Disc
        Coefficient selection (DFT or DCT); each coefficient takes the value of
        its shell ``round(|k|·N)``.
    weighting : {"none", "noise", "ssnr"}
        See the module notes.

    Returns
    -------
    torch.Tensor
        `(G, n_coeff)` float32 on the disc's device, mean square 1 per group.

    Raises
    ------
    ValueError
        For an unknown weighting.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"--weighting {weighting!r}: use none, noise or ssnr")
    shells = disc.shell_index.cpu().numpy().clip(0, spectrum.noise_power.shape[1] - 1)
    g = spectrum.noise_power.shape[0]
    if weighting == "none":
        w2 = np.ones((g, len(shells)))
    else:
        sigma2 = spectrum.noise_power[:, shells]
        floor = 1e-6 * np.maximum(sigma2.max(axis=1, keepdims=True), 1e-30)
        w2 = 1.0 / np.maximum(sigma2, floor)
        if weighting == "ssnr":
            ssnr = spectrum.ssnr[:, shells]
            w2 = w2 * ssnr / (1.0 + ssnr)
            # a group without measurable signal anywhere: fall back to whitening
            empty = w2.max(axis=1) <= 0
            w2[empty] = 1.0 / np.maximum(sigma2[empty], floor[empty])
    w2 = w2 / np.maximum(w2.mean(axis=1, keepdims=True), 1e-30)
    return torch.as_tensor(np.sqrt(w2), dtype=torch.float32, device=disc.freqs_yx.device)
