"""``make demo``: the main job on the bundled TRPV1 map, end to end.

1. Simulate 2,000 particles from the bundled map (C4, −10 dB, CTF).
2. Align them with an exact search (``Flat``) and with an IVF-PQ index, print
   both error tables, the speed ratio and the wall time.
3. Align the 10 bundled real TRPV1 particles and print their angular
   difference to the published poses.
4. Refine the simulated set for two iterations from the map low-passed to
   30 Å and print the resolution per iteration.

Run: ``python -m swiftalign.demo [OUTDIR]`` (default ``demo_output``).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from importlib.resources import files
from pathlib import Path

import numpy as np


def _data(name: str) -> Path:
    """A file bundled in ``swiftalign/data``."""
    return Path(str(files("swiftalign") / "data" / name))


def _simulate(console, out: Path, ref, symmetry: str):
    """Stage 1: 2,000 simulated particles (C4, −10 dB, CTF) → (STAR path, truth)."""
    from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset

    t0 = time.perf_counter()
    sim = SimulationConfig(n_particles=2000, snr_db=-10.0, symmetry=symmetry, seed=2023)
    images, truth = simulate_particles(ref, sim)
    star = write_dataset(out / "simulated", images, truth,
                         pixel_size_angstrom=ref.voxel_size_angstrom, config=sim)
    console.print(f"simulated {len(images)} particles at {sim.snr_db} dB with CTF → {star} "
                  f"({time.perf_counter() - t0:.1f} s)")
    return star, truth


def _align_simulated(table, truth, ref, resolution: float, symmetry: str) -> dict:
    """Stage 2: exact and IVF-PQ alignments with their errors against the truth."""
    from swiftalign.alignment import AlignConfig, align_particles
    from swiftalign.evaluate import print_summary, summarise, symmetric_angular_error_deg
    from swiftalign.io import ParticleImages

    ps = ref.voxel_size_angstrom
    true_euler = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    true_shift = -truth[["rlnOriginYAngst", "rlnOriginXAngst"]].to_numpy() / ps
    results = {}
    for label in ("Flat", "IVF-PQ"):
        with ParticleImages(table) as parts:
            base = AlignConfig(resolution_angstrom=resolution, symmetry=symmetry,
                               index="Flat" if label == "Flat" else "ivfpq")
            t0 = time.perf_counter()
            res = align_particles(table, parts, ref, base)
            wall = time.perf_counter() - t0
        err = symmetric_angular_error_deg(res.euler_deg[:, 0], true_euler, symmetry)
        shift_px = np.hypot(*(res.shift_yx_px[:, 0] - true_shift).T)
        summary = summarise(err, shift_px * ps, shift_px, res.sampling.angular_step_deg)
        results[label] = (res, summary, wall, res.search.factory)
        print_summary(summary, title=f"{label} ({res.search.factory}): errors against truth")
    return results


def _speed_table(console, results: dict, n_particles: int, dphi: float) -> None:
    """Stage 2 (cont.): both indexes side by side and the speed ratio."""
    from rich.table import Table

    flat, ivf = results["Flat"], results["IVF-PQ"]
    s = flat[0].sampling
    t = Table(title=f"{s.n_poses:,} reference poses, ΔΦ = {dphi:.2f}°, Δs = "
                    f"{s.shift_step_px:.2f} px, {n_particles} particles")
    for col in ("index", "median err (°)", "≤ ΔΦ?", "build (s)", "search (s)",
                "particles/s", "bytes/pose", "total (s)"):
        t.add_column(col, justify="right")
    for res, summ, wall, factory in results.values():
        tm = res.timings
        build = tm.get("train", 0) + tm.get("populate", 0) + tm.get("tune", 0)
        med = summ["angular_error_deg"]["median"]
        t.add_row(factory, f"{med:.2f}", "yes" if med <= dphi else "NO", f"{build:.1f}",
                  f"{tm['query']:.2f}", f"{n_particles / tm['query']:.0f}",
                  f"{res.search.bytes_per_pose:.0f}" if res.search.bytes_per_pose else "0 (stream)",
                  f"{wall:.1f}")
    console.print(t)
    q_ratio = flat[0].timings["query"] / ivf[0].timings["query"]
    console.print(f"speed ratio (query, exact / IVF-PQ): {q_ratio:.1f}x; "
                  f"end to end: {flat[2] / ivf[2]:.2f}x (IVF-PQ build included)")


def _real_particles(console, ref, resolution: float, symmetry: str, dphi: float) -> None:
    """Stage 3: the 10 bundled real TRPV1 images against their published poses."""
    from rich.table import Table

    from swiftalign.alignment import AlignConfig, align_particles
    from swiftalign.evaluate import symmetric_angular_error_deg
    from swiftalign.io import ParticleImages, read_particles

    real = read_particles(_data("trpv1_particles.star"))
    with ParticleImages(real) as parts:
        res = align_particles(real, parts, ref, AlignConfig(
            resolution_angstrom=resolution, symmetry=symmetry, index="Flat"))
    pub = real.particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    diff = symmetric_angular_error_deg(res.euler_deg[:, 0], pub, symmetry)
    shift_diff = np.hypot(*(res.shift_yx_px[:, 0] - real.origins_shift_px()).T) \
        * ref.voxel_size_angstrom
    t = Table(title="10 real TRPV1 particles: difference to the published poses")
    t.add_column("particle", justify="right")
    t.add_column("angle (°)", justify="right")
    t.add_column("shift (Å)", justify="right")
    for i, (a, sd) in enumerate(zip(diff, shift_diff, strict=True)):
        t.add_row(str(i + 1), f"{a:.1f}", f"{sd:.1f}")
    console.print(t)
    console.print(f"real particles: median angular difference {np.median(diff):.1f}° "
                  f"(ΔΦ = {dphi:.2f}°)")


def _refine(console, table, ref, out: Path, symmetry: str) -> None:
    """Stage 4: a short gold-standard refinement from the map low-passed to 30 Å."""
    from rich.table import Table

    from swiftalign.fsc import lowpass
    from swiftalign.io import ParticleImages
    from swiftalign.io.mrc import MapData
    from swiftalign.refinement import RefineConfig, run_refinement

    ps = ref.voxel_size_angstrom
    console.rule("refinement: 2,000 simulated particles, start 30 Å")
    init = MapData(lowpass(ref.data, 30.0, ps), ps, ref.path)
    t0 = time.perf_counter()
    with ParticleImages(table) as parts:
        result = run_refinement(table, parts, [init], out / "refine", RefineConfig(
            initial_resolution_angstrom=30.0, symmetry=symmetry, iterations=2, repetitions=2))
    t = Table(title=f"refinement ({time.perf_counter() - t0:.0f} s) → {out / 'refine'}")
    for col in ("iteration", "aligned at (Å)", "FSC 0.143 (Å)", "FSC 0.5 (Å)", "kept",
                "rejected", "time (s)"):
        t.add_column(col, justify="right")
    for h in result.history:
        t.add_row(str(h["iteration"]), f"{h['alignment_resolution_angstrom']:.2f}",
                  f"{h['resolution_angstrom']:.2f}", f"{h['classes'][0]['resolution_05_angstrom']:.2f}",
                  str(h["kept"]), str(h["rejected"]), f"{h['seconds']:.0f}")
    console.print(t)
    console.print(f"Nyquist: {2 * ps:.2f} Å")


def main(out_dir: str = "demo_output") -> int:
    """Run the demo's four stages, writing into ``out_dir``; returns the exit status 0."""
    from rich.console import Console

    from swiftalign.io import read_map, read_particles
    from swiftalign.sampling import angular_step_deg

    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING)
    console = Console()
    t_all = time.perf_counter()
    out = Path(out_dir)
    ref = read_map(_data("trpv1_volume.mrc"))
    resolution, symmetry = 25.0, "C4"
    console.rule("swiftalign demo: TRPV1 (C4), 48 px at 4.88 Å/px")
    star, truth = _simulate(console, out, ref, symmetry)
    table = read_particles(star)
    dphi = angular_step_deg(resolution, ref.voxel_size_angstrom, ref.data.shape[0])
    results = _align_simulated(table, truth, ref, resolution, symmetry)
    _speed_table(console, results, len(table), dphi)
    _real_particles(console, ref, resolution, symmetry, dphi)
    _refine(console, table, ref, out, symmetry)
    console.print(f"demo wall time: {time.perf_counter() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
