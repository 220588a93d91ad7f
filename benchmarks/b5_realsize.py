"""B5: refinement at real sizes against the true-pose ceiling and RELION 3.1's auto-refine.

Data (:mod:`benchmarks.realistic`): GroEL (1MNF, D7) density from the atomic model with
gemmi, 160 px at 1.6 Å/px, 5,000 particles, −15 dB, defocus from the EMPIAR-10028 table,
projected by ``relion_project --ctf`` (the package's projector without RELION).

For each refinement symmetry (default: the model's, then C1 on the same data):

1. **ceiling**: reconstruction with the true poses: ``relion_reconstruct --ctf --sym``
   of the half sets and, timed, of all particles (the library's ``reconstruct`` of the
   halves without RELION);
2. **swiftalign refine** (this checkout's ``python -m swiftalign`` with its ``src``) from
   the truth low-passed to 30 Å;
3. **RELION** ``mpirun -n 3 relion_refine_mpi --auto_refine --split_random_halves`` from
   the same map on the same cores, stopped after ``SWIFTALIGN_B5_RELION_LIMIT_S``.

Every map is measured the same way: the half-map FSC0.143 (our gold-standard FSC with
the automatic solvent mask of the half-map average) and the FSC0.5 of the half-map
average against the truth (inside the truth's automatic mask). Time-to-resolution curves
use the moment each iteration's files were written (seconds since the program
started). Angular errors are symmetry-aware with the data's point group
(:func:`swiftalign.evaluate.symmetric_angular_error_deg`); peak RSS is that of each
child process tree (``os.wait4``: the largest process); per-step times come from
swiftalign's ``final/run.json``. Results: ``results/b5_realsize_<sym>.{json,md,png}``.

Environment: ``SWIFTALIGN_B5_MODEL`` (1MNF or 8ZPM), ``SWIFTALIGN_B5_PARTICLES`` (5000),
``SWIFTALIGN_B5_BOX`` (160), ``SWIFTALIGN_B5_PIXEL_SIZE`` (1.6 Å), ``SWIFTALIGN_B5_SNR_DB``
(−15), ``SWIFTALIGN_B5_SYMMETRY`` (comma list, default ``<model's>,C1``),
``SWIFTALIGN_B5_RELION_LIMIT_S`` (3600; 0 skips RELION's refinement),
``SWIFTALIGN_B5_ITERATIONS`` (swiftalign's ``--iterations``; default its own),
``SWIFTALIGN_B5_REUSE_RELION=1`` keeps a finished or stopped RELION run of the same
set and symmetry and reruns the rest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import starfile

from benchmarks.common import RESULTS, errors, write_results
from benchmarks.realistic import MODELS, Dataset, DatasetSpec, build_dataset

MODEL = os.environ.get("SWIFTALIGN_B5_MODEL", "1MNF").upper()
N_PARTICLES = int(os.environ.get("SWIFTALIGN_B5_PARTICLES", "5000"))
BOX = int(os.environ.get("SWIFTALIGN_B5_BOX", "160"))
PIXEL_SIZE = float(os.environ.get("SWIFTALIGN_B5_PIXEL_SIZE", "1.6"))
SNR_DB = float(os.environ.get("SWIFTALIGN_B5_SNR_DB", "-15"))
SYMMETRIES = os.environ.get("SWIFTALIGN_B5_SYMMETRY", "")
RELION_LIMIT_S = float(os.environ.get("SWIFTALIGN_B5_RELION_LIMIT_S", "3600"))
ITERATIONS = os.environ.get("SWIFTALIGN_B5_ITERATIONS", "")
REUSE_RELION = os.environ.get("SWIFTALIGN_B5_REUSE_RELION", "0") == "1"
INITIAL_RESOLUTION = 30.0
#: a resolution counts as reached within this fraction
MATCH = 0.05


# --- running and measuring child processes -----------------------------------------------

def measured_run(cmd: list[str], *, log: Path, cwd: Path | None = None, env: dict | None = None,
                 limit_s: float | None = None) -> dict:
    """Run ``cmd`` in its own session; stop it after ``limit_s`` (SIGTERM to its process
    group, SIGKILL 30 s later).

    Returns ``wall_s`` (until it ended or was stopped), ``returncode``, ``stopped`` (by the
    limit), ``start_epoch`` and ``peak_rss_mb`` (``ru_maxrss`` of the child and its reaped
    descendants, from ``os.wait4``: the largest single process).
    """
    with log.open("w") as out:
        start_epoch, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        stopped, kill_at, wall = False, float("inf"), None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.perf_counter()
            if limit_s is not None and not stopped and now - t0 > limit_s:
                stopped, wall, kill_at = True, now - t0, now + 30.0
                os.killpg(proc.pid, signal.SIGTERM)
            elif now > kill_at:
                kill_at = float("inf")
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if stopped:  # leftovers of the group (e.g. MPI ranks)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"wall_s": wall if stopped else time.perf_counter() - t0,
            "returncode": proc.returncode, "stopped": stopped, "start_epoch": start_epoch,
            "peak_rss_mb": usage.ru_maxrss / 1024.0}


# --- measuring maps and poses -------------------------------------------------------------

def map_resolutions(half1: np.ndarray, half2: np.ndarray, truth: np.ndarray,
                    truth_mask: np.ndarray) -> dict:
    """Half-map FSC0.143 (masked, corrected) and FSC0.5 of the half-map average vs the truth.

    Parameters
    ----------
    half1, half2, truth, truth_mask : np.ndarray
        `(N, N, N)` maps at ``PIXEL_SIZE``; ``truth_mask`` soft, 0–1.

    Returns
    -------
    dict
        ``half_fsc0143_angstrom``, ``truth_fsc05_angstrom`` (Å).
    """
    from swiftalign.fsc import auto_solvent_mask, fsc_curve, gold_standard_fsc, resolution_at

    mask = auto_solvent_mask((half1 + half2) / 2, PIXEL_SIZE)
    gold = gold_standard_fsc(half1, half2, mask, PIXEL_SIZE).resolution_angstrom
    vs_truth = fsc_curve((half1 + half2) / 2 * truth_mask, truth * truth_mask)
    return {"half_fsc0143_angstrom": float(gold),
            "truth_fsc05_angstrom": resolution_at(vs_truth, 0.5, truth.shape[0], PIXEL_SIZE)}


def _read(path: Path) -> np.ndarray:
    return mrcfile.read(path).astype(np.float32)


def pose_errors(stars: list[Path], true_euler: np.ndarray, true_shift: np.ndarray,
                symmetry: str) -> dict:
    """Median/p90 angular error (°, symmetry-aware) and median shift error (px) of the
    particles in ``stars`` against the truth (rows from the image numbers ``NNN@stack``)."""
    euler, shift, rows = [], [], []
    for star in stars:
        p = starfile.read(star, always_dict=True)["particles"]
        rows.append(p["rlnImageName"].str.split("@").str[0].astype(int).to_numpy() - 1)
        euler.append(p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
        shift.append(-p[["rlnOriginYAngst", "rlnOriginXAngst"]].to_numpy() / PIXEL_SIZE)
    r = np.concatenate(rows)
    ang, sh = errors(np.concatenate(euler), np.concatenate(shift), true_euler[r],
                     true_shift[r], symmetry)
    return {"median_deg": float(np.median(ang)), "p90_deg": float(np.percentile(ang, 90)),
            "median_shift_px": float(np.median(sh)), "n_particles": int(len(r))}


class Truth:
    """The ground truth of a set: map, its mask, poses, point group."""

    def __init__(self, ds: Dataset):
        from swiftalign.fsc import auto_solvent_mask

        self.map = _read(ds.truth_map)
        self.mask = auto_solvent_mask(self.map, PIXEL_SIZE)
        self.euler, self.shift = ds.truth()
        self.symmetry = ds.spec.symmetry

    def resolutions(self, half1: Path, half2: Path) -> dict:
        return map_resolutions(_read(half1), _read(half2), self.map, self.mask)


# --- the three programs ----------------------------------------------------------------------

def ceiling(ds: Dataset, truth: Truth, symmetry: str, work: Path) -> dict:
    """Reconstruction with the true poses: resolutions, and the time of one full
    ``relion_reconstruct`` (absent without RELION)."""
    work.mkdir(parents=True, exist_ok=True)
    if shutil.which("relion_reconstruct") is None:
        return _ceiling_package(ds, truth, symmetry, work)
    base = ["relion_reconstruct", "--i", str(ds.star), "--ctf", "--sym", symmetry]
    full = measured_run(base + ["--o", str(work / "all.mrc")], log=work / "all.log",
                        cwd=ds.folder)
    if full["returncode"] != 0:
        raise RuntimeError(f"relion_reconstruct failed: see {work / 'all.log'}")
    for half in (1, 2):
        run = measured_run(base + ["--o", str(work / f"half{half}.mrc"), "--subset", str(half)],
                           log=work / f"half{half}.log", cwd=ds.folder)
        if run["returncode"] != 0:
            raise RuntimeError(f"relion_reconstruct failed: see {work / f'half{half}.log'}")
    res = truth.resolutions(work / "half1.mrc", work / "half2.mrc")
    return {**res, "program": "relion_reconstruct", "relion_reconstruct_s": full["wall_s"],
            "peak_rss_mb": full["peak_rss_mb"]}


def _ceiling_package(ds: Dataset, truth: Truth, symmetry: str, work: Path) -> dict:
    """The library's gridding reconstruction of each half set at the true poses."""
    from benchmarks.realistic import AMPLITUDE_CONTRAST, CS_MM, VOLTAGE_KV
    from swiftalign.ctf import CtfParams
    from swiftalign.io import open_stack
    from swiftalign.reconstruction import reconstruct
    from swiftalign.symmetry import symmetry_matrices

    p = starfile.read(ds.star, always_dict=True)["particles"]
    stack = open_stack(ds.folder / "particles.mrcs")
    maps, t0 = [], time.perf_counter()
    try:
        for half in (1, 2):
            rows = np.flatnonzero(p["rlnRandomSubset"].to_numpy() == half)
            ones = np.ones(len(rows))
            ctf = CtfParams(*(p[c].to_numpy()[rows] for c in
                              ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")),
                            VOLTAGE_KV * ones, CS_MM * ones, AMPLITUDE_CONTRAST * ones, 0 * ones)
            maps.append(reconstruct(stack.data[rows], truth.euler[rows], truth.shift[rows],
                                    ctf=ctf, pixel_size_angstrom=PIXEL_SIZE,
                                    symmetry_group=symmetry_matrices(symmetry)))
    finally:
        stack.close()
    res = map_resolutions(maps[0], maps[1], truth.map, truth.mask)
    return {**res, "program": "swiftalign.reconstruction (no RELION)",
            "halves_s": time.perf_counter() - t0}


def swiftalign_refine(ds: Dataset, truth: Truth, symmetry: str, init: Path, diameter: float,
                      work: Path) -> dict:
    """``swiftalign refine`` from ``init``: measured run, timeline, final maps and poses."""
    out = work / "swiftalign"
    shutil.rmtree(out, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    # this checkout's code, whatever ``swiftalign`` on PATH is
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "swiftalign", "refine", str(ds.star), "--reference", str(init),
           "--initial-resolution", f"{INITIAL_RESOLUTION:g}", "--symmetry", symmetry,
           "--particle-diameter", f"{diameter:.0f}", "-q", "-o", str(out)]
    cmd += ["--iterations", ITERATIONS] if ITERATIONS else []
    run = measured_run(cmd, log=work / "swiftalign.log", env=env)
    if run["returncode"] != 0:
        tail = (work / "swiftalign.log").read_text()[-2000:]
        raise RuntimeError(f"swiftalign refine failed ({run['returncode']}):\n{tail}")
    timeline = []
    for it_dir in sorted(out.glob("it[0-9][0-9][0-9]")):
        if (it_dir / "run.json").exists():
            timeline.append({"iteration": int(it_dir.name[2:]),
                             "wall_s": (it_dir / "run.json").stat().st_mtime - run["start_epoch"],
                             **truth.resolutions(it_dir / "half1.mrc", it_dir / "half2.mrc")})
    final = out / "final"
    stars = [s for s in (final / "particles.star", final / "particles_rejected.star") if s.exists()]
    history = json.loads((final / "run.json").read_text())["history"]
    steps = [{"iteration": h["iteration"], "seconds": h["seconds"], "kept": h["kept"],
              "rejected": h["rejected"], **h["timings_s"]} for h in history]
    return {"program": "swiftalign refine", "command": " ".join(cmd), **run,
            **truth.resolutions(final / "half1.mrc", final / "half2.mrc"),
            **pose_errors(stars, truth.euler, truth.shift, truth.symmetry),
            "kept": history[-1]["kept"], "timeline": timeline, "steps": steps}


def relion_refine(ds: Dataset, truth: Truth, symmetry: str, init: Path, diameter: float,
                  work: Path) -> dict | None:
    """RELION 3.1 auto-refine under the time budget (None when RELION is absent or the
    budget is 0); ``measured.json`` in its folder keeps the run's measurements."""
    if (RELION_LIMIT_S <= 0 or shutil.which("relion_refine_mpi") is None
            or shutil.which("mpirun") is None):
        return None
    rdir = work / "relion"
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi",
           "--i", str(ds.star), "--o", str(rdir / "run"), "--ref", str(init),
           "--ini_high", f"{INITIAL_RESOLUTION:g}", "--firstiter_cc", "--auto_refine",
           "--split_random_halves", "--sym", symmetry, "--ctf",
           "--particle_diameter", f"{diameter:.0f}", "--flatten_solvent", "--zero_mask",
           "--oversampling", "1", "--healpix_order", "2", "--auto_local_healpix_order", "4",
           "--offset_range", "8", "--offset_step", "2", "--norm", "--scale", "--j", "1",
           "--pool", "10", "--dont_combine_weights_via_disc", "--pad", "2",
           "--low_resol_join_halves", "40"]
    measured = rdir / "measured.json"
    if REUSE_RELION and measured.exists():
        run = json.loads(measured.read_text())
    else:
        shutil.rmtree(rdir, ignore_errors=True)
        rdir.mkdir(parents=True)
        run = measured_run(cmd, log=rdir / "relion.log", cwd=ds.folder, limit_s=RELION_LIMIT_S)
        measured.write_text(json.dumps(run))
    converged = run["returncode"] == 0 and (rdir / "run_half1_class001_unfil.mrc").exists()
    if not converged and not run["stopped"]:
        tail = (rdir / "relion.log").read_text()[-2000:]
        raise RuntimeError(f"relion_refine_mpi failed ({run['returncode']}):\n{tail}")
    timeline = _relion_timeline(rdir, truth, run["start_epoch"])
    out = {"program": "RELION 3.1 auto-refine (3 MPI ranks)", "command": " ".join(cmd),
           **run, "converged": converged, "timeline": timeline}
    if converged:
        out.update(truth.resolutions(rdir / "run_half1_class001_unfil.mrc",
                                     rdir / "run_half2_class001_unfil.mrc"))
        out.update(pose_errors([rdir / "run_data.star"], truth.euler, truth.shift, truth.symmetry))
    elif timeline:  # stopped: its last finished iteration
        last = timeline[-1]
        out.update({k: last[k] for k in ("half_fsc0143_angstrom", "truth_fsc05_angstrom")})
        out.update(pose_errors([rdir / f"run_it{last['iteration']:03d}_data.star"],
                               truth.euler, truth.shift, truth.symmetry))
    return out


