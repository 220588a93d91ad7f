"""B6: one reconstruction at a real box size, ours against ``relion_reconstruct``.

A GroEL density (``../shared/data/models/1MNF``, all protein atoms, ``gemmi``
electron scattering factors, box 160 px at 1.6 Å/px) is projected into
``SWIFTALIGN_B6_PARTICLES`` (1000) particles with the package's simulator (D7
orientations, −15 dB, CTF defocus 0.8–2.5 µm). The same STAR file (true poses)
is reconstructed by ``relion_reconstruct --ctf --sym D7`` and by
:func:`swiftalign.reconstruction.reconstruct` (D7 symmetrisation, gridding
weights), one after the other on the same cores, each in its own process (wall
time, CPU time and peak RSS of that process: on shared cores the wall times depend on
the others' load, the CPU times much less), for each symmetry of
``SWIFTALIGN_B6_SYMMETRIES`` (``C1,D7``). Reported: both times, their ratio, the FSC
between the two maps (minimum over all shells to Nyquist and at Nyquist), and
our CPU time per stage (insertion, symmetrisation, gridding and inversion).

Skipped with a message when ``relion_reconstruct`` is absent (our time alone is
then reported). The simulated set is cached under ``benchmarks/results/tmp/b6/``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_results

N_PARTICLES = int(os.environ.get("SWIFTALIGN_B6_PARTICLES", "1000"))
BOX = 160
PIXEL_SIZE = 1.6
SYMMETRIES = os.environ.get("SWIFTALIGN_B6_SYMMETRIES", "C1,D7").split(",")
SYMMETRY = "D7"  # of the simulated particles
MODEL = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "1MNF.pdb.gz"

#: our reconstruction, timed per stage, in a fresh process (argv: star, output map, json)
_OURS = r"""
import json, sys, time, resource
import numpy as np, torch
from swiftalign.alignment import ctf_params_from_table
from swiftalign.io import ParticleImages, read_particles, write_map
from swiftalign.reconstruction import (complete_friedel, grid_to_map, insert_particles,
                                       new_grid, symmetrise)
from swiftalign.symmetry import symmetry_matrices
star, out, report, sym = sys.argv[1:5]
t0 = time.perf_counter()
table = read_particles(star)
euler = table.particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
ps = float(table.pixel_size_angstrom[0])
times = {}
def stage(name, t, c):
    times[name + "_s"] = time.perf_counter() - t
    times[name + "_cpu_s"] = time.process_time() - c
with ParticleImages(table) as images:
    grid = new_grid(images.box_size)
    t, c = time.perf_counter(), time.process_time()
    insert_particles(grid, images, np.arange(len(table)), euler, table.origins_shift_px(),
                     ctf=ctf_params_from_table(table), pixel_size_angstrom=ps)
    stage("insert", t, c)
