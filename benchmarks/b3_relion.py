"""B3: the whole refinement against RELION 3.1's auto-refine on the same data and cores.

Both start from the same simulated particles (TRPV1, C4, −10 dB, CTF) and the same
initial reference (the map low-passed to 30 Å), on the same cores:
``mpirun -n 3 relion_refine_mpi --auto_refine --split_random_halves`` (one thread per
rank) and ``swiftalign refine`` (torch on the same cores). Resolutions are measured
the same way for both (our gold-standard FSC with the same automatic solvent mask on
each program's own half maps: RELION's per-iteration ``run_itNNN_half?_class001.mrc``
and final ``*_unfil.mrc``), and final poses are compared with the ground truth
(symmetry-aware angular error, shift error).

RELION's auto-refine on two cores can take hours; ``SWIFTALIGN_B3_RELION_LIMIT_S``
(default 1800 s) stops it after that budget. Either way the benchmark reports
RELION's timeline (wall time at the end of each iteration and the resolution of that
iteration's half maps), the time RELION needed to come within 5 % of swiftalign's
final resolution, and the ratios of both RELION times to swiftalign's whole refinement.
A RELION run stopped by the budget gives lower bounds (">=").

Environment: ``SWIFTALIGN_B3_PARTICLES`` (2000), ``SWIFTALIGN_B3_RELION_LIMIT_S``
(1800, RELION's total budget), ``SWIFTALIGN_B3_REUSE_RELION=1`` keeps a RELION run already
in the work folder and reruns only swiftalign; ``SWIFTALIGN_B3_CONTINUE_RELION=1`` resumes
a stopped RELION run from its last finished iteration (``relion_refine_mpi --continue``)
within the rest of the budget. RELION's clock is kept in ``relion/segments.json`` (wall
time of each run segment; the time lost in an interrupted iteration is not counted), and
``relion/wall_s.txt`` (converged) or ``relion/stopped_s.txt`` (stopped unconverged) hold
its total.
Skipped with a message when ``relion_refine_mpi`` or ``mpirun`` is absent.
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

from benchmarks.common import MAP, RESULTS, errors, simulated_dataset, write_results

N_PARTICLES = int(os.environ.get("SWIFTALIGN_B3_PARTICLES", "2000"))
RELION_LIMIT_S = float(os.environ.get("SWIFTALIGN_B3_RELION_LIMIT_S", "1800"))
REUSE_RELION = os.environ.get("SWIFTALIGN_B3_REUSE_RELION", "0") == "1"
CONTINUE_RELION = os.environ.get("SWIFTALIGN_B3_CONTINUE_RELION", "0") == "1"
PIXEL_SIZE = 4.88
#: RELION's resolution counts as matching ours within this fraction.
MATCH = 0.05


def _fsc_resolution(half1: Path, half2: Path) -> float:
    from swiftalign.fsc import auto_solvent_mask, gold_standard_fsc

    h1, h2 = mrcfile.read(half1).astype(np.float32), mrcfile.read(half2).astype(np.float32)
    mask = auto_solvent_mask((h1 + h2) / 2, PIXEL_SIZE)
    return gold_standard_fsc(h1, h2, mask, PIXEL_SIZE).resolution_angstrom


def _poses(star: Path, truth_names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Euler (deg), shift (y, x px) and truth row of each particle in ``star``."""
    p = starfile.read(star, always_dict=True)["particles"]
    index = {name.split("@")[0]: i for i, name in enumerate(truth_names)}
    rows = np.array([index[name.split("@")[0]] for name in p["rlnImageName"]])
    euler = p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    shift = -p[["rlnOriginYAngst", "rlnOriginXAngst"]].to_numpy() / PIXEL_SIZE
    return euler, shift, rows


def _segments(rdir: Path) -> list[dict]:
    """RELION run segments: ``start_epoch`` and RELION seconds ``offset_s`` at that moment."""
    path = rdir / "segments.json"
    if path.exists():
        return json.loads(path.read_text())
    return [{"start_epoch": float((rdir / "started_epoch.txt").read_text()), "offset_s": 0.0}]


def _relion_time(segments: list[dict], epoch: float) -> float:
    """RELION seconds at a wall-clock epoch."""
    seg = [s for s in segments if s["start_epoch"] <= epoch + 1e-3][-1]
    return seg["offset_s"] + epoch - seg["start_epoch"]