def _relion_timeline(rdir: Path, truth: Truth, start_epoch: float) -> list[dict]:
    """Each finished RELION iteration: seconds since start and its half maps' resolutions."""
    out = []
    for opt in sorted(rdir.glob("run_it[0-9][0-9][0-9]_optimiser.star")):
        it = int(re.search(r"_it(\d+)_", opt.name).group(1))
        h1, h2 = (rdir / f"run_it{it:03d}_half{h}_class001.mrc" for h in (1, 2))
        if it > 0 and h1.exists() and h2.exists():
            out.append({"iteration": it, "wall_s": opt.stat().st_mtime - start_epoch,
                        **truth.resolutions(h1, h2)})
    return out


# --- summary -------------------------------------------------------------------------------

def time_to(timeline: list[dict], resolution: float, key: str = "half_fsc0143_angstrom"
            ) -> float | None:
    """Seconds until a timeline first reaches ``(1 + MATCH) · resolution`` (None: never)."""
    hit = [t["wall_s"] for t in timeline if t[key] <= (1 + MATCH) * resolution]
    return hit[0] if hit else None


def plot_curves(path: Path, ours: dict, relion: dict | None, ceil: dict, symmetry: str) -> None:
    """Resolution vs wall time for both programs, ceilings and the relion_reconstruct time."""
    import matplotlib.pyplot as plt

    from swiftalign.plots import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, colour in ((ours, "C0"), (relion, "C3")):
        if run and run["timeline"]:
            t = [p["wall_s"] for p in run["timeline"]]
            ax.plot(t, [p["half_fsc0143_angstrom"] for p in run["timeline"]], "o-", color=colour,
                    label=f"{run['program']}: half maps FSC0.143")
            ax.plot(t, [p["truth_fsc05_angstrom"] for p in run["timeline"]], "s--", color=colour,
                    label=f"{run['program']}: vs truth FSC0.5")
    ax.axhline(ceil["half_fsc0143_angstrom"], color="k", ls=":", label="true poses: FSC0.143")
    ax.axhline(ceil["truth_fsc05_angstrom"], color="grey", ls=":", label="true poses: vs truth 0.5")
    if ceil.get("relion_reconstruct_s"):
        ax.axvline(ceil["relion_reconstruct_s"], color="k", lw=0.8, label="one relion_reconstruct")
    ax.set_xscale("log")
    ax.set_xlabel("wall time since start (s)")
    ax.set_ylabel("resolution (Å)")
    ax.set_title(f"B5 {MODEL} {symmetry}: {N_PARTICLES} particles, {BOX} px, {PIXEL_SIZE:g} Å/px")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _rows(ours: dict, relion: dict | None, ceil: dict) -> list[dict]:
    res_keys = ("half_fsc0143_angstrom", "truth_fsc05_angstrom")
    ceiling_row = {"program": f"true poses ({ceil['program']})",
                   "wall_s": ceil.get("relion_reconstruct_s", ceil.get("halves_s")),
                   **{k: ceil[k] for k in res_keys}, "peak_rss_mb": ceil.get("peak_rss_mb")}
    rows = [ceiling_row, {k: ours.get(k) for k in
                          ("program", "wall_s", *res_keys, "median_deg", "p90_deg",
                           "median_shift_px", "kept", "peak_rss_mb")}]
    if relion:
        stop = "" if relion["converged"] else f", stopped unconverged at {relion['wall_s']:.0f} s"
        rows.append({**{k: relion.get(k) for k in ("wall_s", *res_keys, "median_deg", "p90_deg",
                                                   "median_shift_px", "peak_rss_mb")},
                     "program": relion["program"] + stop})
    rows.append({"program": "ratio swiftalign / true poses",
                 **{k: ours[k] / ceil[k] for k in res_keys},
                 "wall_s": ours["wall_s"] / ceil["relion_reconstruct_s"]
                 if ceil.get("relion_reconstruct_s") else None})
    return rows


