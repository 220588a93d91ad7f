"""Search vectors: the low-frequency disc of Fourier coefficients.

Thesis §4.1: each image is represented by the coefficients of its centred
rfft (see :mod:`swiftalign.conventions`) inside the disc ``0 < |k| <= r``,
``r = Ts / Tmax`` cycles/px, keeping one of each Friedel pair (columns
``kx > 0``, and ``kx = 0`` only for ``ky > 0``). The DC term is dropped, so the
vectors describe zero-mean band-limited images.

Weighting: every kept coefficient stands for itself and its Friedel mate, so
with weight ``sqrt(2) / N`` (``N`` = box size) and real/imaginary parts
interleaved, the squared Euclidean distance between two vectors equals the
squared distance between the two band-limited images (Parseval). Frequencies
at or beyond Nyquist (|k| >= 0.5) are never kept, which avoids self-conjugate
coefficients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from swiftalign.conventions import centred_rfft2, fftfreq_grid_rfft2

__all__ = [
    "Disc",
    "make_disc",
    "extract_disc",
    "disc_to_vectors",
    "normalise_vectors",
    "shift_phase_ramps",
    "images_to_disc",
]


@dataclass(frozen=True)
class Disc:
    """Which rfft coefficients form the search vector.

    Attributes
    ----------
    box_size : int
        Image side ``N`` in px.
    radius_fftfreq : float
        Disc radius in cycles/px (``pixel_size / resolution``).
    flat_indices : torch.Tensor
        `(n_coeff,)` int64 indices into the flattened `(N, N // 2 + 1)` rfft.
    freqs_yx : torch.Tensor
        `(n_coeff, 2)` frequencies ``(ky, kx)`` in cycles/px.
    """

    box_size: int
    radius_fftfreq: float
    flat_indices: torch.Tensor
    freqs_yx: torch.Tensor

    @property
    def n_coeff(self) -> int:
        return int(self.flat_indices.numel())

    @property
    def dim(self) -> int:
        """Length of a search vector (2 reals per coefficient)."""
        return 2 * self.n_coeff

    def to(self, device: torch.device | str) -> Disc:
        """The same selection with its tensors on ``device``."""
        return Disc(
            self.box_size,
            self.radius_fftfreq,
            self.flat_indices.to(device),
            self.freqs_yx.to(device),
        )


def make_disc(box_size: int, radius_fftfreq: float, *, device: torch.device | str = "cpu") -> Disc:
    """Select the disc coefficients for a box and a resolution limit.

    Parameters
    ----------
    box_size : int
        Image side ``N`` in px.
    radius_fftfreq : float
        Disc radius in cycles/px, ``pixel_size_angstrom / resolution_angstrom``.

    Returns
    -------
    Disc

    Raises
    ------
    ValueError
        If the disc holds no coefficient (radius below 1/N).
    """
    freqs = fftfreq_grid_rfft2(box_size, device=device, dtype=torch.float64)
    ky, kx = freqs[..., 0], freqs[..., 1]
    radius = torch.sqrt(ky**2 + kx**2)
    keep = (radius > 0) & (radius <= radius_fftfreq + 1e-9) & (radius < 0.5)
    keep &= (kx > 0) | ((kx == 0) & (ky > 0))
    flat = torch.nonzero(keep.reshape(-1)).reshape(-1)
    if flat.numel() == 0:
        raise ValueError(
            f"no Fourier coefficient within {radius_fftfreq:.4f} cycles/px for box {box_size}: "
            "the resolution limit is coarser than the box allows"
        )
    return Disc(
        box_size=box_size,
        radius_fftfreq=float(radius_fftfreq),
        flat_indices=flat,
        freqs_yx=freqs.reshape(-1, 2)[flat].to(torch.float32),
    )


def extract_disc(spectra: torch.Tensor, disc: Disc) -> torch.Tensor:
    """Gather disc coefficients.

    Parameters
    ----------
    spectra : torch.Tensor
        `(..., N, N // 2 + 1)` complex centred rfft.

    Returns
    -------
    torch.Tensor
        `(..., n_coeff)` complex.
    """
    return spectra.flatten(-2)[..., disc.flat_indices]


def images_to_disc(images: torch.Tensor, disc: Disc) -> torch.Tensor:
    """Real images `(..., N, N)` to their disc coefficients `(..., n_coeff)`."""
    return extract_disc(centred_rfft2(images), disc)


def disc_to_vectors(coeffs: torch.Tensor, box_size: int) -> torch.Tensor:
    """Complex disc coefficients to real search vectors (Parseval-weighted).

    Parameters
    ----------
    coeffs : torch.Tensor
        `(..., n_coeff)` complex coefficients.
    box_size : int
        Image side ``N``.

    Returns
    -------
    torch.Tensor
        `(..., 2 * n_coeff)` float32, real and imaginary parts interleaved,
        scaled by ``sqrt(2) / N`` so that squared distances equal band-limited
        image distances.
    """
    weight = math.sqrt(2.0) / box_size
    return (torch.view_as_real(coeffs.to(torch.complex64)) * weight).flatten(-2)


def normalise_vectors(vectors: torch.Tensor, metric: str) -> torch.Tensor:
    """Prepare vectors so that L2 search realises ``metric``.

    Parameters
    ----------
    vectors : torch.Tensor
        `(..., d)` search vectors.
    metric : {"l2", "cosine", "pearson"}
        ``l2``: unchanged (thesis eq. 4.8). ``cosine``: unit norm, so that
        ``|a − b|² = 2 − 2 cos(a, b)`` (eq. 4.9). ``pearson``: mean over
        components removed, then unit norm (eq. 4.10–4.12).

    Returns
    -------
    torch.Tensor
        `(..., d)` vectors.
    """
    if metric == "l2":
        return vectors
    if metric == "pearson":
        vectors = vectors - vectors.mean(dim=-1, keepdim=True)
    elif metric != "cosine":
        raise ValueError(f"unknown metric {metric!r}; use l2, cosine or pearson")
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def shift_phase_ramps(freqs_yx: torch.Tensor, shifts_yx_px: torch.Tensor) -> torch.Tensor:
    """Fourier shift filters for a set of shifts, on the disc only.

    Parameters
    ----------
    freqs_yx : torch.Tensor
        `(n_coeff, 2)` frequencies in cycles/px.
    shifts_yx_px : torch.Tensor
        `(..., 2)` shifts in px (content moves by ``+s``).

    Returns
    -------
    torch.Tensor
        `(..., n_coeff)` complex64 factors ``exp(-2πi k·s)``.
    """
    phase = -2.0 * math.pi * (shifts_yx_px.to(freqs_yx.dtype) @ freqs_yx.T)
    return torch.polar(torch.ones_like(phase), phase).to(torch.complex64)