def _relion_timeline(rdir: Path, segments: list[dict], truth_names, true_euler,
                     true_shift) -> list[dict]:
    """Per finished RELION iteration: seconds since start, our FSC0.143 of its half maps and
    the median angular error of its poses."""
    out = []
    for opt in sorted(rdir.glob("run_it[0-9][0-9][0-9]_optimiser.star")):
        it = int(re.search(r"_it(\d+)_", opt.name).group(1))
        h1 = rdir / f"run_it{it:03d}_half1_class001.mrc"
        h2 = rdir / f"run_it{it:03d}_half2_class001.mrc"
        if it == 0 or not (h1.exists() and h2.exists()):
            continue
        e, s, rows = _poses(rdir / f"run_it{it:03d}_data.star", truth_names)
        ang, _ = errors(e, s, true_euler[rows], true_shift[rows])
        out.append({"iteration": it, "wall_s": _relion_time(segments, opt.stat().st_mtime),
                    "resolution_angstrom": _fsc_resolution(h1, h2),
                    "median_deg": float(np.median(ang))})
    return out


def _run_relion(cmd: list[str], cwd: Path, rdir: Path, offset_s: float
                ) -> tuple[float, bool, str]:
    """Run (a segment of) RELION within the rest of the budget.

    Returns RELION's total seconds so far, whether it converged, and error text.
    """
    segments = _segments(rdir) if offset_s > 0 else []
    started = time.time()
    segments.append({"start_epoch": started, "offset_s": offset_s})
    (rdir / "segments.json").write_text(json.dumps(segments))
    (rdir / "stopped_s.txt").unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=max(RELION_LIMIT_S - offset_s, 1.0))
    except subprocess.TimeoutExpired:
        total = offset_s + time.time() - started
        (rdir / "stopped_s.txt").write_text(f"{total:.3f}\n")
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        return total, False, ""
    total = offset_s + time.time() - started
    if proc.returncode != 0:
        return total, False, err[-2000:]
    (rdir / "wall_s.txt").write_text(f"{total:.3f}\n")
    return total, True, ""


