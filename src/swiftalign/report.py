"""Self-contained HTML report of a refine OUTDIR or an align output folder.

The report (``report.html``) embeds every plot as a base64 PNG data URI and
uses no external resource (no scripts, styles or fonts from the network), so
it can be mailed or archived as one file. Plots are redrawn from the run's
data files (``state.json``, ``itNNN/fsc.star``, ``itNNN/particles.star``,
``*_run.json``, the aligned STAR, ``*_evaluate.json``), so older runs without
PNG files get them too.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from swiftalign.errors import InputError, StarFileError

__all__ = ["build_report", "find_runs"]

log = logging.getLogger(__name__)

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 75em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f0f0f0; } td.key, th.key { text-align: left; font-family: monospace; }
td.text { text-align: left; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
.note { color: #a33; }
"""


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read JSON ({exc})") from exc


def find_runs(run_dir: str | Path) -> dict:
    """What ``run_dir`` holds: a refinement and/or align runs.

    Returns
    -------
    dict
        ``{"refine": bool, "align": [path of each *_run.json written by align]}``.

    Raises
    ------
    InputError
        ``run_dir`` is not a folder or holds no swiftalign run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder (give a refine OUTDIR or an align output folder)")
    refine = (run_dir / "state.json").exists() or any(run_dir.glob("it[0-9][0-9][0-9]/run.json"))
    align = []
    for p in sorted(run_dir.glob("*_run.json")):
        try:
            if json.loads(p.read_text()).get("command") == "align":
                align.append(p)
        except (OSError, ValueError):
            log.warning("%s: not readable JSON, skipped", p)
    if not refine and not align:
        raise InputError(f"{run_dir}: no swiftalign run found (no state.json or itNNN/run.json of "
                         "refine, no *_run.json of align)")
    return {"refine": refine, "align": align}


def _img(fig, alt: str, caption: str = "") -> str:
    from swiftalign.plots import png_bytes

    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f"{cap}</figure>")


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple) and len(v) > 8:
        return f"[{', '.join(_fmt(x) for x in v[:8])}, … ({len(v)} values)]"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _num(v, spec: str = ".2f") -> str:
    """A number for a table cell; "–" for a missing (None, NaN) value."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return format(v, spec)