def _targets(ours: dict, relion: dict | None, ceil: dict) -> dict:
    out = {f"{k}_over_ceiling": ours[k] / ceil[k]
           for k in ("half_fsc0143_angstrom", "truth_fsc05_angstrom")}
    if ceil.get("relion_reconstruct_s"):
        out["refine_over_relion_reconstruct"] = ours["wall_s"] / ceil["relion_reconstruct_s"]
    if relion and relion["timeline"]:
        best = min(t["half_fsc0143_angstrom"] for t in relion["timeline"])
        t_rel, t_ours = time_to(relion["timeline"], best), time_to(ours["timeline"], best)
        out.update({"relion_best_angstrom": best, "relion_time_to_best_s": t_rel,
                    "swiftalign_time_to_relion_best_s": t_ours,
                    "speedup_to_relion_best": None if t_ours is None else t_rel / t_ours,
                    "relion_stopped": relion["stopped"]})
    return out


def _steps_markdown(steps: list[dict]) -> str:
    keys = list(dict.fromkeys(k for s in steps for k in s if k != "iteration"))
    lines = ["", "swiftalign per-iteration times (s) from final/run.json:", "",
             "| iteration | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for s in steps:
        cells = [f"{s[k]:.1f}" if isinstance(s.get(k), float) else str(s.get(k, "–"))
                 for k in keys]
        lines.append(f"| {s['iteration']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_symmetry(ds: Dataset, truth: Truth, symmetry: str, init: Path, diameter: float,
                 work: Path) -> str:
    """Ceiling, swiftalign, RELION at one refinement symmetry; writes the results."""
    name = f"b5_realsize_{symmetry.lower()}"
    ceil = ceiling(ds, truth, symmetry, work / "ceiling")
    ours = swiftalign_refine(ds, truth, symmetry, init, diameter, work)
    relion = relion_refine(ds, truth, symmetry, init, diameter, work)
    plot_curves(RESULTS / f"{name}.png", ours, relion, ceil, symmetry)
    cols = [("program", "program", ""), ("wall_s", "wall time (s)", ".1f"),
            ("half_fsc0143_angstrom", "half maps FSC0.143 (Å)", ".2f"),
            ("truth_fsc05_angstrom", "vs truth FSC0.5 (Å)", ".2f"),
            ("median_deg", "median error (°)", ".2f"), ("p90_deg", "p90 error (°)", ".1f"),
            ("median_shift_px", "median shift error (px)", ".2f"), ("kept", "kept", ""),
            ("peak_rss_mb", "peak RSS (MB)", ".0f")]
    md = write_results(name, _rows(ours, relion, ceil), cols, extra={
        "dataset": {"spec": {**ds.spec.__dict__}, "model": ds.info, "folder": str(ds.folder)},
        "refinement_symmetry": symmetry, "data_symmetry": truth.symmetry,
        "particle_diameter_angstrom": diameter, "relion_limit_s": RELION_LIMIT_S,
        "ceiling": ceil, "swiftalign": ours, "relion": relion,
        "targets": _targets(ours, relion, ceil),
        "note": "wall time of the ceiling row: one relion_reconstruct of all particles; last row: "
                "ours / ceiling for resolutions, whole refinement / one relion_reconstruct"})
    steps = _steps_markdown(ours["steps"])
    with (RESULTS / f"{name}.md").open("a") as f:
        f.write(steps)
    return md + steps + f"targets: {json.dumps(_targets(ours, relion, ceil), default=float)}\n"


def main() -> str:
    from swiftalign.fsc import lowpass
    from swiftalign.io import write_map

    if MODEL not in MODELS:
        return f"B5: unknown SWIFTALIGN_B5_MODEL {MODEL!r}; use one of {', '.join(MODELS)}"
    spec = DatasetSpec(model=MODEL, n_particles=N_PARTICLES, box=BOX,
                       pixel_size_angstrom=PIXEL_SIZE, snr_db=SNR_DB,
                       projector="relion" if shutil.which("relion_project") else "package")
    work = RESULTS / "tmp" / "b5"
    t0 = time.perf_counter()
    ds = build_dataset(work / "data", spec)
    print(f"B5 data: {ds.folder} ({time.perf_counter() - t0:.0f} s; model placed with a "
          f"{ds.info['symmetry_residual_angstrom']:.2f} Å symmetry residual)", flush=True)
    truth = Truth(ds)
    init = ds.folder / "init30.mrc"
    write_map(init, lowpass(truth.map, INITIAL_RESOLUTION, PIXEL_SIZE), PIXEL_SIZE)
    # particle diameter: the model's extent plus a margin, inside the box
    diameter = min(2 * ds.info["radius_angstrom"] + 20.0, 0.95 * BOX * PIXEL_SIZE)
    wanted = [s.strip().upper() for s in (SYMMETRIES or f"{spec.symmetry},C1").split(",")]
    out = []
    for sym in dict.fromkeys(s for s in wanted if s):
        out.append(f"-- refinement symmetry {sym} --\n"
                   + run_symmetry(ds, truth, sym, init, diameter, work / sym.lower()))
    return "\n".join(out)
