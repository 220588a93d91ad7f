"""Diagnostic plots (matplotlib, Agg, PNG).

FSC curves, angular distributions, pose errors, refinement progress.

Every ``*_figure`` function returns a :class:`matplotlib.figure.Figure` built
without ``pyplot`` (no global state, no display needed); write it with
:func:`save_figure` (atomic) or turn it into PNG bytes with :func:`png_bytes`
(for the HTML report).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

__all__ = [
    "fsc_figure",
    "fsc_figure_from_result",
    "fsc_figure_from_star",
    "angular_distribution_figure",
    "angular_histogram",
    "guinier_figure",
    "map_slices_figure",
    "local_resolution_histogram_figure",
    "pose_error_figure",
    "refinement_summary_figure",
    "save_figure",
    "png_bytes",
]

FSC_THRESHOLDS = (0.143, 0.5)


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG atomically (temporary name, then rename)."""
    from swiftalign.io.atomic import atomic_write

    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def png_bytes(fig: Figure, *, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    return buf.getvalue()


def _crossing(freq: np.ndarray, curve: np.ndarray, threshold: float) -> float | None:
    """Spatial frequency (1/Å) where ``curve`` first falls below ``threshold``.

    None when it never does, or when it does before shell 1 (a resolution
    coarser than the box, which no FSC can measure).
    """
    for i in range(1, len(curve)):
        if curve[i] < threshold:
            a, b = curve[i - 1], curve[i]
            frac = (a - threshold) / (a - b) if a != b else 0.0
            cross = float(freq[i - 1] + frac * (freq[i] - freq[i - 1]))
            return cross if cross >= freq[1] * (1 - 1e-9) else None
    return None


def fsc_figure(
    frequency_per_angstrom: np.ndarray,
    curves: Mapping[str, np.ndarray],
    *,
    threshold: float = 0.143,
    title: str = "",
    resolution_is_bound: bool = False,
    note: str | None = None,
    mark_crossings: bool = True,
) -> Figure:
    """FSC curves against spatial frequency, with the 0.143 and 0.5 thresholds marked.

    The last shell is taken as Nyquist and marked; a top axis labels the
    frequencies in Å.

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
    resolution_is_bound : bool
        Mark the resolution as "≤ Nyquist" (the FSC never fell below the threshold).
    note : str, optional
        Written boxed in the plot: e.g. that the resolution is only a bound
        (``≤`` Nyquist) or that there is no signal.
    mark_crossings : bool
        Mark where the ``corrected`` curve crosses each threshold (never
        before shell 1: beyond the box); False without signal.

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
        cross = (_crossing(freq, np.asarray(main), thr)
                 if main is not None and mark_crossings else None)
        if cross is not None and cross > 0:
            ax.axvline(cross, color="grey", ls=":", lw=0.8)
            ax.annotate(f"{1 / cross:.1f} Å", (cross, thr), xytext=(4, 6),
                        textcoords="offset points", fontsize=8)
    nyquist = freq[-1] if len(freq) > 1 and freq[-1] > 0 else 1.0
    ax.axvline(nyquist, color="C3", ls="-.", lw=0.9, label=f"Nyquist ({1 / nyquist:.2f} Å)")
    if resolution_is_bound:
        ax.annotate("≤ Nyquist", (nyquist, threshold), xytext=(-52, 18),
                    textcoords="offset points", fontsize=8, color="C3")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_xlim(0, nyquist * 1.03)
    ax.set_ylim(-0.1, 1.05)
    _angstrom_ticks(ax, nyquist)
    ax.set_title(title, fontsize=10)
    if note:
        ax.text(0.98, 0.97, note, transform=ax.transAxes, ha="right", va="top", fontsize=9,
                bbox={"boxstyle": "round", "fc": "lightyellow", "ec": "grey"})
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def _angstrom_ticks(ax, max_frequency: float) -> None:
    """A top axis with resolution (Å) tick labels at round values up to ``max_frequency``."""
    candidates = np.array([100, 50, 30, 20, 15, 10, 8, 6, 5, 4, 3.5, 3, 2.5, 2.2, 2, 1.8, 1.6,
                           1.5, 1.4, 1.2, 1.0, 0.8])
    shown = candidates[(1 / candidates <= max_frequency * 1.0001)]
    if len(shown) > 8:  # about 8 labels, always keeping the finest
        shown = shown[np.unique(np.linspace(0, len(shown) - 1, 8).round().astype(int))]
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    top.set_xticks(1 / shown)
    top.set_xticklabels([f"{r:g}" for r in shown], fontsize=8)
    top.set_xlabel("resolution (Å)", fontsize=9)


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
    }, threshold=fsc.threshold, title=title,
        resolution_is_bound=bool(fsc.resolution_is_bound), mark_crossings=not fsc.no_signal,
        note=_fsc_note(fsc.resolution_is_bound, fsc.no_signal, fsc.resolution_angstrom,
                       fsc.threshold))


def _fsc_note(is_bound: bool, no_signal: bool, resolution_angstrom: float,
              threshold: float) -> str | None:
    """The plot's note for a resolution that is a bound, or for no signal."""
    if no_signal:
        return "no signal: the half maps do not correlate"
    if is_bound:
        return (f"never below {threshold:g}: resolution ≤ {resolution_angstrom:.2f} Å "
                "(Nyquist, a bound)")
    return None


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
    general = blocks.get("general", {})
    general = general if isinstance(general, Mapping) else {}
    res = general.get("rlnFinalResolution")
    bound = bool(int(general.get("swiftalignResolutionIsBound", 0)))
    no_signal = bool(int(general.get("swiftalignNoSignal", 0)))
    no_signal = no_signal or (res is not None and not float(res) < 999.0)  # RELION: 999 = none
    if title is None:
        text = ("no signal" if no_signal else f"{'≤ ' if bound else ''}{float(res):.2f} Å"
                if res is not None else None)
        title = f"{path.parent.name}: {text}" if text else path.parent.name
    note = _fsc_note(bound, no_signal, float(res) if res is not None else float("nan"), 0.143)
    return fsc_figure(freq, curves, title=title, resolution_is_bound=bound, note=note,
                      mark_crossings=not no_signal)


def angular_histogram(rot_deg: np.ndarray, tilt_deg: np.ndarray, bins_deg: float | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Counts of viewing directions in equal-area bins.

    Parameters
    ----------
    rot_deg, tilt_deg : np.ndarray
        `(n,)` Euler angles (°).
    bins_deg : float, optional
        Bin size (°) in longitude (latitude bins have the same count and equal
        areas); default about 5 particles per bin on a uniform sphere, 3°–30°.

    Returns
    -------
    counts : np.ndarray
        `(n_lon, n_lat)` particles per bin.
    lon_edges, lat_edges : np.ndarray
        Bin edges (°): longitude = rot, latitude = 90° − tilt.
    bins_deg : float
    """
    rot = (np.asarray(rot_deg, dtype=np.float64) + 180.0) % 360.0 - 180.0
    lat = 90.0 - np.clip(np.asarray(tilt_deg, dtype=np.float64), 0.0, 180.0)
    if bins_deg is None:
        bins_deg = float(np.clip(np.sqrt(41253.0 * 5 / max(len(rot), 1)), 3.0, 30.0))
    lon_edges = np.linspace(-180.0, 180.0, int(round(360 / bins_deg)) + 1)
    # equal-area bins (uniform in sin(latitude)): a uniform distribution looks uniform
    lat_edges = np.degrees(np.arcsin(np.linspace(-1.0, 1.0, int(round(180 / bins_deg)) + 1)))
    counts, _, _ = np.histogram2d(rot, lat, bins=(lon_edges, lat_edges))
    return counts, lon_edges, lat_edges, float(bins_deg)


def angular_distribution_figure(
    rot_deg: np.ndarray,
    tilt_deg: np.ndarray,
    *,
    title: str = "",
    bins_deg: float | None = None,
    max_count: float | None = None,
) -> Figure:
    """Histogram of viewing directions on a Mollweide projection.

    The viewing direction of a RELION ZYZ pose is set by rot (longitude) and
    tilt (polar angle from +Z; latitude ``90° − tilt``); psi does not change it.
    The colour scale is always logarithmic from 1 particle per bin; give
    several figures the same ``max_count`` (and ``bins_deg``) to share it.

    Parameters
    ----------
    rot_deg, tilt_deg : np.ndarray
        `(n,)` Euler angles (°).
    title : str
    bins_deg : float, optional
        See :func:`angular_histogram`.
    max_count : float, optional
        Top of the colour scale (default: this histogram's maximum).

    Returns
    -------
    matplotlib.figure.Figure
    """
    counts, lon_edges, lat_edges, bins_deg = angular_histogram(rot_deg, tilt_deg, bins_deg)
    fig = Figure(figsize=(7.0, 4.0))
    ax = fig.add_subplot(projection="mollweide")
    masked = np.ma.masked_equal(counts.T, 0)
    vmax = max(float(max_count if max_count is not None else counts.max()), 2.0)
    mesh = ax.pcolormesh(np.radians(lon_edges), np.radians(lat_edges), masked, cmap="viridis",
                         norm=LogNorm(vmin=1, vmax=vmax), shading="flat")
    fig.colorbar(mesh, ax=ax, orientation="horizontal", fraction=0.05, pad=0.08,
                 label=f"particles per bin ({bins_deg:.0f}° in rot, equal areas; log scale)")
    ax.grid(True, lw=0.4, alpha=0.5)
    ax.tick_params(labelsize=7)
    n = len(np.asarray(rot_deg))
    ax.set_title(f"{title}\n{n} particles; longitude = rot, latitude = 90° − tilt"
                 if title else f"{n} particles; longitude = rot, latitude = 90° − tilt",
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


def guinier_figure(
    resolution_squared: np.ndarray,
    log_amplitudes: Mapping[str, np.ndarray],
    *,
    fit: tuple[float, float] | None = None,
    fit_lowres_angstrom: float = 10.0,
    resolution_angstrom: float | None = None,
    title: str = "",
    resolution_text: str | None = None,
) -> Figure:
    """Guinier plot: ln of the mean Fourier amplitude per shell against ``1/d²``.

    Parameters
    ----------
    resolution_squared : np.ndarray
        `(n,)` ``1/d²`` (Å⁻²).
    log_amplitudes : mapping of str to np.ndarray
        Label → `(n,)` values; ``-99`` (RELION's empty-shell marker) is not drawn.
    fit : (slope, intercept), optional
        The fitted line, drawn from ``fit_lowres_angstrom`` to the last shell.
    resolution_angstrom : float, optional
        Marked with a vertical line.
    title : str
    resolution_text : str, optional
        Its label (``FscResult.resolution_text()``: ``≤`` for a bound);
        default ``"{resolution_angstrom:.2f} Å"``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    x = np.asarray(resolution_squared, dtype=np.float64)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for label, values in log_amplitudes.items():
        y = np.asarray(values, dtype=np.float64)
        ok = y > -99.0
        ax.plot(x[ok], y[ok], label=label)
    if fit is not None:
        xs = np.array([1.0 / fit_lowres_angstrom**2, x[-1]])
        ax.plot(xs, fit[1] + fit[0] * xs, "k--", lw=1.0,
                label=f"fit: B = {4 * fit[0]:.0f} Å²")
    if resolution_angstrom is not None and np.isfinite(resolution_angstrom):
        ax.axvline(1.0 / resolution_angstrom**2, color="grey", ls=":", lw=0.8,
                   label=f"FSC 0.143: {resolution_text or f'{resolution_angstrom:.2f} Å'}")
    ax.set_xlabel("1/d² (Å⁻²)")
    ax.set_ylabel("ln(mean amplitude)")
    ax.set_xlim(0, x[-1] if len(x) and x[-1] > 0 else 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def map_slices_figure(volume: np.ndarray, *, title: str = "",
                      overlay: np.ndarray | None = None, overlay_label: str = "") -> Figure:
    """Central slices of a `(N, N, N)` map along z, y and x (zyx data).

    Parameters
    ----------
    volume : np.ndarray
        `(N, N, N)` map, grey scale from its 1st to 99.9th percentile.
    title : str
    overlay : np.ndarray, optional
        `(N, N, N)` values (e.g. local resolution, Å) drawn in colour where > 0,
        with a colour bar labelled ``overlay_label``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    vol = np.asarray(volume, dtype=np.float32)
    c = [s // 2 for s in vol.shape]
    slices = [(vol[c[0]], "z (xy plane)"), (vol[:, c[1]], "y (xz plane)"),
              (vol[:, :, c[2]], "x (yz plane)")]
    lo, hi = np.percentile(vol, [1.0, 99.9])
    fig = Figure(figsize=(9.0, 3.4))
    axes = fig.subplots(1, 3)
    mesh = None
    if overlay is not None:
        ov = np.asarray(overlay, dtype=np.float32)
        inside = ov[ov > 0]
        vmin, vmax = (np.percentile(inside, [1, 99]) if inside.size else (0.0, 1.0))
        ov_slices = [ov[c[0]], ov[:, c[1]], ov[:, :, c[2]]]
    for j, (ax, (img, label)) in enumerate(zip(axes, slices, strict=True)):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        if overlay is not None:
            shown = np.ma.masked_less_equal(ov_slices[j], 0)
            mesh = ax.imshow(shown, cmap="turbo", vmin=vmin, vmax=vmax, origin="lower",
                             alpha=0.6)
        ax.set_title(f"central slice, {label}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if mesh is not None:
        fig.colorbar(mesh, ax=list(axes), fraction=0.02, pad=0.02, label=overlay_label)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def local_resolution_histogram_figure(local_resolution_angstrom: np.ndarray, *,
                                      title: str = "") -> Figure:
    """Histogram of local resolutions (Å) of the voxels where the map is defined (> 0).

    Parameters
    ----------
    local_resolution_angstrom : np.ndarray
        Any shape; values ``<= 0`` (outside the mask) are left out.
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    vals = np.asarray(local_resolution_angstrom, dtype=np.float64).ravel()
    vals = vals[vals > 0]
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot()
    if vals.size:
        ax.hist(vals, bins=40, color="C0")
        med = float(np.median(vals))
        ax.axvline(med, color="k", lw=1.2, label=f"median {med:.2f} Å")
        ax.legend(fontsize=8)
    ax.set_xlabel("local resolution (Å)")
    ax.set_ylabel("voxels")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
