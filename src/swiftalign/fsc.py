"""Fourier shell correlation, masks, resolution and low-pass filters.

FSC curves come from ``torch-fourier-shell-correlation``. The masked FSC is
corrected for the mask's own correlation by phase randomisation beyond the
point where the unmasked FSC falls below 0.8 (Chen et al. 2013,
Ultramicroscopy 135:24–35):
``FSC_true = (FSC_masked − FSC_randomised) / (1 − FSC_randomised)``.
Shell ``i`` is the spatial frequency ``i / N`` cycles/px, i.e. ``N·Ts / i`` Å.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch_fourier_shell_correlation import fourier_shell_correlation

__all__ = [
    "fsc_curve",
    "resolution_at",
    "lowpass",
    "auto_solvent_mask",
    "FscResult",
    "gold_standard_fsc",
    "solvent_mask_fraction",
    "guinier_log_amplitudes",
    "write_fsc_star",
]


def fsc_curve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC between two `(N, N, N)` maps: `(N // 2 + 1,)` values, shell 0 = DC."""
    return fourier_shell_correlation(torch.as_tensor(a), torch.as_tensor(b)).numpy()


def resolution_at(fsc: np.ndarray, threshold: float, box_size: int,
                  pixel_size_angstrom: float) -> float:
    """Resolution (Å) where the FSC first falls below ``threshold`` (linear interpolation).

    Returns the Nyquist resolution ``2·Ts`` when the curve never falls below it.
    """
    fsc = np.asarray(fsc, dtype=np.float64)
    for i in range(1, len(fsc)):
        if fsc[i] < threshold:
            prev = fsc[i - 1]
            frac = (prev - threshold) / (prev - fsc[i]) if prev != fsc[i] else 0.0
            shell = (i - 1) + frac
            shell = max(shell, 0.5)
            return float(box_size * pixel_size_angstrom / shell)
    return float(2 * pixel_size_angstrom)


def _radius_fftfreq(box: int) -> np.ndarray:
    k = np.fft.fftfreq(box)
    kr = np.fft.rfftfreq(box)
    return np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2)


def lowpass(volume: np.ndarray, resolution_angstrom: float, pixel_size_angstrom: float,
            *, edge_shells: float = 2.0) -> np.ndarray:
    """Low-pass a `(N, N, N)` map at ``resolution_angstrom`` with a raised-cosine edge.

    The edge is ``edge_shells`` Fourier shells wide, centred on the cut-off.
    """
    n = volume.shape[0]
    cut = pixel_size_angstrom / resolution_angstrom  # cycles/px
    width = edge_shells / n
    r = _radius_fftfreq(n)
    x = np.clip((r - (cut - width / 2)) / width, 0.0, 1.0)
    filt = 0.5 * (1 + np.cos(np.pi * x))
    spec = np.fft.rfftn(volume) * filt
    return np.fft.irfftn(spec, s=volume.shape, axes=(0, 1, 2)).astype(np.float32)


def auto_solvent_mask(volume: np.ndarray, pixel_size_angstrom: float, *,
                      resolution_angstrom: float = 15.0, threshold_fraction: float = 0.1,
                      dilate_px: int = 3, soft_edge_px: int = 4) -> np.ndarray:
    """Soft solvent mask from a map: low-pass, threshold, dilate, cosine edge.

    Parameters
    ----------
    volume : np.ndarray
        `(N, N, N)` map (e.g. the average of the half maps).
    resolution_angstrom : float
        Low-pass before thresholding.
    threshold_fraction : float
        Threshold relative to the low-passed map's maximum.

    Returns
    -------
    np.ndarray
        `(N, N, N)` float32 in [0, 1].
    """
    lp = lowpass(volume, max(resolution_angstrom, 2.5 * pixel_size_angstrom), pixel_size_angstrom)
    binary = lp > threshold_fraction * lp.max()
    if dilate_px > 0:
        binary = ndimage.binary_dilation(binary, iterations=dilate_px)
    dist = ndimage.distance_transform_edt(~binary)
    mask = np.where(binary, 1.0, 0.5 * (1 + np.cos(np.pi * np.clip(dist / soft_edge_px, 0, 1))))
    mask[dist >= soft_edge_px] = 0.0
    return mask.astype(np.float32)


def _randomise_phases(volume: np.ndarray, from_shell: int, rng: np.random.Generator) -> np.ndarray:
    n = volume.shape[0]
    spec = np.fft.rfftn(volume)
    shell = np.round(_radius_fftfreq(n) * n)
    sel = shell >= from_shell
    phases = rng.uniform(0, 2 * np.pi, int(sel.sum()))
    spec[sel] = np.abs(spec[sel]) * np.exp(1j * phases)
    return np.fft.irfftn(spec, s=volume.shape, axes=(0, 1, 2)).astype(np.float32)


