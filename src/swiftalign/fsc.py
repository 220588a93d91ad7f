"""Fourier shell correlation, masks, resolution and low-pass filters.

FSC curves come from ``torch-fourier-shell-correlation``. The masked FSC is
corrected for the mask's own correlation by phase randomisation beyond the
point where the unmasked FSC falls below 0.8 (Chen et al. 2013,
Ultramicroscopy 135:24–35):
``FSC_true = (FSC_masked − FSC_randomised) / (1 − FSC_randomised)``.
Shell ``i`` is the spatial frequency ``i / N`` cycles/px, i.e. ``N·Ts / i`` Å.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from swiftalign.errors import SwiftalignError

__all__ = [
    "fsc_curve",
    "resolution_at",
    "estimate_resolution",
    "ResolutionEstimate",
    "shell_voxel_counts",
    "require_signal",
    "lowpass",
    "auto_solvent_mask",
    "FscResult",
    "gold_standard_fsc",
    "solvent_mask_fraction",
    "guinier_log_amplitudes",
    "write_fsc_star",
]


def _shell_coordinate(shape: tuple[int, ...], device=None) -> torch.Tensor:
    """`(D, H, W // 2 + 1)` continuous shell coordinate ``|k|·N`` of each rfftn voxel."""
    n = min(shape)
    kz = torch.fft.fftfreq(shape[0], device=device)
    ky = torch.fft.fftfreq(shape[1], device=device)
    kx = torch.fft.rfftfreq(shape[2], device=device)
    k2 = kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2
    return torch.sqrt(k2) * n


def shell_sums(values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Sums over Fourier shells of rfftn-grid values, with linear shell interpolation.

    A voxel at shell coordinate ``|k|·N = i + f`` adds ``(1 − f)`` of its value to
    shell ``i`` and ``f`` to shell ``i + 1`` (the weighting of
    ``torch-fourier-shell-correlation``, without its per-shell loop: one
    ``bincount`` per quantity).

    Parameters
    ----------
    values : torch.Tensor
        `(q, D, H, W // 2 + 1)` real values on the rfftn grid of a `shape` volume.
    shape : tuple
        ``(D, H, W)`` of the real-space volume.

    Returns
    -------
    torch.Tensor
        `(q, min(shape) // 2 + 1)` float64 sums.
    """
    n_shells = min(shape) // 2 + 1
    base, frac = _shell_weights(tuple(shape), values.device)
    out = []
    for v in values.reshape(values.shape[0], -1).double():
        lower = torch.bincount(base, weights=v * (1 - frac))
        upper = torch.bincount(base + 1, weights=v * frac)
        out.append(lower[:n_shells] + upper[:n_shells])
    return torch.stack(out)