def main() -> str:
    if shutil.which("relion_refine_mpi") is None or shutil.which("mpirun") is None:
        return "B3 skipped: relion_refine_mpi/mpirun not installed (apt-get install -y relion)"
    from swiftalign.fsc import lowpass
    from swiftalign.io import read_map, write_map

    work = RESULTS / "tmp" / "b3"
    work.mkdir(parents=True, exist_ok=True)
    star, true_euler, true_shift = simulated_dataset(N_PARTICLES, RESULTS / "tmp")
    truth_names = list(starfile.read(star, always_dict=True)["particles"]["rlnImageName"])
    init = work / "init30.mrc"
    ref = read_map(MAP)
    write_map(init, lowpass(ref.data, 30.0, PIXEL_SIZE), PIXEL_SIZE)
    cores = os.cpu_count() or 2

    # --- RELION 3.1 auto-refine ---------------------------------------------------------
    rdir = work / "relion"
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi",
           "--i", str(star), "--o", str(rdir / "run"), "--ref", str(init), "--ini_high", "30",
           "--firstiter_cc", "--auto_refine", "--split_random_halves", "--sym", "C4", "--ctf",
           "--particle_diameter", "200", "--flatten_solvent", "--zero_mask",
           "--oversampling", "1", "--healpix_order", "2", "--auto_local_healpix_order", "4",
           "--offset_range", "8", "--offset_step", "2", "--norm", "--scale",
           "--j", "1", "--pool", "10", "--dont_combine_weights_via_disc", "--pad", "2",
           "--low_resol_join_halves", "40"]
    have = (rdir / "segments.json").exists() or (rdir / "started_epoch.txt").exists()
    reuse = (REUSE_RELION or CONTINUE_RELION) and have
    finished = reuse and (rdir / "wall_s.txt").exists()
    if reuse and CONTINUE_RELION and not finished:
        last = max(rdir.glob("run_it[0-9][0-9][0-9]_optimiser.star"))
        offset = _relion_time(_segments(rdir), last.stat().st_mtime)
        cont = cmd[:6] + ["--continue", str(last), "--o", str(rdir / "run"), "--j", "1",
                          "--pool", "10", "--dont_combine_weights_via_disc"]
        relion_s, finished, err = _run_relion(cont, star.parent, rdir, offset)
        if err:
            return f"B3: relion_refine_mpi --continue failed:\n{err}"
    elif reuse:
        if finished:
            relion_s = float((rdir / "wall_s.txt").read_text())
        elif (rdir / "stopped_s.txt").exists():  # stopped by a budget, unconverged
            relion_s = float((rdir / "stopped_s.txt").read_text())
        else:  # interrupted: the last iteration written
            relion_s = _relion_time(_segments(rdir), max(
                p.stat().st_mtime for p in rdir.glob("run_it*_optimiser.star")))
    else:
        shutil.rmtree(rdir, ignore_errors=True)
        rdir.mkdir()
        relion_s, finished, err = _run_relion(cmd, star.parent, rdir, 0.0)
        if err:
            return f"B3: relion_refine_mpi failed:\n{err}"
    timeline = _relion_timeline(rdir, _segments(rdir), truth_names, true_euler, true_shift)
    if finished:
        r_res = _fsc_resolution(rdir / "run_half1_class001_unfil.mrc",
                                rdir / "run_half2_class001_unfil.mrc")
        r_star = rdir / "run_data.star"
    else:
        r_res = min(t["resolution_angstrom"] for t in timeline)
        r_star = rdir / f"run_it{timeline[-1]['iteration']:03d}_data.star"
    e, s, rows = _poses(r_star, truth_names)
    r_ang, r_sh = errors(e, s, true_euler[rows], true_shift[rows])

    # --- swiftalign refine ----------------------------------------------------------------
    sdir = work / "swiftalign"
    shutil.rmtree(sdir, ignore_errors=True)
    # this checkout's code, whatever ``swiftalign`` on PATH is
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "swiftalign", "refine", str(star),
                           "--reference", str(init), "--initial-resolution", "30",
                           "--symmetry", "C4", "-q", "-o", str(sdir)],
                          capture_output=True, text=True, env=env)
    ours_s = time.perf_counter() - t0
    if proc.returncode != 0:
        return f"B3: swiftalign refine failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
    o_res = _fsc_resolution(sdir / "final" / "half1.mrc", sdir / "final" / "half2.mrc")
    parts = [sdir / "final" / "particles.star", sdir / "final" / "particles_rejected.star"]
    got = [_poses(p, truth_names) for p in parts if p.exists()]
    e = np.concatenate([g[0] for g in got])
    s = np.concatenate([g[1] for g in got])
    rows = np.concatenate([g[2] for g in got])
    o_ang, o_sh = errors(e, s, true_euler[rows], true_shift[rows])

    match = [t for t in timeline if t["resolution_angstrom"] <= (1 + MATCH) * o_res]
    relion_match_s = match[0]["wall_s"] if match else None
    o_med = float(np.median(o_ang))
    as_good = [t for t in timeline if t["median_deg"] <= o_med]
    relion_err_s = as_good[0]["wall_s"] if as_good else None
    bound = "" if finished else ">= "
    rows_out = [
        {"program": "RELION 3.1 auto-refine (3 MPI ranks)"
         + ("" if finished else f", stopped unconverged at {relion_s:.0f} s (last "
            f"iteration done: {timeline[-1]['iteration']})"),
         "wall_s": relion_s, "resolution_angstrom": r_res,
         "median_deg": float(np.median(r_ang)), "p90_deg": float(np.percentile(r_ang, 90)),
         "median_shift_px": float(np.median(r_sh)),
         "time_to_match_s": relion_match_s, "time_to_error_s": relion_err_s},
        {"program": "swiftalign refine", "wall_s": ours_s, "resolution_angstrom": o_res,
         "median_deg": float(np.median(o_ang)), "p90_deg": float(np.percentile(o_ang, 90)),
         "median_shift_px": float(np.median(o_sh)), "time_to_match_s": ours_s,
         "time_to_error_s": ours_s},
        {"program": f"ratio RELION / swiftalign ({bound or 'complete'})",
         "wall_s": relion_s / ours_s, "resolution_angstrom": o_res / r_res,
         "time_to_match_s": None if relion_match_s is None else relion_match_s / ours_s,
         "time_to_error_s": (f">= {relion_s / ours_s:.1f}" if relion_err_s is None
                             else relion_err_s / ours_s)},
    ]
    cols = [("program", "program", ""), ("wall_s", "wall time (s)", ".1f"),
            ("time_to_match_s", "time to ≤ 1.05 × our FSC0.143 (s)", ".1f"),
            ("time_to_error_s", "time to ≤ our median error (s)", ".1f"),
            ("resolution_angstrom", "FSC0.143 (Å)", ".2f"), ("median_deg", "median error (°)", ".2f"),
            ("p90_deg", "p90 error (°)", ".1f"), ("median_shift_px", "median shift error (px)", ".2f")]
    return write_results("b3_relion", rows_out, cols, extra={
        "particles": N_PARTICLES, "cores": cores, "relion_command": " ".join(cmd),
        "relion_finished": finished, "relion_limit_s": RELION_LIMIT_S,
        "relion_reused": reuse, "relion_timeline": timeline,
        "note": "last row: RELION / swiftalign for the wall time and the time to match, and "
                "ours / RELION for the resolution; RELION rows of a stopped run are lower bounds "
                "(its best iteration so far, that iteration's poses)",
    })
