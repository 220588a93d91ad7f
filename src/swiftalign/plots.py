"""Diagnostic plots (matplotlib, Agg, PNG).

FSC curves, angular distributions, pose errors, refinement progress.

Every ``*_figure`` function returns a :class:`matplotlib.figure.Figure` built
without ``pyplot`` (no global state, no display needed); write it with
:func:`save_figure` (atomic) or turn it into PNG bytes with :func:`png_bytes`
(for the HTML report).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

__all__ = [
    "fsc_figure",
    "fsc_figure_from_result",
    "fsc_figure_from_star",
    "angular_distribution_figure",
    "pose_error_figure",
    "refinement_summary_figure",
    "save_figure",
    "png_bytes",
]

FSC_THRESHOLDS = (0.143, 0.5)


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG atomically (temporary name, then rename)."""
    from swiftalign.io.mrc import atomic_path

    path = Path(path)
    tmp = atomic_path(path)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def png_bytes(fig: Figure, *, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    return buf.getvalue()


def _crossing(freq: np.ndarray, curve: np.ndarray, threshold: float) -> float | None:
    """Spatial frequency (1/Å) where ``curve`` first falls below ``threshold``."""
    for i in range(1, len(curve)):
        if curve[i] < threshold:
            a, b = curve[i - 1], curve[i]
            frac = (a - threshold) / (a - b) if a != b else 0.0
            return float(freq[i - 1] + frac * (freq[i] - freq[i - 1]))
    return None


def fsc_figure(
    frequency_per_angstrom: np.ndarray,
    curves: Mapping[str, np.ndarray],
    *,
    threshold: float = 0.143,
    title: str = "",
) -> Figure:
    """FSC curves against spatial frequency, with the 0.143 and 0.5 thresholds marked.

    Parameters
    ----------
    frequency_per_angstrom : np.ndarray
        `(n_shells,)` spatial frequency of each shell (1/Å).
    curves : mapping of str to np.ndarray
        Label → `(n_shells,)` FSC values. A curve labelled ``corrected`` is drawn
        thick, and its crossings of the thresholds are marked with their resolution (Å).
    threshold : float
        The run's FSC threshold (also marked when it is neither 0.143 nor 0.5).
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    freq = np.asarray(frequency_per_angstrom, dtype=np.float64)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    styles = {"phase-randomised (masked)": {"ls": ":"}, "corrected": {"lw": 2.2, "color": "k"}}
    for label, values in curves.items():
        ax.plot(freq, values, label=label, **styles.get(label, {}))
    thresholds = sorted(set(FSC_THRESHOLDS) | {round(float(threshold), 4)})
    main = curves.get("corrected", next(iter(curves.values()), None))
    for j, thr in enumerate(thresholds):
        ax.axhline(thr, color="grey", ls="--", lw=0.8,
                   label="thresholds " + ", ".join(f"{t:g}" for t in thresholds) if j == 0 else None)
        cross = _crossing(freq, np.asarray(main), thr) if main is not None else None
        if cross is not None and cross > 0:
            ax.axvline(cross, color="grey", ls=":", lw=0.8)
            ax.annotate(f"{1 / cross:.1f} Å", (cross, thr), xytext=(4, 6),
                        textcoords="offset points", fontsize=8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_xlim(0, freq[-1] if len(freq) > 1 and freq[-1] > 0 else 1)
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def fsc_figure_from_result(fsc, pixel_size_angstrom: float, title: str = "") -> Figure:
    """:func:`fsc_figure` of a :class:`swiftalign.fsc.FscResult` (all four curves)."""
    n_shells = len(fsc.unmasked)
    box = 2 * (n_shells - 1)
    freq = np.arange(n_shells) / (box * pixel_size_angstrom)
    return fsc_figure(freq, {
        "unmasked": fsc.unmasked,
        "masked": fsc.masked,
        "phase-randomised (masked)": fsc.randomised,
        "corrected": fsc.corrected,
    }, threshold=fsc.threshold, title=title)


_STAR_CURVES = {
    "rlnFourierShellCorrelationUnmaskedMaps": "unmasked",
    "rlnFourierShellCorrelationMaskedMaps": "masked",
    "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": "phase-randomised (masked)",
    "rlnFourierShellCorrelationCorrected": "corrected",
}


def fsc_figure_from_star(path: str | Path, title: str | None = None) -> Figure:
    """:func:`fsc_figure` of a RELION postprocess-style ``fsc.star`` (ours or RELION's).

    Raises
    ------
    StarFileError
        When the file has no ``fsc`` block with ``rlnResolution`` and at least one FSC column.
    """
    import starfile

    from swiftalign.errors import StarFileError

    path = Path(path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted parser errors
        raise StarFileError(f"{path}: cannot parse ({exc})") from exc
    table = blocks.get("fsc")
    if table is None or "rlnResolution" not in table:
        raise StarFileError(f"{path}: no 'fsc' block with rlnResolution")
    curves = {label: table[col].to_numpy(np.float64) for col, label in _STAR_CURVES.items()
              if col in table}
    if not curves:
        raise StarFileError(f"{path}: 'fsc' block has no FSC column")
    freq = table["rlnResolution"].to_numpy(np.float64)
    if title is None:
        general = blocks.get("general", {})
        res = general.get("rlnFinalResolution") if isinstance(general, Mapping) else None
        title = f"{path.parent.name}: {float(res):.2f} Å" if res is not None else path.parent.name
    return fsc_figure(freq, curves, title=title)


def angular_distribution_figure(
    rot_deg: np.ndarray,
    tilt_deg: np.ndarray,
    *,
    title: str = "",
    bins_deg: float | None = None,
) -> Figure:
    """Histogram of viewing directions on a Mollweide projection.

    The viewing direction of a RELION ZYZ pose is set by rot (longitude) and
    tilt (polar angle from +Z; latitude ``90° − tilt``); psi does not change it.

    Parameters
    ----------
    rot_deg, tilt_deg : np.ndarray
        `(n,)` Euler angles (°).
    title : str
    bins_deg : float, optional
        Bin size (°) in longitude (latitude bins have the same count and equal
        areas); default about 5 particles per bin on a uniform sphere, 3°–30°.

    Returns
    -------
    matplotlib.figure.Figure
    """
    rot = (np.asarray(rot_deg, dtype=np.float64) + 180.0) % 360.0 - 180.0
    lat = 90.0 - np.clip(np.asarray(tilt_deg, dtype=np.float64), 0.0, 180.0)
    if bins_deg is None:
        bins_deg = float(np.clip(np.sqrt(41253.0 * 5 / max(len(rot), 1)), 3.0, 30.0))
    lon_edges = np.linspace(-180.0, 180.0, int(round(360 / bins_deg)) + 1)
    # equal-area bins (uniform in sin(latitude)): a uniform distribution looks uniform
    lat_edges = np.degrees(np.arcsin(np.linspace(-1.0, 1.0, int(round(180 / bins_deg)) + 1)))
    counts, _, _ = np.histogram2d(rot, lat, bins=(lon_edges, lat_edges))
    fig = Figure(figsize=(7.0, 4.0))
    ax = fig.add_subplot(projection="mollweide")
    masked = np.ma.masked_equal(counts.T, 0)
    vmax = max(float(counts.max()), 1.0)
    norm = LogNorm(vmin=1, vmax=vmax) if vmax >= 20 else Normalize(vmin=0, vmax=vmax)
    mesh = ax.pcolormesh(np.radians(lon_edges), np.radians(lat_edges), masked, cmap="viridis",
                         norm=norm, shading="flat")
    fig.colorbar(mesh, ax=ax, orientation="horizontal", fraction=0.05, pad=0.08,
                 label=f"particles per bin ({bins_deg:.0f}° in rot, equal areas)")
    ax.grid(True, lw=0.4, alpha=0.5)
    ax.tick_params(labelsize=7)
    ax.set_title(f"{title}\n{len(rot)} particles; longitude = rot, latitude = 90° − tilt"
                 if title else f"{len(rot)} particles; longitude = rot, latitude = 90° − tilt",
                 fontsize=9)
    return fig


def pose_error_figure(
    angular_error_deg: np.ndarray,
    shift_error_angstrom: np.ndarray,
    *,
    angular_step_deg: float | None = None,
    title: str = "",
) -> Figure:
    """Histograms of the angular error (°) and the shift error (Å) against ground truth.

    The medians are marked, and the angular step ΔΦ when given.

    Parameters
    ----------
    angular_error_deg : np.ndarray
        `(n,)` symmetry-aware angular errors (°).
    shift_error_angstrom : np.ndarray
        `(n,)` shift errors (Å).
    angular_step_deg : float, optional
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    ang = np.asarray(angular_error_deg, dtype=np.float64)
    sft = np.asarray(shift_error_angstrom, dtype=np.float64)
    fig = Figure(figsize=(8.0, 3.4))
    for j, (values, label) in enumerate(((ang, "angular error (°)"), (sft, "shift error (Å)"))):
        ax = fig.add_subplot(1, 2, j + 1)
        top = max(float(np.percentile(values, 99)) if len(values) else 1.0, 1e-6)
        ax.hist(np.clip(values, 0, top), bins=40, color="C0" if j == 0 else "C1")
        if len(values) and values.max() > top:
            label += "; last bin: ≥ 99th percentile"
        med = float(np.median(values)) if len(values) else 0.0
        ax.axvline(med, color="k", lw=1.2, label=f"median {med:.2f}")
        if j == 0 and angular_step_deg:
            ax.axvline(angular_step_deg, color="C3", ls="--", lw=1.0,
                       label=f"ΔΦ {angular_step_deg:.2f}")
        ax.set_xlabel(label)
        ax.set_ylabel("particles")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def refinement_summary_figure(history: Sequence[Mapping]) -> Figure:
    """Resolution (0.143 and 0.5) and kept-particle fraction per refinement iteration.

    Parameters
    ----------
    history : sequence of mapping
        Refinement history entries (``state.json``): ``iteration``,
        ``resolution_angstrom``, ``kept``, ``rejected`` and ``classes`` (each with
        ``resolution_05_angstrom``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    it = np.array([h["iteration"] for h in history])
    res = np.array([h["resolution_angstrom"] for h in history], dtype=np.float64)
    res05 = np.array([min((c.get("resolution_05_angstrom", np.nan) for c in h.get("classes", [])),
                          default=np.nan) for h in history], dtype=np.float64)
    kept = np.array([h["kept"] / max(h["kept"] + h["rejected"], 1) for h in history])
    fig = Figure(figsize=(8.0, 3.4))
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(it, res, "o-", label="FSC 0.143 (corrected)")
    if np.isfinite(res05).any():
        ax.plot(it, res05, "s--", label="FSC 0.5 (corrected)")
    ax.invert_yaxis()
    ax.set_xlabel("iteration")
    ax.set_ylabel("resolution (Å)")
    ax.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.plot(it, kept, "o-", color="C2")
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("fraction of particles kept")
    for a in (ax, ax2):
        a.set_xticks(it)
        a.grid(True, lw=0.4, alpha=0.5)
    fig.tight_layout()
    return fig