t, c = time.perf_counter(), time.process_time()
grid = complete_friedel(grid)
if sym != "C1":
    grid = symmetrise(grid, symmetry_matrices(sym), max_radius=grid.shape[-2] // 2 + 1.0)
stage("symmetrise", t, c)
t, c = time.perf_counter(), time.process_time()
vol = grid_to_map(grid)
stage("gridding_and_inversion", t, c)
write_map(out, vol, ps)
times["total_s"] = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_SELF)
times["peak_rss_mb"] = usage.ru_maxrss / 1024.0
times["cpu_s"] = usage.ru_utime + usage.ru_stime
open(report, "w").write(json.dumps(times))
"""


def groel_density(path: Path) -> Path:
    """Write the 160 px, 1.6 Å/px GroEL density (gemmi, protein atoms, centred) once."""
    if path.exists():
        return path
    import gemmi

    from swiftalign.io import write_map

    st = gemmi.read_structure(str(MODEL))
    st.setup_entities()
    st.remove_ligands_and_waters()
    st.remove_hydrogens()
    side = BOX * PIXEL_SIZE
    xyz = np.array([a.pos.tolist() for ch in st[0] for res in ch for a in res])
    centre = gemmi.Position(*(side / 2.0 - xyz.mean(axis=0)))
    for ch in st[0]:
        for res in ch:
            for atom in res:
                atom.pos = atom.pos + centre
    st.cell = gemmi.UnitCell(side, side, side, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    calc = gemmi.DensityCalculatorE()
    calc.d_min = 2.0 * PIXEL_SIZE
    calc.grid.set_size(BOX, BOX, BOX)
    calc.grid.unit_cell = st.cell
    calc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    calc.put_model_density_on_grid(st[0])
    volume = np.array(calc.grid, copy=True).transpose(2, 1, 0).astype(np.float32)  # zyx
    write_map(path, volume, PIXEL_SIZE)
    return path


def dataset(n_particles: int) -> Path:
    """The simulated particles (cached): STAR file with the true poses."""
    from swiftalign.io import read_map
    from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset

    root = RESULTS / "tmp" / "b6"
    star = root / f"n{n_particles}" / "particles.star"
    if star.exists():
        return star
    root.mkdir(parents=True, exist_ok=True)
    ref = read_map(groel_density(root / "groel_160px.mrc"))
    cfg = SimulationConfig(n_particles=n_particles, snr_db=-15.0, symmetry=SYMMETRY, seed=1,
                           defocus_min_angstrom=8000.0, defocus_max_angstrom=25000.0)
    images, truth = simulate_particles(ref, cfg)
    return write_dataset(star.parent, images, truth, pixel_size_angstrom=PIXEL_SIZE, config=cfg)


def _child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _one(star: Path, symmetry: str) -> dict:
    """Ours, then ``relion_reconstruct``, on the same particles with ``symmetry``; one row."""
    import mrcfile

    from swiftalign.fsc import fsc_curve

    work = star.parent
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    ours, theirs = work / f"ours_{symmetry}.mrc", f"relion_{symmetry}.mrc"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", _OURS, str(star), str(ours),
                    str(work / "ours.json"), symmetry], check=True, env=env)
    ours_s = time.perf_counter() - t
    stages = json.loads((work / "ours.json").read_text())
    with mrcfile.open(ours, header_only=True) as m:  # gemmi may choose another grid than BOX
        box = int(m.header.nx)
    row = {"particles": N_PARTICLES, "box_px": box, "symmetry": symmetry, "ours_s": ours_s,
           **{f"ours_{k}": v for k, v in stages.items()}}
    if shutil.which("relion_reconstruct") is not None:
        t, cpu = time.perf_counter(), _child_cpu_s()
        subprocess.run(["relion_reconstruct", "--i", star.name, "--o", theirs, "--ctf",
                        "--sym", symmetry], cwd=work, check=True, capture_output=True)
        row["relion_s"] = time.perf_counter() - t
        row["relion_cpu_s"] = _child_cpu_s() - cpu
        row["ours_over_relion"] = ours_s / row["relion_s"]
        row["ours_cpu_over_relion_cpu"] = stages["cpu_s"] / row["relion_cpu_s"]
        f = fsc_curve(mrcfile.read(ours), mrcfile.read(work / theirs))
        row["fsc_min_to_nyquist"] = float(f[1:].min())
        row["fsc_at_nyquist"] = float(f[-1])
        row["fsc_min_below_nyquist"] = float(f[1:-1].min())
    row["load_average_after"] = os.getloadavg()[0]
    return row


def main() -> str:
    star = dataset(N_PARTICLES)
    rows = [_one(star, symmetry) for symmetry in SYMMETRIES]
    columns = [("particles", "particles", "d"), ("box_px", "box (px)", "d"),
               ("symmetry", "symmetry", ""), ("ours_s", "ours (s)", ".1f"),
               ("relion_s", "relion_reconstruct (s)", ".1f"),
               ("ours_cpu_s", "ours CPU (s)", ".1f"), ("relion_cpu_s", "RELION CPU (s)", ".1f"),
               ("ours_cpu_over_relion_cpu", "ours / RELION (CPU)", ".2f"),
               ("fsc_min_below_nyquist", "FSC min below Nyquist", ".4f"),
               ("fsc_at_nyquist", "FSC at Nyquist", ".4f"),
               ("ours_insert_cpu_s", "insertion CPU (s)", ".1f"),
               ("ours_symmetrise_cpu_s", "symmetrisation CPU (s)", ".1f"),
               ("ours_gridding_and_inversion_cpu_s", "gridding + inversion CPU (s)", ".1f"),
               ("ours_peak_rss_mb", "our peak RSS (MB)", ".0f"),
               ("load_average_after", "load avg", ".1f")]
    return write_results("b6_reconstruct", rows, columns,
                         extra={"command": "python -m benchmarks b6",
                                "particles_env": "SWIFTALIGN_B6_PARTICLES"})


if __name__ == "__main__":
    print(main())