@dataclass
class FscResult:
    """FSC curves of two half maps, and resolutions (Å).

    Attributes
    ----------
    resolution_per_shell_angstrom : np.ndarray
        `(n_shells,)` ``N·Ts / i`` (inf for shell 0).
    unmasked, masked, randomised, corrected : np.ndarray
        `(n_shells,)` FSC curves.
    resolution_angstrom : float
        Corrected FSC at the chosen threshold (0.143 by default).
    resolution_05_angstrom : float
        Corrected FSC at 0.5.
    resolution_unmasked_angstrom : float
        Unmasked FSC at the chosen threshold.
    randomised_from_shell : int
    threshold : float
    """

    resolution_per_shell_angstrom: np.ndarray
    unmasked: np.ndarray
    masked: np.ndarray
    randomised: np.ndarray
    corrected: np.ndarray
    resolution_angstrom: float
    resolution_05_angstrom: float
    resolution_unmasked_angstrom: float
    randomised_from_shell: int
    threshold: float


def gold_standard_fsc(half1: np.ndarray, half2: np.ndarray, mask: np.ndarray,
                      pixel_size_angstrom: float, *, threshold: float = 0.143,
                      seed: int = 0) -> FscResult:
    """Unmasked, masked and phase-randomisation-corrected FSC of two half maps.

    Parameters
    ----------
    half1, half2 : np.ndarray
        `(N, N, N)` independent half maps.
    mask : np.ndarray
        `(N, N, N)` soft solvent mask.
    pixel_size_angstrom : float
    threshold : float
        FSC threshold for the reported resolution (0.143: Rosenthal & Henderson 2003).
    seed : int
        Seed of the phase randomisation.

    Returns
    -------
    FscResult
    """
    n = half1.shape[0]
    unmasked = fsc_curve(half1, half2)
    masked = fsc_curve(half1 * mask, half2 * mask)
    below = np.nonzero(unmasked[1:] < 0.8)[0]
    start = int(below[0] + 1) if len(below) else len(unmasked)
    rng = np.random.default_rng(seed)
    if start < len(unmasked):
        r1 = _randomise_phases(half1, start, rng)
        r2 = _randomise_phases(half2, start, rng)
        rand = fsc_curve(r1 * mask, r2 * mask)
    else:
        rand = np.zeros_like(masked)
    corrected = masked.copy()
    tail = np.arange(len(masked)) >= start
    denom = np.where(np.abs(1 - rand) < 1e-6, 1e-6, 1 - rand)
    corrected[tail] = (masked[tail] - rand[tail]) / denom[tail]
    shells = np.arange(len(unmasked))
    with np.errstate(divide="ignore"):
        res_shell = np.where(shells > 0, n * pixel_size_angstrom / np.maximum(shells, 1), np.inf)
    return FscResult(
        resolution_per_shell_angstrom=res_shell,
        unmasked=unmasked,
        masked=masked,
        randomised=rand,
        corrected=corrected,
        resolution_angstrom=resolution_at(corrected, threshold, n, pixel_size_angstrom),
        resolution_05_angstrom=resolution_at(corrected, 0.5, n, pixel_size_angstrom),
        resolution_unmasked_angstrom=resolution_at(unmasked, threshold, n, pixel_size_angstrom),
        randomised_from_shell=start,
        threshold=threshold,
    )


def solvent_mask_fraction(mask: np.ndarray) -> float:
    """RELION's ``rlnParticleBoxFractionSolventMask``: ``0.476 / (fraction of voxels > 0.5)``.

    The factor ``f`` of the particle-mask-fraction FSC ``f·FSC / (1 + (f − 1)·FSC)``
    (RELION 3.1 ``relion_postprocess``).
    """
    inside = float(np.mean(np.asarray(mask) > 0.5))
    return 0.476 / inside if inside > 0 else 0.0


