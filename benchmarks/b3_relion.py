"""B3: the whole refinement against RELION 3.1's auto-refine on the same data and cores.

Both start from the same simulated particles (TRPV1, C4, −10 dB, CTF) and the same
initial reference (the map low-passed to 30 Å), on the same cores:
``mpirun -n 3 relion_refine_mpi --auto_refine --split_random_halves`` (one thread per
rank) and ``swiftalign refine`` (torch on the same cores). Both final resolutions are
measured the same way (our gold-standard FSC with the same automatic solvent mask on
each program's own unfiltered half maps), and both sets of final poses are compared
with the ground truth (symmetry-aware angular error, shift error).
Skipped with a message when ``relion_refine_mpi`` or ``mpirun`` is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import starfile

from benchmarks.common import MAP, RESULTS, errors, simulated_dataset, write_results

N_PARTICLES = int(os.environ.get("SWIFTALIGN_B3_PARTICLES", "2000"))
PIXEL_SIZE = 4.88


def _final_fsc(half1: Path, half2: Path) -> float:
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
    shutil.rmtree(rdir, ignore_errors=True)
    rdir.mkdir()
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi",
           "--i", str(star), "--o", str(rdir / "run"), "--ref", str(init), "--ini_high", "30",
           "--firstiter_cc", "--auto_refine", "--split_random_halves", "--sym", "C4", "--ctf",
           "--particle_diameter", "200", "--flatten_solvent", "--zero_mask",
           "--oversampling", "1", "--healpix_order", "2", "--auto_local_healpix_order", "4",
           "--offset_range", "8", "--offset_step", "2", "--norm", "--scale",
           "--j", "1", "--pool", "10", "--dont_combine_weights_via_disc", "--pad", "2",
           "--low_resol_join_halves", "40"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=star.parent)
    relion_s = time.perf_counter() - t0
    if proc.returncode != 0:
        return f"B3: relion_refine_mpi failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
    r_res = _final_fsc(rdir / "run_half1_class001_unfil.mrc", rdir / "run_half2_class001_unfil.mrc")
    e, s, rows = _poses(rdir / "run_data.star", truth_names)
    r_ang, r_sh = errors(e, s, true_euler[rows], true_shift[rows])

    # --- swiftalign refine ----------------------------------------------------------------
    sdir = work / "swiftalign"
    shutil.rmtree(sdir, ignore_errors=True)
    t0 = time.perf_counter()
    # this checkout's code, whatever ``swiftalign`` on PATH is
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "swiftalign", "refine", str(star),
                           "--reference", str(init), "--initial-resolution", "30",
                           "--symmetry", "C4", "-q", "-o", str(sdir)],
                          capture_output=True, text=True, env=env)
    ours_s = time.perf_counter() - t0
    if proc.returncode != 0:
        return f"B3: swiftalign refine failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
    o_res = _final_fsc(sdir / "final" / "half1.mrc", sdir / "final" / "half2.mrc")
    parts = [sdir / "final" / "particles.star", sdir / "final" / "particles_rejected.star"]
    got = [_poses(p, truth_names) for p in parts if p.exists()]
    e = np.concatenate([g[0] for g in got])
    s = np.concatenate([g[1] for g in got])
    rows = np.concatenate([g[2] for g in got])
    o_ang, o_sh = errors(e, s, true_euler[rows], true_shift[rows])

    rows_out = []
    for name, wall, res, ang, sh in (("RELION 3.1 auto-refine (3 MPI ranks)", relion_s, r_res,
                                      r_ang, r_sh),
                                     ("swiftalign refine", ours_s, o_res, o_ang, o_sh)):
        rows_out.append({
            "program": name, "wall_s": wall, "resolution_angstrom": res,
            "median_deg": float(np.median(ang)), "p90_deg": float(np.percentile(ang, 90)),
            "median_shift_px": float(np.median(sh)),
        })
    rows_out.append({"program": "ratio RELION / swiftalign", "wall_s": relion_s / ours_s,
                     "resolution_angstrom": o_res / r_res})
    cols = [("program", "program", ""), ("wall_s", "wall time (s)", ".1f"),
            ("resolution_angstrom", "FSC0.143 (Å)", ".2f"), ("median_deg", "median error (°)", ".2f"),
            ("p90_deg", "p90 error (°)", ".1f"), ("median_shift_px", "median shift error (px)", ".2f")]
    return write_results("b3_relion", rows_out, cols, extra={
        "particles": N_PARTICLES, "cores": cores, "relion_command": " ".join(cmd),
        "note": "last row: wall-time ratio and resolution ratio (ours / RELION)",
    })
