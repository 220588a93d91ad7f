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

DCT features (``transform="dct"``, thesis ch. 7): the orthonormal 2D DCT-II
of the image (``scipy.fft.dctn``, ``norm="ortho"``) restricted to the
low-frequency quarter disc ``0 < |k| <= r`` with ``k = (u, v) / (2N)``
cycles/px for DCT index ``(u, v)``. The DCT is orthonormal, so vector distances
equal distances of the DCT-band-limited images without any extra weight. A
shift is not a phase ramp in DCT space: shifted references are made by a
Fourier phase ramp on the whole image, back to real space, then the DCT
(:func:`spectra_to_features`), which costs two FFTs and a DCT per reference pose.

Coefficient weights (noise whitening, :mod:`swiftalign.noise`) are real
per-coefficient factors ``w(|k|)`` applied to particles and references alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
import torch

from swiftalign.conventions import centred_irfft2, centred_rfft2, fftfreq_grid_rfft2

__all__ = [
    "Disc",
    "make_disc",
    "extract_disc",
    "disc_to_vectors",
    "normalise_vectors",
    "shift_phase_ramps",
    "images_to_disc",
    "spectra_to_features",
    "dct_features",
    "TRANSFORMS",
]

#: Feature transforms: centred rfft disc (``dft``) or orthonormal DCT-II quarter disc (``dct``).
TRANSFORMS = ("dft", "dct")


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
        `(n_coeff,)` int64 indices into the flattened `(N, N // 2 + 1)` rfft
        (``dft``) or the flattened `(N, N)` DCT (``dct``).
    freqs_yx : torch.Tensor
        `(n_coeff, 2)` frequencies ``(ky, kx)`` in cycles/px (DCT index / 2N for ``dct``).
    transform : str
        ``dft`` (complex coefficients) or ``dct`` (real coefficients).
    """

    box_size: int
    radius_fftfreq: float
    flat_indices: torch.Tensor
    freqs_yx: torch.Tensor
    transform: str = "dft"

    @property
    def n_coeff(self) -> int:
        """Coefficients in the disc."""
        return int(self.flat_indices.numel())

    @property
    def dim(self) -> int:
        """Length of a search vector (2 reals per DFT coefficient, 1 per DCT coefficient)."""
        return 2 * self.n_coeff if self.transform == "dft" else self.n_coeff

    @property
    def shell_index(self) -> torch.Tensor:
        """`(n_coeff,)` int64 Fourier shell ``round(|k|·N)`` of every coefficient."""
        return torch.round(self.freqs_yx.double().norm(dim=-1) * self.box_size).long()

    def to(self, device: torch.device | str) -> Disc:
        """The same selection with its tensors on ``device``."""
        return Disc(
            self.box_size,
            self.radius_fftfreq,
            self.flat_indices.to(device),
            self.freqs_yx.to(device),
            self.transform,
        )


def make_disc(
    box_size: int,
    radius_fftfreq: float,
    *,
    transform: str = "dft",
    device: torch.device | str = "cpu",
) -> Disc:
    """Select the disc coefficients for a box and a resolution limit.

    Parameters
    ----------
    box_size : int
        Image side ``N`` in px.
    radius_fftfreq : float
        Disc radius in cycles/px, ``pixel_size_angstrom / resolution_angstrom``.
    transform : {"dft", "dct"}
        ``dft``: half disc of the centred rfft (one of each Friedel pair).
        ``dct``: quarter disc of the orthonormal DCT-II, ``k = (u, v) / (2N)``;
        it holds as many reals as the DFT half disc.

    Returns
    -------
    Disc

    Raises
    ------
    ValueError
        If the disc holds no coefficient (radius below 1/N), or for an unknown transform.
    """
    if transform == "dct":
        idx = torch.arange(box_size, device=device, dtype=torch.float64) / (2 * box_size)
        freqs = torch.stack(torch.meshgrid(idx, idx, indexing="ij"), dim=-1)
    elif transform == "dft":
        freqs = fftfreq_grid_rfft2(box_size, device=device, dtype=torch.float64)
    else:
        raise ValueError(f"--transform {transform!r}: use dft or dct")
    ky, kx = freqs[..., 0], freqs[..., 1]
    radius = torch.sqrt(ky**2 + kx**2)
    keep = (radius > 0) & (radius <= radius_fftfreq + 1e-9) & (radius < 0.5)
    if transform == "dft":
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
        transform=transform,
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


def dct_features(images: torch.Tensor, disc: Disc) -> torch.Tensor:
    """Orthonormal 2D DCT-II (``scipy.fft.dctn``) of images, cut to the quarter disc.

    Parameters
    ----------
    images : torch.Tensor
        `(..., N, N)` real images.
    disc : Disc
        A ``dct`` selection.

    Returns
    -------
    torch.Tensor
        `(..., n_coeff)` float32 on the images' device.
    """
    arr = images.detach().to("cpu", torch.float32).numpy()
    coeffs = scipy.fft.dctn(arr, type=2, norm="ortho", axes=(-2, -1))
    flat = coeffs.reshape(*coeffs.shape[:-2], -1)[..., disc.flat_indices.cpu().numpy()]
    return torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32)).to(images.device)


def spectra_to_features(spectra: torch.Tensor, disc: Disc) -> torch.Tensor:
    """Centred rfft spectra `(..., N, N // 2 + 1)` to the disc's features `(..., n_coeff)`.

    ``dft``: the disc coefficients (complex). ``dct``: back to real space, then
    :func:`dct_features` (real).
    """
    if disc.transform == "dct":
        n = disc.box_size
        return dct_features(centred_irfft2(spectra, (n, n)), disc)
    return extract_disc(spectra, disc)


def images_to_disc(images: torch.Tensor, disc: Disc) -> torch.Tensor:
    """Real images `(..., N, N)` to their disc features `(..., n_coeff)` (complex DFT, real DCT)."""
    if disc.transform == "dct":
        return dct_features(images, disc)
    return extract_disc(centred_rfft2(images), disc)


def disc_to_vectors(coeffs: torch.Tensor, box_size: int) -> torch.Tensor:
    """Complex disc coefficients to real search vectors (Parseval-weighted).

    Parameters
    ----------
    coeffs : torch.Tensor
        `(..., n_coeff)` complex DFT coefficients, or real DCT coefficients.
    box_size : int
        Image side ``N``.

    Returns
    -------
    torch.Tensor
        `(..., 2 * n_coeff)` float32, real and imaginary parts interleaved,
        scaled by ``sqrt(2) / N`` so that squared distances equal band-limited
        image distances; for real (orthonormal DCT) input `(..., n_coeff)`
        unchanged (float32).
    """
    if not coeffs.is_complex():
        return coeffs.to(torch.float32)
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