def guinier_log_amplitudes(volume: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Ln of the mean Fourier amplitude per shell, as in RELION's Guinier plot.

    Parameters
    ----------
    volume : np.ndarray
        `(N, N, N)` map; transformed with a ``1/N³`` normalisation (as RELION).
    weights : np.ndarray, optional
        `(N // 2 + 1,)` weight per shell applied to the amplitudes first.

    Returns
    -------
    np.ndarray
        `(N // 2 + 1,)` values; ``-99`` where the mean amplitude is 0 (RELION's marker).
    """
    n = volume.shape[0]
    amp = np.abs(np.fft.rfftn(volume)) / n**3
    shell = np.round(_radius_fftfreq(n) * n).astype(int)
    n_shells = n // 2 + 1
    inside = shell < n_shells
    if weights is not None:
        amp = amp * np.asarray(weights, dtype=np.float64)[np.minimum(shell, n_shells - 1)]
    total = np.bincount(shell[inside], amp[inside], minlength=n_shells)
    count = np.bincount(shell[inside], minlength=n_shells)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(total / np.maximum(count, 1))
    return np.where(total > 0, out, -99.0)


def write_fsc_star(
    path,
    fsc: FscResult,
    pixel_size_angstrom: float,
    *,
    average_map: np.ndarray,
    mask: np.ndarray,
    half_map_names: tuple[str, str] = ("half1.mrc", "half2.mrc"),
    mask_name: str = "auto",
) -> None:
    """Write the FSC as a RELION 3.1 ``relion_postprocess`` STAR file (atomically).

    Blocks and columns follow ``relion_postprocess`` (without sharpening):
    ``general`` (rlnFinalResolution, rlnBfactorUsedForSharpening,
    rlnUnfilteredMapHalf1/2, rlnParticleBoxFractionSolventMask, rlnMaskName,
    rlnRandomiseFrom), ``fsc`` (rlnSpectralIndex, rlnResolution (1/Å),
    rlnAngstromResolution, the corrected, particle-mask-fraction, unmasked,
    masked and phase-randomised FSCs) and ``guinier`` (rlnResolutionSquared
    (1/Å²), rlnLogAmplitudesOriginal, rlnLogAmplitudesWeighted: after the
    ``sqrt(2·FSC/(1 + FSC))`` weighting).

    Parameters
    ----------
    path : str or Path
    fsc : FscResult
    pixel_size_angstrom : float
    average_map : np.ndarray
        `(N, N, N)` unfiltered average of the half maps (for the Guinier block).
    mask : np.ndarray
        `(N, N, N)` solvent mask used for the masked FSC.
    half_map_names, mask_name : str
        Names written in the ``general`` block.
    """
    import os
    from pathlib import Path

    import pandas as pd
    import starfile

    from swiftalign.io.mrc import atomic_path

    path = Path(path)
    n_shells = len(fsc.unmasked)
    box = average_map.shape[0]
    shells = np.arange(n_shells)
    angstrom = np.where(shells > 0, box * pixel_size_angstrom / np.maximum(shells, 1), 999.0)
    frac = solvent_mask_fraction(mask)
    corrected = np.asarray(fsc.corrected, dtype=np.float64)
    denom = 1 + (frac - 1) * corrected
    part = frac * corrected / np.where(np.abs(denom) > 1e-12, denom, np.inf)
    table = pd.DataFrame({
        "rlnSpectralIndex": shells,
        "rlnResolution": 1.0 / angstrom,
        "rlnAngstromResolution": angstrom,
        "rlnFourierShellCorrelationCorrected": corrected,
        "rlnFourierShellCorrelationParticleMaskFraction": part,
        "rlnFourierShellCorrelationUnmaskedMaps": fsc.unmasked,
        "rlnFourierShellCorrelationMaskedMaps": fsc.masked,
        "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": fsc.randomised,
    })
    # FSC weighting as relion_postprocess: zero from the first shell where FSC < 1e-4
    below = np.nonzero(corrected < 1e-4)[0]
    last = int(below[0]) - 1 if len(below) else n_shells - 1
    weight = np.where(corrected > 0, np.sqrt(2 * np.clip(corrected, 0, None) / (1 + corrected)), 0.0)
    weight[shells > last] = 0.0
    until_nyquist = angstrom >= 2 * pixel_size_angstrom - 1e-9
    guinier = pd.DataFrame({
        "rlnResolutionSquared": np.where(shells > 0, 1.0 / angstrom**2, 0.0)[until_nyquist],
        "rlnLogAmplitudesOriginal": guinier_log_amplitudes(average_map)[until_nyquist],
        "rlnLogAmplitudesWeighted": guinier_log_amplitudes(average_map, weight)[until_nyquist],
    })
    general = {
        "rlnFinalResolution": float(fsc.resolution_angstrom),
        "rlnBfactorUsedForSharpening": 0.0,
        "rlnUnfilteredMapHalf1": half_map_names[0],
        "rlnUnfilteredMapHalf2": half_map_names[1],
        "rlnParticleBoxFractionSolventMask": frac,
        "rlnMaskName": mask_name,
        "rlnRandomiseFrom": float(box * pixel_size_angstrom / max(fsc.randomised_from_shell, 1)),
    }
    tmp = atomic_path(path)
    try:
        starfile.write({"general": general, "fsc": table, "guinier": guinier}, tmp, overwrite=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
