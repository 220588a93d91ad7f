"""Post-processing of two half maps, as ``relion_postprocess``: FSC, B-factor, sharpened map.

Follows RELION 3.1 ``src/postprocessing.cpp`` (read, not copied):

1. Unmasked, masked and phase-randomisation-corrected FSC of the half maps
   (:func:`swiftalign.fsc.gold_standard_fsc`; Chen et al. 2013). When the
   unmasked FSC reaches further than the corrected one, the unmasked curve is
   used (RELION without ``--force_mask``).
2. The average of the *unmasked* half maps is Fourier transformed (``1/N³``
   normalisation) and weighted per shell by ``sqrt(2·FSC/(1 + FSC))``
   (Rosenthal & Henderson 2003), with every shell from the first one where the
   corrected FSC falls below 1e-4 set to zero.
3. Guinier plot: ``ln`` of the mean amplitude per shell against ``1/d²`` (Å⁻²)
   up to Nyquist. The B-factor is ``4 × slope`` of a least-squares line through
   the FSC-weighted points with ``autob_highres ≤ d ≤ autob_lowres`` and a
   non-zero amplitude (``--autob_lowres 10``, ``--autob_highres 0``: until
   Nyquist; the weighting already empties the shells past the FSC's zero).
4. The B-factor ``exp(−B/4 · s²)`` is applied up to Nyquist (zero beyond); an
   optional low-pass with RELION's raised-cosine edge follows (``--low_pass``:
   0 none, negative: at the FSC = 0.143 resolution).
5. ``postprocess_masked`` is the sharpened map times the mask.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swiftalign.fsc import FscResult, gold_standard_fsc, solvent_mask_fraction
from swiftalign.mask import radius_in_shells, relion_lowpass

log = logging.getLogger(__name__)

#: ``rlnFinalResolution`` (Å) of half maps without signal: RELION's "no resolution" (999 Å).
NO_RESOLUTION_ANGSTROM = 999.0

__all__ = [
    "NO_RESOLUTION_ANGSTROM",
    "GuinierFit",
    "PostprocessResult",
    "fsc_weights",
    "fit_guinier",
    "postprocess_half_maps",
    "write_postprocess",
]


@dataclass
class GuinierFit:
    """Least-squares line ``ln|F| = intercept + slope · (1/d²)`` (RELION ``fitStraightLine``).

    Attributes
    ----------
    slope_angstrom2, intercept : float
        Slope (Å²) and intercept.
    correlation : float
        Squared correlation coefficient of the fitted points.
    """

    slope_angstrom2: float
    intercept: float
    correlation: float

    @property
    def bfactor_angstrom2(self) -> float:
        """``4 × slope`` (Å²): negative for a map whose amplitudes fall off."""
        return 4.0 * self.slope_angstrom2


@dataclass
class PostprocessResult:
    """Everything ``relion_postprocess`` reports.

    Attributes
    ----------
    fsc : FscResult
        FSC curves and resolution of the half maps.
    fsc_used : np.ndarray
        `(n_shells,)` curve used for the weighting (corrected, or unmasked when
        that reaches further).
    bfactor_angstrom2 : float
        B-factor applied (Å²).
    fit : GuinierFit or None
        The automatic fit (None with a given B-factor).
    resolution_squared : np.ndarray
        `(n,)` ``1/d²`` (Å⁻²) of the Guinier shells (until Nyquist).
    log_amplitudes : dict of str to np.ndarray
        ``original``, ``weighted``, ``sharpened``: `(n,)` ln of the mean
        amplitude per shell (``-99`` where it is 0, as RELION).
    sharpened, sharpened_masked : np.ndarray or None
        `(N, N, N)` maps; None when the half maps carry no signal
        (``fsc.no_signal``: nothing to sharpen, no B-factor fitted).
    lowpass_angstrom : float
        Low-pass applied after sharpening (0 for none).
    mask_fraction : float
        ``rlnParticleBoxFractionSolventMask``.
    pixel_size_angstrom : float
    """

    fsc: FscResult
    fsc_used: np.ndarray
    bfactor_angstrom2: float
    fit: GuinierFit | None
    resolution_squared: np.ndarray
    log_amplitudes: dict[str, np.ndarray]
    sharpened: np.ndarray | None
    sharpened_masked: np.ndarray | None
    lowpass_angstrom: float
    mask_fraction: float
    pixel_size_angstrom: float


def fsc_weights(fsc: np.ndarray) -> np.ndarray:
    """`(n_shells,)` ``sqrt(2·FSC/(1 + FSC))`` weights, 0 from the first shell with FSC < 1e-4.

    RELION 3.1 ``Postprocessing::applyFscWeighting`` (Rosenthal & Henderson 2003).
    """
    fsc = np.asarray(fsc, dtype=np.float64)
    below = np.nonzero(fsc < 1e-4)[0]
    last = int(below[0]) - 1 if len(below) else len(fsc) - 1
    weight = np.sqrt(2 * np.clip(fsc, 0, None) / (1 + np.clip(fsc, 0, None)))
    weight[np.arange(len(fsc)) > last] = 0.0
    return weight


def _log_mean_amplitude(spectrum: np.ndarray, shell: np.ndarray, n_shells: int) -> np.ndarray:
    """`(n_shells,)` ln of the mean |F| per shell; -99 where the sum is 0 (RELION's marker)."""
    inside = shell < n_shells
    total = np.bincount(shell[inside], np.abs(spectrum[inside]), minlength=n_shells)
    count = np.bincount(shell[inside], minlength=n_shells)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(total / np.maximum(count, 1))
    return np.where(total > 0, out, -99.0)


def fit_guinier(resolution_squared: np.ndarray, log_amplitude: np.ndarray, *,
                lowres_angstrom: float = 10.0, highres_angstrom: float = 0.0) -> GuinierFit:
    """Fit a straight line to a Guinier plot over ``highres ≤ d ≤ lowres`` (Å).

    Points with ``log_amplitude == -99`` (empty shells) are left out; weights
    are 1 inside the range (RELION 3.1 ``fitStraightLine``). Returns a zero
    line when fewer than two points remain.
    """
    x = np.asarray(resolution_squared, dtype=np.float64)
    y = np.asarray(log_amplitude, dtype=np.float64)
    with np.errstate(divide="ignore"):
        d = np.where(x > 0, 1.0 / np.sqrt(x), np.inf)
    use = (d <= lowres_angstrom) & (d >= highres_angstrom) & (y > -99.0)
    if use.sum() < 2:
        return GuinierFit(0.0, 0.0, 0.0)
    xs, ys = x[use], y[use]
    ss_xx = float(((xs - xs.mean()) ** 2).sum())
    ss_yy = float(((ys - ys.mean()) ** 2).sum())
    ss_xy = float(((xs - xs.mean()) * (ys - ys.mean())).sum())
    if ss_xx <= 0:
        return GuinierFit(0.0, 0.0, 0.0)
    slope = ss_xy / ss_xx
    corr = ss_xy**2 / (ss_xx * ss_yy) if ss_yy > 0 else 0.0
    return GuinierFit(slope, float(ys.mean() - slope * xs.mean()), corr)


def _fsc_for_weighting(fsc: FscResult) -> np.ndarray:
    """The corrected FSC, or the unmasked one when it stays above 0.143 further (RELION)."""
    def last_above(curve: np.ndarray) -> int:
        below = np.nonzero(curve[1:] < 0.143)[0]
        return int(below[0]) if len(below) else len(curve) - 1

    if last_above(fsc.unmasked) > last_above(fsc.corrected):
        warnings.warn("the unmasked FSC extends beyond the solvent-corrected FSC: the unmasked "
                      "FSC is used (as relion_postprocess); the mask may be too tight",
                      stacklevel=3)
        return np.asarray(fsc.unmasked, dtype=np.float64)
    return np.asarray(fsc.corrected, dtype=np.float64)


def postprocess_half_maps(half1: np.ndarray, half2: np.ndarray, mask: np.ndarray,
                          pixel_size_angstrom: float, *, bfactor_angstrom2: float | None = None,
                          autob_lowres_angstrom: float = 10.0,
                          autob_highres_angstrom: float = 0.0,
                          lowpass_angstrom: float = 0.0, seed: int = 0) -> PostprocessResult:
    """FSC, B-factor and sharpened map of two half maps (``relion_postprocess --auto_bfac``).

    Parameters
    ----------
    half1, half2 : np.ndarray
        `(N, N, N)` unfiltered half maps.
    mask : np.ndarray
        `(N, N, N)` soft solvent mask in [0, 1].
    pixel_size_angstrom : float
        Voxel size (Å).
    bfactor_angstrom2 : float, optional
        B-factor to apply (Å², negative sharpens); None fits it (``--auto_bfac``).
    autob_lowres_angstrom, autob_highres_angstrom : float
        Resolution range (Å) of the Guinier fit; 0 as high limit means Nyquist.
    lowpass_angstrom : float
        Low-pass after sharpening: 0 none, negative at the FSC = 0.143 resolution.
    seed : int
        Seed of the phase randomisation.

    Returns
    -------
    PostprocessResult
        Without signal in the half maps (``result.fsc.no_signal``, see
        :func:`swiftalign.fsc.require_signal`) no B-factor is fitted and no
        sharpened map is made (``sharpened`` is None).
    """
    n = half1.shape[0]
    fsc = gold_standard_fsc(half1, half2, mask, pixel_size_angstrom, seed=seed)
    if fsc.no_signal:
        bfactor_angstrom2 = 0.0 if bfactor_angstrom2 is None else bfactor_angstrom2
    fsc_used = _fsc_for_weighting(fsc)
    radius = radius_in_shells(n)
    shell = np.floor(radius + 0.5).astype(np.int64)
    n_shells = n // 2 + 1
    shells = np.arange(n_shells)
    until_nyquist = shells <= n // 2
    res_sq = (shells / (n * pixel_size_angstrom)) ** 2
    spec = np.fft.rfftn(0.5 * (half1.astype(np.float64) + half2)) / n**3
    logs = {"original": _log_mean_amplitude(spec, shell, n_shells)}
    weight = fsc_weights(fsc_used)
    spec = spec * weight[np.minimum(shell, n_shells - 1)] * (shell < n_shells)
    logs["weighted"] = _log_mean_amplitude(spec, shell, n_shells)
    fit = None
    if bfactor_angstrom2 is None:  # fitted from autob_lowres to where the weights vanish
        fit = fit_guinier(res_sq, logs["weighted"], lowres_angstrom=autob_lowres_angstrom,
                          highres_angstrom=autob_highres_angstrom)
        bfactor_angstrom2 = fit.bfactor_angstrom2
        if fit.correlation == 0.0:
            log.warning("fewer than two Guinier points between %g Å and Nyquist (%.3g Å): "
                        "B-factor 0 (map not sharpened)", autob_lowres_angstrom,
                        2 * pixel_size_angstrom)
    s2 = (radius / (n * pixel_size_angstrom)) ** 2
    spec = spec * np.where(radius <= n / 2, np.exp(-bfactor_angstrom2 / 4.0 * s2), 0.0)
    logs["sharpened"] = _log_mean_amplitude(spec, shell, n_shells)
    applied = fsc.resolution_angstrom if lowpass_angstrom < 0 else lowpass_angstrom
    sharpened = masked = None
    if not fsc.no_signal:
        sharpened = np.fft.irfftn(spec * n**3, s=half1.shape, axes=(0, 1, 2))
        if applied > 0:
            sharpened = relion_lowpass(sharpened, applied, pixel_size_angstrom)
        sharpened = sharpened.astype(np.float32)
        masked = (sharpened * mask).astype(np.float32)
    return PostprocessResult(
        fsc=fsc, fsc_used=fsc_used, bfactor_angstrom2=float(bfactor_angstrom2), fit=fit,
        resolution_squared=res_sq[until_nyquist],
        log_amplitudes={k: v[until_nyquist] for k, v in logs.items()},
        sharpened=sharpened, sharpened_masked=masked,
        lowpass_angstrom=float(applied) if np.isfinite(applied) else 0.0,
        mask_fraction=solvent_mask_fraction(mask), pixel_size_angstrom=float(pixel_size_angstrom))


def _fsc_table(result: PostprocessResult, box: int):
    """The ``fsc`` block of ``relion_postprocess``'s STAR file."""
    import pandas as pd

    fsc = result.fsc
    shells = np.arange(len(fsc.unmasked))
    angstrom = np.where(shells > 0, box * result.pixel_size_angstrom / np.maximum(shells, 1),
                        999.0)
    frac = result.mask_fraction
    unmasked = np.asarray(fsc.unmasked, dtype=np.float64)
    denom = 1 + (frac - 1) * unmasked
    part = frac * unmasked / np.where(np.abs(denom) > 1e-12, denom, np.inf)
    return pd.DataFrame({
        "rlnSpectralIndex": shells,
        "rlnResolution": 1.0 / angstrom,
        "rlnAngstromResolution": angstrom,
        "rlnFourierShellCorrelationCorrected": result.fsc_used,
        "rlnFourierShellCorrelationParticleMaskFraction": part,
        "rlnFourierShellCorrelationUnmaskedMaps": unmasked,
        "rlnFourierShellCorrelationMaskedMaps": fsc.masked,
        "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": fsc.randomised,
    })


def postprocess_star_blocks(result: PostprocessResult, *, box: int,
                            half_map_names: tuple[str, str], mask_name: str) -> dict:
    """``general``, ``fsc`` and ``guinier`` blocks with ``relion_postprocess``'s columns.

    ``rlnFinalResolution`` is the interpolated FSC = 0.143 crossing (RELION
    writes the last shell above 0.143: the two differ by less than one shell);
    without signal it is ``NO_RESOLUTION_ANGSTROM`` (999, RELION's value when
    no shell is above 0.143), never NaN.
    """
    import pandas as pd

    resolution = result.fsc.resolution_angstrom
    general: dict = {
        "rlnFinalResolution": float(resolution) if np.isfinite(resolution)
        else NO_RESOLUTION_ANGSTROM,
        "rlnBfactorUsedForSharpening": result.bfactor_angstrom2,
        "rlnUnfilteredMapHalf1": half_map_names[0],
        "rlnUnfilteredMapHalf2": half_map_names[1],
        "rlnParticleBoxFractionSolventMask": result.mask_fraction,
        "rlnMaskName": mask_name,
        "rlnRandomiseFrom": float(box * result.pixel_size_angstrom
                                  / max(result.fsc.randomised_from_shell, 1)),
    }
    guinier = pd.DataFrame({
        "rlnResolutionSquared": result.resolution_squared,
        "rlnLogAmplitudesOriginal": result.log_amplitudes["original"],
        "rlnLogAmplitudesWeighted": result.log_amplitudes["weighted"],
        "rlnLogAmplitudesSharpened": result.log_amplitudes["sharpened"],
    })
    if result.fit is not None:
        general["rlnFittedSlopeGuinierPlot"] = result.fit.slope_angstrom2
        general["rlnFittedInterceptGuinierPlot"] = result.fit.intercept
        general["rlnCorrelationFitGuinierPlot"] = result.fit.correlation
        guinier["rlnLogAmplitudesIntercept"] = result.fit.intercept
    return {"general": general, "fsc": _fsc_table(result, box), "guinier": guinier}


def write_postprocess(out_dir: str | Path, result: PostprocessResult, *,
                      half_map_names: tuple[str, str], mask_name: str,
                      autob_lowres_angstrom: float = 10.0) -> dict[str, Path]:
    """Write ``postprocess.mrc``, ``postprocess_masked.mrc``, ``postprocess.star`` and plots.

    Every file is written under a temporary name and renamed. Without signal
    (``result.fsc.no_signal``) only ``postprocess.star`` (``rlnFinalResolution``
    999) and the plots are written: no sharpened map.

    Returns
    -------
    dict of str to Path
        ``star``, ``fsc_plot``, ``guinier_plot`` and, with signal, ``map`` and ``masked_map``.
    """
    import starfile

    from swiftalign.io.atomic import atomic_write
    from swiftalign.io.mrc import write_map
    from swiftalign.plots import fsc_figure_from_result, guinier_figure, save_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    box = len(result.fsc.unmasked) * 2 - 2
    paths = {"star": out / "postprocess.star", "fsc_plot": out / "postprocess_fsc.png",
             "guinier_plot": out / "postprocess_guinier.png"}
    if result.sharpened is not None and result.sharpened_masked is not None:
        paths["map"] = out / "postprocess.mrc"
        paths["masked_map"] = out / "postprocess_masked.mrc"
        write_map(paths["map"], result.sharpened, result.pixel_size_angstrom)
        write_map(paths["masked_map"], result.sharpened_masked, result.pixel_size_angstrom)
    blocks = postprocess_star_blocks(result, box=box, half_map_names=half_map_names,
                                     mask_name=mask_name)
    with atomic_write(paths["star"]) as tmp:
        starfile.write(blocks, tmp, overwrite=True)
    title = ("no signal" if result.fsc.no_signal else
             f"{result.fsc.resolution_text()} (FSC {result.fsc.threshold:g}), "
             f"B = {result.bfactor_angstrom2:.0f} Å²")
    save_figure(fsc_figure_from_result(result.fsc, result.pixel_size_angstrom, title),
                paths["fsc_plot"])
    fit = None if result.fit is None else (result.fit.slope_angstrom2, result.fit.intercept)
    save_figure(guinier_figure(result.resolution_squared, result.log_amplitudes, fit=fit,
                               fit_lowres_angstrom=autob_lowres_angstrom,
                               resolution_angstrom=result.fsc.resolution_angstrom,
                               resolution_text=result.fsc.resolution_text()),
                paths["guinier_plot"])
    return paths
