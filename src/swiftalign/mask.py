"""Solvent masks as ``relion_mask_create`` makes them, and a RELION-style low-pass filter.

A mask is made in three steps (RELION 3.1 ``autoMask`` in ``src/mask.cpp``):
binarise at a density threshold (``value >= threshold``), extend the binary
mask by ``extend_px`` (a voxel joins when a voxel of the binary mask lies at a
distance ``< extend_px``), and add a raised-cosine edge ``0.5 + 0.5·cos(π·d/W)``
for voxels at distance ``d < W = soft_edge_px`` from the extended mask.
Distances are exact Euclidean distances (``scipy.ndimage.distance_transform_edt``),
which is what RELION's brute-force neighbourhood search computes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "PROTEIN_DENSITY_DALTON_PER_CUBIC_ANGSTROM",
    "create_mask",
    "radius_in_shells",
    "relion_lowpass",
    "threshold_for_molecular_weight",
    "default_threshold",
]

#: 1.35 g/cm³ = 0.81 Da/Å³ (protein partial specific volume 0.74 cm³/g).
PROTEIN_DENSITY_DALTON_PER_CUBIC_ANGSTROM = 0.81


def radius_in_shells(box: int) -> np.ndarray:
    """`(N, N, N // 2 + 1)` distance from the origin of each rfft voxel, in shells (1/N cycles/px)."""
    k = np.fft.fftfreq(box) * box
    kr = np.fft.rfftfreq(box) * box
    return np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2)


def relion_lowpass(volume: np.ndarray, resolution_angstrom: float, pixel_size_angstrom: float,
                   *, edge_shells: int = 2) -> np.ndarray:
    """Low-pass a `(N, N, N)` map with RELION's raised-cosine edge (``lowPassFilterMap``).

    The cut-off shell is ``round(N·Ts / resolution)``; the filter is 1 below
    ``cut − edge/2`` shells, 0 above ``cut + edge/2``, and
    ``0.5 + 0.5·cos(π·(r − low)/(high − low))`` between (RELION 3.1 ``src/fftw.cpp``).

    Parameters
    ----------
    volume : np.ndarray
        `(N, N, N)` map.
    resolution_angstrom : float
        Cut-off (Å).
    pixel_size_angstrom : float
        Voxel size (Å).
    edge_shells : int
        Width of the edge in Fourier shells (RELION's ``--filter_edge_width``, 2).

    Returns
    -------
    np.ndarray
        `(N, N, N)` float32 filtered map.
    """
    n = volume.shape[0]
    cut = round(n * pixel_size_angstrom / resolution_angstrom)
    half = edge_shells // 2
    low, high = max(0.0, cut - half), float(cut + half)
    r = radius_in_shells(n)
    x = np.clip((r - low) / max(high - low, 1e-9), 0.0, 1.0)
    filt = np.where(r > high, 0.0, 0.5 + 0.5 * np.cos(np.pi * x))
    spec = np.fft.rfftn(volume) * filt
    return np.fft.irfftn(spec, s=volume.shape, axes=(0, 1, 2)).astype(np.float32)


def threshold_for_molecular_weight(volume: np.ndarray, molecular_weight_kda: float,
                                   pixel_size_angstrom: float) -> float:
    """Density threshold that encloses the volume of ``molecular_weight_kda`` of protein.

    Volume = mass / 0.81 Da/Å³ (1.35 g/cm³); the threshold is the value of the
    ``n``-th largest voxel, ``n = volume / Ts³``.

    Raises
    ------
    ValueError
        When the molecular weight is not positive or its volume exceeds the box.
    """
    if not molecular_weight_kda > 0:
        raise ValueError(f"--molecular-weight-kda {molecular_weight_kda}: must be positive")
    volume_a3 = molecular_weight_kda * 1000.0 / PROTEIN_DENSITY_DALTON_PER_CUBIC_ANGSTROM
    n_voxels = int(round(volume_a3 / pixel_size_angstrom**3))
    if not 0 < n_voxels < volume.size:
        raise ValueError(f"--molecular-weight-kda {molecular_weight_kda}: {n_voxels} voxels of "
                         f"protein at {pixel_size_angstrom:.4g} Å/px do not fit in the "
                         f"{volume.shape} box")
    flat = np.sort(np.asarray(volume, dtype=np.float64).ravel())
    return float(flat[-n_voxels])


def default_threshold(volume: np.ndarray) -> float:
    """Threshold used when none is given: 10 % of the map's maximum.

    The same rule as the automatic mask of ``swiftalign refine``
    (:func:`swiftalign.fsc.auto_solvent_mask`, there after a 15 Å low-pass).
    """
    return 0.1 * float(np.max(volume))


def create_mask(volume: np.ndarray, threshold: float, *, extend_px: float = 0.0,
                soft_edge_px: float = 0.0) -> np.ndarray:
    """Binarise, extend and soften a map into a mask, as ``relion_mask_create``.

    Parameters
    ----------
    volume : np.ndarray
        `(N, N, N)` map (already low-passed if wanted).
    threshold : float
        Voxels ``>= threshold`` seed the mask (``--ini_threshold``).
    extend_px : float
        Extend (``> 0``) or shrink (``< 0``) the binary mask by this many voxels
        (``--extend_inimask``).
    soft_edge_px : float
        Width of the raised-cosine edge in voxels (``--width_soft_edge``).

    Returns
    -------
    np.ndarray
        `(N, N, N)` float32 mask in [0, 1].

    Raises
    ------
    ValueError
        When no voxel reaches the threshold.
    """
    binary = np.asarray(volume) >= threshold
    if not binary.any():
        raise ValueError(f"threshold {threshold:.4g}: no voxel of the map reaches it "
                         f"(maximum {float(np.max(volume)):.4g})")
    if extend_px > 0:
        binary = binary | (ndimage.distance_transform_edt(~binary) < extend_px)
    elif extend_px < 0:
        binary = binary & ~(ndimage.distance_transform_edt(binary) < -extend_px)
    mask = binary.astype(np.float64)
    if soft_edge_px > 0 and binary.any():
        dist = ndimage.distance_transform_edt(~binary)
        edge = (~binary) & (dist < soft_edge_px)
        mask[edge] = 0.5 + 0.5 * np.cos(np.pi * dist[edge] / soft_edge_px)
    return mask.astype(np.float32)