def _flatten(d: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            rows.extend(_flatten(v, key + "."))
        else:
            rows.append((key, _fmt(v)))
    return rows


def _key_table(d: Mapping) -> str:
    body = "".join(f'<tr><td class="key">{html.escape(k)}</td><td class="text">{html.escape(v)}</td></tr>'
                   for k, v in _flatten(d))
    return f"<table>{body}</table>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _provenance(record: Mapping) -> str:
    """Parameters, inputs, machine and command line of a run.json."""
    parts = []
    if record.get("command_line"):
        parts.append("<h3>Command line</h3><pre>" + html.escape(" ".join(map(str, record["command_line"])))
                     + "</pre>")
    for key, title in (("parameters", "Parameters"), ("inputs", "Inputs"), ("outputs", "Outputs"),
                       ("sampling", "Sampling"), ("index", "Index"), ("timings_s", "Timings (s)"),
                       ("machine", "Machine")):
        if isinstance(record.get(key), Mapping) and record[key]:
            parts.append(f"<h3>{title}</h3>" + _key_table(record[key]))
    other = {k: record[k] for k in ("swiftalign_version", "time", "cwd", "n_particles") if k in record}
    if other:
        parts.append("<h3>Run</h3>" + _key_table(other))
    return "".join(parts)


def _read_star_particles(path: Path):
    import starfile

    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted parser errors
        raise StarFileError(f"{path}: cannot parse ({exc})") from exc
    df = blocks.get("particles")
    if df is None:
        df = next((b for b in blocks.values() if hasattr(b, "columns")), None)
    if df is None or "rlnAngleRot" not in df or "rlnAngleTilt" not in df:
        raise StarFileError(f"{path}: no particle block with rlnAngleRot and rlnAngleTilt")
    return df


def _history(run_dir: Path) -> list[dict]:
    if (run_dir / "state.json").exists():
        return list(_json(run_dir / "state.json").get("history", []))
    out = []
    for p in sorted(run_dir.glob("it[0-9][0-9][0-9]/run.json")):
        entry = _json(p).get("iteration")
        if isinstance(entry, Mapping):
            out.append(dict(entry))
    return out


def _kept_text(h: dict) -> str:
    """Kept particles and their fraction: ``4,512 (90.2 %)``."""
    total = h["kept"] + h["rejected"]
    return f"{h['kept']} ({100.0 * h['kept'] / total:.1f} %)" if total else str(h["kept"])


def _reasons_text(h: dict) -> str:
    """Rejected particles by reason (classes / poses / shifts), ``–`` for older runs."""
    by = h.get("rejected_by")
    if not isinstance(by, Mapping):
        return "–"
    return " / ".join(str(by.get(k, 0)) for k in ("classes", "poses", "shifts"))


def _near_text(h: dict) -> str:
    """The near-symmetry used by the consensus and the particles it kept, or ``none``."""
    near = h.get("near_symmetry")
    if not near:
        return "none" if "near_symmetry" in h else "–"
    return f"{near}; kept thanks to it: {h.get('kept_by_near_symmetry', 0)}"


def _iteration_rows(history: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["iteration", "search", "align at (Å)", "resolution FSC 0.143 (Å)",
              "resolution FSC 0.5 (Å)", "kept", "rejected", "rejected: classes / poses / shifts",
              "near-symmetry", "class populations (particles, Å)", "time (s)",
              "alignment (s)", "reconstruction (s)"]
    rows = []
    for h in history:
        classes = h.get("classes", [])
        res05 = min((c.get("resolution_05_angstrom", np.inf) for c in classes), default=np.inf)
        pops = "; ".join(f"{c['class']}: {c['particles']} ({c['resolution_angstrom']:.2f})"
                         for c in classes)
        t = h.get("timings_s", {})
        # runs before auto-local recorded only local_pass
        search = h.get("search", "local" if h.get("local_pass") else "global")
        reason = h.get("search_reason")
        rows.append([
            str(h["iteration"]), f"{search}: {reason}" if reason else search,
            _num(h.get("alignment_resolution_angstrom")),
            ("≤ " if h.get("resolution_is_bound") else "") + _num(h["resolution_angstrom"]),
            _num(res05),
            _kept_text(h), str(h["rejected"]), _reasons_text(h), _near_text(h), pops,
            _num(h.get("seconds"), ".1f"),
            f"{t['alignment']:.1f}" if "alignment" in t else "–",
            f"{t['reconstruction']:.1f}" if "reconstruction" in t else "–",
        ])
    return header, rows


def _kept_poses(run_dir: Path, history: list[dict]) -> dict:
    """Iteration → (rot, tilt) of its kept particles (°), or the error message reading them."""
    out: dict = {}
    for h in history:
        pstar = run_dir / f"it{h['iteration']:03d}" / "particles.star"
        if not pstar.exists():
            continue
        try:
            df = _read_star_particles(pstar)
        except StarFileError as exc:
            out[h["iteration"]] = str(exc)
            continue
        if "rlnSwiftalignKept" in df:
            df = df[df["rlnSwiftalignKept"] == 1]
        out[h["iteration"]] = (df["rlnAngleRot"].to_numpy(), df["rlnAngleTilt"].to_numpy())
    return out


def _angular_scale(poses: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """``bins_deg`` and ``max_count`` shared by every angular-distribution plot of a run."""
    from swiftalign.plots import angular_histogram

    if not poses:
        return {}
    largest = max(poses, key=lambda p: len(p[0]))
    bins_deg = angular_histogram(*largest)[3]
    max_count = max(float(angular_histogram(r, t, bins_deg)[0].max()) for r, t in poses)
    return {"bins_deg": bins_deg, "max_count": max_count}


def _final_map_section(run_dir: Path) -> str:
    """Central slices of the final map and, when computed, the local-resolution histogram.

    The map is ``final/postprocess/postprocess_masked.mrc`` (sharpened) when
    present, else ``final/map.mrc``; local resolution is read from
    ``OUTDIR/local_resolution/local_resolution.mrc`` (``swiftalign local-resolution
    … -o OUTDIR/local_resolution``) with ``final/mask.mrc``.
    """
    from swiftalign.errors import MrcFileError
    from swiftalign.io.mrc import read_map
    from swiftalign.plots import local_resolution_histogram_figure, map_slices_figure

    final = run_dir / "final"
    candidates = [(final / "postprocess" / "postprocess_masked.mrc", "sharpened, masked map"),
                  (final / "map.mrc", "final map (low-passed at the FSC resolution)")]
    found = next(((p, what) for p, what in candidates if p.exists()), None)
    if found is None:
        return ""
    parts = ["<h3>Final map</h3>"]
    try:
        vol = read_map(found[0]).data
        parts.append(_img(map_slices_figure(vol, title=f"{found[0].relative_to(run_dir)}"),
                          "final map slices", f"Central slices of the {found[1]}."))
        locres = run_dir / "local_resolution" / "local_resolution.mrc"
        if locres.exists():
            local = read_map(locres).data
            if local.shape != vol.shape:
                raise MrcFileError(f"{locres}: shape {local.shape} differs from {found[0]} "
                                   f"{vol.shape}; local resolution left out")
            if (final / "mask.mrc").exists():
                local = np.where(read_map(final / "mask.mrc").data > 0.5, local, 0.0)
            parts.append(_img(local_resolution_histogram_figure(
                local, title="local resolution inside the mask"), "local resolution histogram",
                "Local resolution (windowed FSC 0.143) of the voxels inside the mask."))
            parts.append(_img(map_slices_figure(vol, overlay=local,
                                                overlay_label="local resolution (Å)"),
                              "local resolution slices", "Central slices coloured by local "
                              "resolution."))
    except MrcFileError as exc:
        parts.append(f'<p class="note">{html.escape(str(exc))}</p>')
    return "".join(parts)


def _refine_section(run_dir: Path) -> tuple[str, str]:
    from swiftalign.plots import (
        angular_distribution_figure,
        fsc_figure_from_star,
        refinement_summary_figure,
    )

    history = _history(run_dir)
    parts = ["<h2>Refinement</h2>"]
    if not history:
        parts.append('<p class="note">no completed iteration yet</p>')
        return "".join(parts), "refinement (no completed iteration)"
    final = history[-1]
    bound = "≤ " if final.get("resolution_is_bound") else ""  # never below 0.143: a bound
    summary = (f"{len(history)} iteration(s); final resolution {bound}{final['resolution_angstrom']:.2f} Å "
               f"(FSC 0.143, corrected), {final['kept']} particles kept, {final['rejected']} rejected")
    parts.append(f"<p>{html.escape(summary)}</p>")
    parts.append(_img(refinement_summary_figure(history), "refinement summary",
                      "Resolution and fraction of particles kept per iteration."))
    header, rows = _iteration_rows(history)
    parts.append("<h3>Iterations</h3>" + _table(header, rows))
    parts.append(_final_map_section(run_dir))
    kept = _kept_poses(run_dir, history)
    scale = _angular_scale([v for v in kept.values() if not isinstance(v, str)])
    for h in history:
        it_dir = run_dir / f"it{h['iteration']:03d}"
        parts.append(f"<h3>Iteration {h['iteration']}</h3>")
        if not it_dir.is_dir():
            parts.append(f'<p class="note">{html.escape(str(it_dir))} is missing</p>')
            continue
        for star in sorted(it_dir.glob("*fsc.star")):
            try:
                fig = fsc_figure_from_star(star, title=f"iteration {h['iteration']}: {star.name}")
                parts.append(_img(fig, f"FSC {it_dir.name}/{star.name}",
                                  "FSC: unmasked, masked, phase-randomised, corrected; "
                                  "thresholds 0.143 and 0.5."))
            except StarFileError as exc:
                parts.append(f'<p class="note">{html.escape(str(exc))}</p>')
        poses = kept.get(h["iteration"])
        if isinstance(poses, str):
            parts.append(f'<p class="note">{html.escape(poses)}</p>')
        elif poses is not None:
            parts.append(_img(angular_distribution_figure(
                *poses, title=f"iteration {h['iteration']}: kept particles", **scale),
                f"angular distribution {it_dir.name}",
                "Viewing directions of kept particles (one colour scale for all iterations)."))
    last_run = run_dir / f"it{final['iteration']:03d}" / "run.json"
    if last_run.exists():
        parts.append("<h2>Refinement parameters</h2>" + _provenance(_json(last_run)))
    return "".join(parts), summary


def _align_section(run_json: Path) -> tuple[str, str]:
    from swiftalign.plots import angular_distribution_figure, pose_error_figure

    record = _json(run_json)
    stem = run_json.name[: -len("_run.json")]
    star = Path(record.get("outputs", {}).get("particles", run_json.with_name(stem + ".star")))
    if not star.is_absolute() and not star.exists():
        star = run_json.parent / star.name
    parts = [f"<h2>Alignment: {html.escape(star.name)}</h2>"]
    s = record.get("sampling", {})
    wall = record.get("timings_s", {}).get("wall")
    n = record.get("n_particles")
    summary = f"{n} particles" if n is not None else "alignment"
    n_poses = s.get("n_poses") or int(np.prod([s.get(k, 0) for k in ("n_directions", "n_psi",
                                                                     "n_shifts")]))
    if n_poses:
        summary += (f" against {n_poses:,} poses (ΔΦ {_num(s.get('angular_step_deg'))}°, "
                    f"Δs {_num(s.get('shift_step_px'))} px)")
    if wall:
        summary += f" in {wall:.1f} s"
    parts.append(f"<p>{html.escape(summary)}</p>")
    if star.exists():
        try:
            df = _read_star_particles(star)
            parts.append(_img(angular_distribution_figure(
                df["rlnAngleRot"].to_numpy(), df["rlnAngleTilt"].to_numpy(),
                title=f"{star.name}: assigned orientations"),
                f"angular distribution {star.name}", "Viewing directions of the assigned poses."))
        except StarFileError as exc:
            parts.append(f'<p class="note">{html.escape(str(exc))}</p>')
    else:
        parts.append(f'<p class="note">{html.escape(str(star))} is missing</p>')
    ev = run_json.with_name(stem + "_evaluate.json")
    if ev.exists():
        e = _json(ev)
        sm = e.get("summary", {})
        parts.append("<h3>Errors against ground truth</h3>")
        if "angular_error_deg" in e and "shift_error_angstrom" in e:
            parts.append(_img(pose_error_figure(
                np.asarray(e["angular_error_deg"]), np.asarray(e["shift_error_angstrom"]),
                angular_step_deg=sm.get("angular_step_deg"), title=f"{star.name} vs truth"),
                "pose errors", "Angular error (symmetry-aware) and shift error."))
        rows = [[label, f"{sm[k]['median']:.2f}", f"{sm[k]['mean']:.2f}", f"{sm[k]['p90']:.2f}"]
                for k, label in (("angular_error_deg", "angular error (°)"),
                                 ("shift_error_angstrom", "shift error (Å)"),
                                 ("shift_error_px", "shift error (px)")) if k in sm]
        parts.append(_table(["quantity", "median", "mean", "p90"], rows))
    parts.append("<h3>Provenance</h3>" + _provenance(record))
    return "".join(parts), summary


def build_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write a self-contained HTML report of a refine OUTDIR or an align output folder.

    Parameters
    ----------
    run_dir : str or Path
        Refine OUTDIR (``state.json``, ``itNNN/``) or a folder with align outputs
        (``NAME.star`` + ``NAME_run.json``, optionally ``NAME_evaluate.json``).
    output : str or Path, optional
        HTML file; default ``run_dir/report.html``.

    Returns
    -------
    Path
        The HTML file (written atomically).

    Raises
    ------
    InputError
        ``run_dir`` is not a folder, holds no run, or a run.json is unreadable.
    """
    from swiftalign import __version__
    from swiftalign.io.atomic import atomic_write

    run_dir = Path(run_dir)
    runs = find_runs(run_dir)
    sections, summaries = [], []
    if runs["refine"]:
        body, summary = _refine_section(run_dir)
        sections.append(body)
        summaries.append(summary)
    for p in runs["align"]:
        body, summary = _align_section(p)
        sections.append(body)
        summaries.append(summary)
    title = f"swiftalign report: {run_dir.resolve().name}"
    doc = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(str(run_dir.resolve()))} · swiftalign {html.escape(__version__)}</p>"
        "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in summaries) + "</ul>"
        + "".join(sections) + "</body></html>\n"
    )
    out = Path(output) if output is not None else run_dir / "report.html"
    with atomic_write(out) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    n_img = len(re.findall(r"<img ", doc))
    log.info("report with %d plots → %s", n_img, out)
    return out
