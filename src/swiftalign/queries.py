"""Particle side of an alignment: images → search vectors, and their noise spectra.

The stack is read through :meth:`swiftalign.io.particles.ParticleImages.batches`;
each batch is Fourier transformed (centred rfft), optionally recentred on known
shifts, cut to the comparison disc, weighted (noise whitening,
:mod:`swiftalign.noise`) and normalised for the metric — with and without the
Wiener CTF correction (thesis §4.2).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from swiftalign.conventions import centred_rfft2
from swiftalign.ctf import CtfParams, ctf_rfft2, wiener_filter
from swiftalign.errors import InputError
from swiftalign.fourier import (
    Disc,
    disc_to_vectors,
    normalise_vectors,
    shift_phase_ramps,
    spectra_to_features,
)
from swiftalign.io.particles import ParticleImages
from swiftalign.io.table import ParticleTable
from swiftalign.noise import NoiseSpectrum, estimate_noise_power

__all__ = ["noise_spectrum_for", "particle_vectors"]


def particle_vectors(
    images: ParticleImages,
    disc: Disc,
    *,
    ctf: CtfParams | None,
    pixel_size_angstrom: float,
    metric: str,
    wiener_constant: float = 0.1,
    device: str = "cpu",
    batch_size: int = 512,
    rows: np.ndarray | None = None,
    recentre_shift_yx_px: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
    coefficient_weights: torch.Tensor | None = None,
    weight_group: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Particles → prepared search vectors, with and without CTF correction.

    Parameters
    ----------
    images : ParticleImages
        The particle stack(s).
    disc : Disc
        Coefficient selection.
    ctf : CtfParams or None
        When given, the first output has each particle multiplied by its
        Wiener filter ``C / (C² + c)`` (thesis §4.2).
    pixel_size_angstrom : float
        Particle pixel size.
    metric : str
        ``l2``, ``cosine`` or ``pearson``.
    wiener_constant : float
        ``c`` as a fraction of the mean of ``C²``.
    device : str
        Torch device of the work and of the vectors.
    batch_size : int
        Images read and transformed at once.
    rows : np.ndarray, optional
        `(m,)` STAR rows to use (default all); ``ctf`` is indexed by STAR row.
    recentre_shift_yx_px : np.ndarray, optional
        `(m, 2)` known particle-centre shifts removed before the disc is cut
        (a search then finds shifts relative to them).
    progress : callable, optional
        ``progress(n)`` after each batch of ``n`` particles.
    coefficient_weights : torch.Tensor, optional
        `(G, n_coeff)` real weights (noise whitening, :mod:`swiftalign.noise`)
        applied to the features before normalisation.
    weight_group : np.ndarray, optional
        `(m,)` row of ``coefficient_weights`` for each particle (default row 0).

    Returns
    -------
    corrected : torch.Tensor
        `(m, dim)` float32 Wiener-corrected vectors (same as ``raw`` without ``ctf``).
    raw : torch.Tensor
        `(m, dim)` float32 vectors of the particles as recorded.

    Raises
    ------
    MrcFileError
        An image with non-finite pixels.
    """
    all_rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    raw = torch.empty((len(all_rows), disc.dim), dtype=torch.float32, device=device)
    corrected = torch.empty_like(raw) if ctf is not None else raw
    disc_dev = disc.to(device)
    freqs = torch.stack(torch.meshgrid(
        torch.fft.fftfreq(disc.box_size, device=device),
        torch.fft.rfftfreq(disc.box_size, device=device), indexing="ij"), -1).reshape(-1, 2)
    for sl, batch_rows, batch in images.batches(all_rows, batch_size, device):
        spectra = centred_rfft2(batch)
        if recentre_shift_yx_px is not None:
            s0 = torch.as_tensor(-recentre_shift_yx_px[sl], dtype=torch.float32, device=device)
            spectra = spectra * shift_phase_ramps(freqs, s0).reshape(spectra.shape)
        w = None
        if coefficient_weights is not None:
            w = coefficient_weights.to(device)
            w = w[torch.as_tensor(weight_group[sl], device=device)] if weight_group is not None \
                else w[0]
        raw[sl] = _to_vectors(spectra, disc_dev, w, metric)
        if ctf is not None:
            c = ctf_rfft2(ctf.subset(batch_rows), pixel_size_angstrom=pixel_size_angstrom,
                          box_size=disc.box_size, device=device)
            spectra = spectra * wiener_filter(c, constant_fraction=wiener_constant)
            corrected[sl] = _to_vectors(spectra, disc_dev, w, metric)
        if progress is not None:
            progress(len(batch_rows))
    return corrected, raw


def _to_vectors(spectra: torch.Tensor, disc: Disc, weights: torch.Tensor | None,
                metric: str) -> torch.Tensor:
    """Centred rfft spectra → (weighted) features → normalised vectors."""
    feats = spectra_to_features(spectra, disc)
    if weights is not None:
        feats = feats * weights
    return normalise_vectors(disc_to_vectors(feats, disc.box_size), metric)


def noise_spectrum_for(
    table: ParticleTable,
    images: ParticleImages,
    rows: np.ndarray,
    *,
    pixel_size_angstrom: float,
    particle_diameter_angstrom: float | None,
    seed: int = 0,
    device: str = "cpu",
) -> NoiseSpectrum:
    """Noise power per optics group outside the particle mask (:func:`estimate_noise_power`).

    Parameters
    ----------
    table : ParticleTable
        Particles (their optics groups).
    images : ParticleImages
        Their images.
    rows : np.ndarray
        `(m,)` STAR rows to estimate from.
    pixel_size_angstrom : float
        Pixel size (Å/px).
    particle_diameter_angstrom : float or None
        Mask diameter (Å); default 0.8 × the box.
    seed : int
        Seed of the subsample of particles per group.
    device : str
        Torch device.

    Returns
    -------
    NoiseSpectrum
        One spectrum per optics group.

    Raises
    ------
    InputError
        If the mask leaves too little background.
    """
    box = images.box_size
    radius_px = (0.4 * box if particle_diameter_angstrom is None
                 else particle_diameter_angstrom / (2.0 * pixel_size_angstrom))
    groups = table.optics_group[rows]
    try:
        return estimate_noise_power(images, rows, groups, mask_radius_px=radius_px, seed=seed,
                                    device=device)
    except ValueError as exc:
        raise InputError(f"--particle-diameter {particle_diameter_angstrom}: {exc}") from None