@functools.lru_cache(maxsize=4)
def _shell_weights(shape: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat lower shell index and fraction ``(i, f)`` of each rfftn voxel (cached per shape)."""
    coord = _shell_coordinate(shape, device).reshape(-1).double()
    base = torch.floor(coord)
    return base.long(), coord - base


def fsc_curve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC between two `(N, N, N)` maps: `(N // 2 + 1,)` values, shell 0 = DC (1 by definition).

    ``FSC_i = Σ w Re(A·B*) / sqrt(Σ w |A|² · Σ w |B|²)`` over the rfftn voxels with
    the linear shell weights ``w`` of :func:`shell_sums` (the definition of
    ``torch_fourier_shell_correlation.fourier_shell_correlation``, computed with
    one float32 FFT per map and three bincounts).
    """
    return _fsc_of_spectra(_rfftn(a), _rfftn(b), tuple(np.shape(a)))


def _rfftn(volume: np.ndarray) -> torch.Tensor:
    return torch.fft.rfftn(torch.as_tensor(np.asarray(volume, dtype=np.float32)))


def _fsc_of_spectra(ta: torch.Tensor, tb: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """:func:`fsc_curve` from the two maps' `(D, H, W//2+1)` rfftn spectra."""
    sums = shell_sums(torch.stack([(ta * tb.conj()).real, ta.abs() ** 2, tb.abs() ** 2]), shape)
    denom = torch.sqrt(sums[1] * sums[2])
    fsc = torch.where(denom > 0, sums[0] / torch.where(denom > 0, denom, 1.0), 0.0)
    fsc[0] = 1.0
    return fsc.numpy().astype(np.float32)


#: A shell carries signal when its FSC exceeds this many standard deviations of the FSC
#: of unrelated maps, ``1/sqrt(n)`` for ``n`` independent voxels (van Heel & Schatz 2005).
SIGNAL_SIGMAS = 3.0
#: A later rise of the FSC above ``threshold + RISE_MARGIN`` (and significant) is warned about.
RISE_MARGIN = 0.2


@dataclass
class ResolutionEstimate:
    """Where an FSC curve crosses a threshold, honestly.

    Attributes
    ----------
    resolution_angstrom : float
        Crossing (Å); Nyquist ``2·Ts`` when the curve never crosses (then a
        bound); NaN when there is no signal.
    is_bound : bool
        The curve never falls below the threshold: the resolution is ``≤``
        Nyquist (limited by the pixel size, not measured).
    no_signal : bool
        No shell before the crossing correlates beyond chance.
    message : str or None
        Why there is no signal, or a warning that the curve rises well above
        the threshold again after crossing it.
    """

    resolution_angstrom: float
    is_bound: bool = False
    no_signal: bool = False
    message: str | None = None

    def text(self) -> str:
        """``"3.20 Å"``, ``"≤ 3.20 Å"`` (bound) or ``"no signal"``."""
        if self.no_signal:
            return "no signal"
        return f"{'≤ ' if self.is_bound else ''}{self.resolution_angstrom:.2f} Å"


def shell_voxel_counts(box_size: int) -> np.ndarray:
    """`(N // 2 + 1,)` independent Fourier voxels per shell (the rfft half grid, shells rounded)."""
    shell = np.round(_radius_fftfreq(box_size) * box_size).astype(int).ravel()
    return np.bincount(shell[shell <= box_size // 2], minlength=box_size // 2 + 1)


def estimate_resolution(fsc: np.ndarray, threshold: float, box_size: int,
                        pixel_size_angstrom: float) -> ResolutionEstimate:
    """Resolution where the FSC first falls below ``threshold``, with its caveats.

    The crossing is interpolated linearly between shells (``N·Ts / shell`` Å).
    There is *no signal* when the curve is not finite, or when no shell before
    the crossing exceeds both the threshold and ``SIGNAL_SIGMAS/sqrt(n)`` (``n``
    independent voxels of the shell: the spread of the FSC of unrelated maps),
    so two noise maps or two empty maps give no resolution (RELION refuses them
    too). A curve that never crosses gives Nyquist as a bound. A resolution is
    never coarser than the box. A curve that rises again above ``threshold +
    RISE_MARGIN`` (significantly) after the crossing gets a warning message.

    Parameters
    ----------
    fsc : np.ndarray
        `(N // 2 + 1,)` FSC per shell, shell 0 = DC.
    threshold : float
    box_size : int
    pixel_size_angstrom : float

    Returns
    -------
    ResolutionEstimate
    """
    fsc = np.asarray(fsc, dtype=np.float64)
    nyquist = 2.0 * pixel_size_angstrom
    if len(fsc) < 2 or not np.all(np.isfinite(fsc[1:])):
        return ResolutionEstimate(float("nan"), no_signal=True,
                                  message="the FSC is not finite (empty or constant maps)")
    sigma = 1.0 / np.sqrt(np.maximum(shell_voxel_counts(box_size)[: len(fsc)], 1))
    significant = fsc > np.maximum(threshold, SIGNAL_SIGMAS * sigma)
    below = np.nonzero(fsc[1:] < threshold)[0]
    cross = int(below[0]) + 1 if len(below) else len(fsc)
    if not significant[1:cross].any():
        return ResolutionEstimate(float("nan"), no_signal=True, message=(
            f"no shell correlates beyond chance before the FSC falls below {threshold:g} "
            "(independent noise or empty maps)"))
    if cross == len(fsc):
        return ResolutionEstimate(nyquist, is_bound=True)
    prev = fsc[cross - 1]
    frac = (prev - threshold) / (prev - fsc[cross]) if prev != fsc[cross] else 0.0
    res = float(box_size * pixel_size_angstrom / max((cross - 1) + frac, 1.0))
    rise = np.nonzero(significant[cross:] & (fsc[cross:] > threshold + RISE_MARGIN))[0]
    message = None
    if len(rise):
        j = cross + int(rise[np.argmax(fsc[cross + rise])])  # the highest rise
        message = (f"the FSC falls below {threshold:g} at {res:.2f} Å but rises to {fsc[j]:.2f} "
                   f"at {box_size * pixel_size_angstrom / j:.2f} Å: check the mask, the "
                   "half-set split and the symmetry")
    return ResolutionEstimate(res, message=message)


def resolution_at(fsc: np.ndarray, threshold: float, box_size: int,
                  pixel_size_angstrom: float) -> float:
    """Resolution (Å) where the FSC first falls below ``threshold`` (linear interpolation).

    Returns the Nyquist resolution ``2·Ts`` (a bound) when the curve never falls
    below it, and NaN when there is no signal (see :func:`estimate_resolution`).
    """
    return estimate_resolution(fsc, threshold, box_size, pixel_size_angstrom).resolution_angstrom


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
    r = _shell_coordinate(volume.shape) / n
    x = torch.clamp((r - (cut - width / 2)) / width, 0.0, 1.0)
    filt = 0.5 * (1 + torch.cos(torch.pi * x))
    spec = torch.fft.rfftn(torch.as_tensor(np.asarray(volume, dtype=np.float32))) * filt
    return torch.fft.irfftn(spec, s=volume.shape).numpy()


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


def _randomise_phases(spectrum: torch.Tensor, shape: tuple[int, ...], from_shell: int,
                      rng: np.random.Generator) -> np.ndarray:
    """The `shape` map of an rfftn ``spectrum`` with random phases from shell ``from_shell`` on."""
    spec = spectrum.clone()
    sel = torch.round(_shell_coordinate(shape)) >= from_shell
    phases = torch.as_tensor(rng.uniform(0, 2 * np.pi, int(sel.sum())), dtype=torch.float32)
    spec[sel] = torch.polar(spec[sel].abs(), phases)
    return torch.fft.irfftn(spec, s=shape).numpy()


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
    resolution_is_bound : bool
        The corrected FSC never falls below the threshold: ``resolution_angstrom``
        is Nyquist, a bound (``≤``), not a measurement.
    no_signal : bool
        The half maps do not correlate beyond chance (resolutions are NaN).
    messages : tuple of str
        Why there is no signal, or warnings (a curve that rises again).
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
    resolution_is_bound: bool = False
    no_signal: bool = False
    messages: tuple[str, ...] = ()

    def resolution_text(self) -> str:
        """``"3.20 Å"``, ``"≤ 3.20 Å"`` (bound) or ``"no signal"``."""
        return ResolutionEstimate(self.resolution_angstrom, self.resolution_is_bound,
                                  self.no_signal).text()


class NoSignalError(SwiftalignError, ValueError):
    """Two half maps without correlation: no resolution can be given."""


def require_signal(fsc: FscResult, where: str) -> None:
    """Stop when the half maps carry no signal.

    Parameters
    ----------
    fsc : FscResult
    where : str
        What was compared, e.g. ``"iteration 3, class 1"``; starts the message.

    Raises
    ------
    NoSignalError
        When ``fsc.no_signal``.
    """
    if fsc.no_signal:
        why = fsc.messages[0] if fsc.messages else "the half maps do not correlate"
        raise NoSignalError(f"{where}: no signal in the half maps ({why}); check the "
                            "reference, the symmetry and the particles")


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
    n, shape = half1.shape[0], tuple(half1.shape)
    spectra = _rfftn(half1), _rfftn(half2)  # once: unmasked FSC and phase randomisation
    unmasked = _fsc_of_spectra(*spectra, shape)
    masked = fsc_curve(half1 * mask, half2 * mask)
    below = np.nonzero(unmasked[1:] < 0.8)[0]
    start = int(below[0] + 1) if len(below) else len(unmasked)
    rng = np.random.default_rng(seed)
    if start < len(unmasked):
        r1 = _randomise_phases(spectra[0], shape, start, rng)
        r2 = _randomise_phases(spectra[1], shape, start, rng)
        rand = fsc_curve(r1 * mask, r2 * mask)
    else:
        rand = np.zeros_like(masked)
    corrected = masked.copy()
    # corrected from 2 shells past the randomisation start, as relion_postprocess (RELION 3.1
    # calculateFSCtrue: "small artefacts near the resolution of randomisation")
    tail = np.arange(len(masked)) >= start + 2
    denom = np.where(np.abs(1 - rand) < 1e-6, 1e-6, 1 - rand)
    corrected[tail] = (masked[tail] - rand[tail]) / denom[tail]
    shells = np.arange(len(unmasked))
    with np.errstate(divide="ignore"):
        res_shell = np.where(shells > 0, n * pixel_size_angstrom / np.maximum(shells, 1), np.inf)
    main = estimate_resolution(corrected, threshold, n, pixel_size_angstrom)
    plain = estimate_resolution(unmasked, threshold, n, pixel_size_angstrom)
    res05 = estimate_resolution(corrected, 0.5, n, pixel_size_angstrom)
    no_signal = main.no_signal
    messages = (main.message,) if main.message else ()
    if messages and not no_signal:
        warnings.warn(f"FSC: {main.message}", stacklevel=2)
    nan = float("nan")
    return FscResult(
        resolution_per_shell_angstrom=res_shell,
        unmasked=unmasked,
        masked=masked,
        randomised=rand,
        corrected=corrected,
        resolution_angstrom=nan if no_signal else main.resolution_angstrom,
        resolution_05_angstrom=nan if no_signal or res05.no_signal else res05.resolution_angstrom,
        resolution_unmasked_angstrom=plain.resolution_angstrom,
        randomised_from_shell=start,
        threshold=threshold,
        resolution_is_bound=main.is_bound and not no_signal,
        no_signal=no_signal,
        messages=messages,
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
    from pathlib import Path

    import pandas as pd
    import starfile

    from swiftalign.io.atomic import atomic_write

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
    # not RELION labels (RELION skips unknown ones), written only when set so that other files
    # keep relion_postprocess's labels exactly: rlnFinalResolution is only a bound (the FSC
    # never fell below the threshold: ≤ Nyquist), or there is no signal (999, "no resolution")
    if fsc.resolution_is_bound:
        general["swiftalignResolutionIsBound"] = 1
    if fsc.no_signal:
        general["swiftalignNoSignal"] = 1
        general["rlnFinalResolution"] = 999.0
    with atomic_write(path) as tmp:
        starfile.write({"general": general, "fsc": table, "guinier": guinier}, tmp, overwrite=True)
