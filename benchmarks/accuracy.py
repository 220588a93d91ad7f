"""Accuracy study (issue 7): index, CTF mode, noise weighting and DFT vs DCT features.

Simulated particles (``swiftalign.simulate``, astigmatic CTF, defocus 0.5–2.5 µm,
shifts σ 2 px) from real maps of ``../shared/data``:

- ``trpv1``: TRPV1, EMD-5778-like map (cryojax), C4, 48 px, 4.88 Å/px;
- ``emd1832``: EMD-1832 (CMG complex), C1, 64 px, 5.7 Å/px;
- ``cxcr4``: density computed from the CXCR4 cryo-EM model 8ZPM (atoms binned by
  atomic number, Gaussian of σ 1 Å), C1, 64 px, 2.2 Å/px — the only source fine
  enough for a 6 Å limit (the maps above stop at 9.8 and 11.4 Å Nyquist).

Every condition (map × SNR −10/−15 dB × white/coloured 1/|k| noise) aligns the
same particles with one factor changed from the baseline (exact Flat search,
``wiener`` CTF, no weighting, DFT; default local refinement) against the
simulation map low-passed to the alignment limit. Reported: median
angular error (symmetry-aware), median shift error, and the FSC0.143 of two half
maps reconstructed with the aligned poses (unmasked FSC, direct Fourier inversion
with the gridding weights: a reconstruction, not an iterative refinement).
The CTF study aligns one ``cxcr4`` set (white noise, −15 dB) at 15, 10 and 6 Å
with both CTF modes at a fixed global sampling (ΔΦ 10°, Δs 2 px, then the default
local refinement) so that only the distance changes. ``emd1832`` uses ΔΦ 7.5°
(instead of 4.7° from its 30 Å limit) to keep the study within minutes on 2 cores.

The refinement part runs ``swiftalign refine`` (defaults, 3 iterations) on TRPV1
particles with 1/|k| noise at −10 dB from the map low-passed to 30 Å, once with
``--weighting none`` and once with ``--weighting noise`` (background spectrum in
iteration 1, residual spectra after), and reports the final FSC0.143 (masked, as
``refine`` reports it), the final poses' median error and the wall time.

``python -m benchmarks.accuracy [ctf] [study] [refine] [--quick]`` writes
``results/accuracy.{json,md}``, ``results/accuracy_ctf.{json,md}`` and
``results/accuracy_refine.{json,md}``.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_results

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TMP = RESULTS / "tmp" / "accuracy"

MAPS = {
    "trpv1": {"path": "cryojax_trpv1/trpv1_volume.mrc", "symmetry": "C4", "resolution": 20.0,
              "n": 300},
    "emd1832": {"path": "sfftk/emd_1832.map", "symmetry": "C1", "resolution": 30.0, "n": 200,
                "angular_step_deg": 7.5},
}
BASELINE = {"index": "Flat", "ctf_mode": "wiener", "weighting": "none", "transform": "dft"}
VARIANTS = [
    ("baseline (Flat, wiener, none, DFT)", {}),
    ("PCA64,Flat", {"index": "PCA64,Flat"}),
    ("IVF-PQ (ivfpq)", {"index": "ivfpq"}),
    ("reference CTF", {"ctf_mode": "reference"}),
    ("noise weighting", {"weighting": "noise"}),
    ("DCT", {"transform": "dct"}),
]
CONDITIONS = [(-10.0, 0.0), (-10.0, 1.0), (-15.0, 0.0), (-15.0, 1.0)]


def model_density(path: Path, pixel_size_angstrom: float, box_size: int,
                  sigma_angstrom: float = 1.0) -> np.ndarray:
    """`(N, N, N)` density of an mmCIF model: atoms binned by atomic number, Gaussian blur.

    The centre of mass goes to voxel ``N // 2``.
    """
    from scipy import ndimage

    z_of = {"C": 6, "N": 7, "O": 8, "S": 16, "P": 15}
    cols, rows = [], []
    for line in Path(path).read_text().splitlines():
        if line.startswith("_atom_site."):
            cols.append(line.split(".", 1)[1].strip())
        elif line.startswith(("ATOM", "HETATM")) and cols:
            rows.append(line.split())
    ix, iy, iz = (cols.index(f"Cartn_{a}") for a in "xyz")
    it = cols.index("type_symbol")
    xyz = np.array([[float(r[ix]), float(r[iy]), float(r[iz])] for r in rows])
    z = np.array([z_of.get(r[it], 6) for r in rows], dtype=np.float64)
    xyz = xyz - (xyz * z[:, None]).sum(0) / z.sum()
    c = box_size // 2
    edges = (np.arange(box_size + 1) - c - 0.5) * pixel_size_angstrom
    # map axes are z, y, x
    grid, _ = np.histogramdd(xyz[:, ::-1], bins=(edges, edges, edges), weights=z)
    return ndimage.gaussian_filter(grid, sigma_angstrom / pixel_size_angstrom).astype(np.float32)


def load_map(name: str):
    from swiftalign.io import read_map
    from swiftalign.io.mrc import MapData

    if name == "cxcr4":
        return MapData(model_density(SHARED / "models" / "8zpm.cif", 2.2, 64), 2.2,
                       SHARED / "models" / "8zpm.cif")
    return read_map(SHARED / MAPS[name]["path"])


def dataset(name: str, n: int, snr_db: float, colour: float, symmetry: str, seed: int = 11):
    """Simulate (cached) and return (star, true euler, true shift px, pixel size)."""
    from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset

    out = TMP / f"{name}_n{n}_snr{snr_db:g}_a{colour:g}_s{seed}"
    star = out / "particles.star"
    ref = load_map(name)
    ps = ref.voxel_size_angstrom
    if not star.exists():
        cfg = SimulationConfig(n_particles=n, snr_db=snr_db, symmetry=symmetry, seed=seed,
                               shift_sigma_px=2.0, noise_psd_exponent=colour)
        images, truth = simulate_particles(ref, cfg)
        write_dataset(out, images, truth, pixel_size_angstrom=ps, config=cfg)
    return star, ref


def run_alignment(star: Path, ref, symmetry: str, **config) -> dict:
    from swiftalign.alignment import AlignConfig, align_particles, ctf_params_from_table
    from swiftalign.evaluate import symmetric_angular_error_deg
    from swiftalign.fsc import fsc_curve, lowpass, resolution_at
    from swiftalign.io import ParticleImages, read_particles
    from swiftalign.io.mrc import MapData
    from swiftalign.reconstruction import reconstruct
    from swiftalign.symmetry import symmetry_matrices

    table = read_particles(star)
    ps = float(table.pixel_size_angstrom[0])
    df = table.particles
    true_euler = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    true_shift = -df[["rlnOriginYAngst", "rlnOriginXAngst"]].to_numpy() / ps
    cfg = AlignConfig(symmetry=symmetry, max_shift_px=6.0, **config)
    # the reference is the simulation map low-passed to the limit (as in a refinement), so
    # that the half maps' FSC beyond the limit is not reference bias
    low = MapData(lowpass(ref.data, cfg.resolution_angstrom, ps), ps, ref.path)
    with ParticleImages(table) as parts:
        t0 = time.perf_counter()
        res = align_particles(table, parts, low, cfg)
        wall = time.perf_counter() - t0
        euler, shift = res.euler_deg[:, 0], res.shift_yx_px[:, 0]
        ang = symmetric_angular_error_deg(euler, true_euler, symmetry)
        sh = np.hypot(*(shift - true_shift).T)
        halves = df["rlnRandomSubset"].to_numpy()
        ctf = ctf_params_from_table(table)
        maps = []
        for h in (1, 2):
            rows = np.nonzero(halves == h)[0]
            maps.append(reconstruct(parts, euler[rows], shift[rows], ctf=ctf.subset(rows),
                                    pixel_size_angstrom=ps, rows=rows,
                                    symmetry_group=symmetry_matrices(symmetry)))
    fsc = fsc_curve(*maps)
    return {
        "median_err_deg": float(np.median(ang)),
        "p90_err_deg": float(np.percentile(ang, 90)),
        "median_shift_err_px": float(np.median(sh)),
        "fsc0143_angstrom": resolution_at(fsc, 0.143, ref.data.shape[0], ps),
        "angular_step_deg": res.sampling.angular_step_deg,
        "ctf_mode_used": res.ctf_mode,
        "search_s": res.timings.get("query", 0.0) + res.timings.get("train", 0.0)
        + res.timings.get("populate", 0.0) + res.timings.get("tune", 0.0)
        + res.timings.get("ctf_rescore", 0.0),
        "wall_s": wall,
    }


def main_study(quick: bool = False) -> str:
    rows = []
    for name, spec in MAPS.items():
        n = spec["n"] if not quick else 150
        for snr_db, colour in CONDITIONS if not quick else CONDITIONS[:2]:
            star, ref = dataset(name, n, snr_db, colour, spec["symmetry"])
            for label, change in VARIANTS:
                cfg = {**BASELINE, **change, "resolution_angstrom": spec["resolution"]}
                if "angular_step_deg" in spec:
                    cfg["angular_step_deg"] = cfg["psi_step_deg"] = spec["angular_step_deg"]
                r = run_alignment(star, ref, spec["symmetry"], **cfg)
                row = {"map": name, "snr_db": snr_db,
                       "noise": "white" if colour == 0 else f"1/k^{colour:g}",
                       "variant": label, "n_particles": n, **r}
                rows.append(row)
                print(f"{name} {snr_db:g} dB a={colour:g} {label}: "
                      f"{r['median_err_deg']:.2f}° {r['median_shift_err_px']:.2f} px "
                      f"FSC {r['fsc0143_angstrom']:.1f} Å {r['wall_s']:.1f} s", flush=True)
    cols = [("map", "map", ""), ("snr_db", "SNR (dB)", ".0f"), ("noise", "noise", ""),
            ("variant", "variant", ""), ("median_err_deg", "median err (°)", ".2f"),
            ("p90_err_deg", "p90 (°)", ".1f"), ("median_shift_err_px", "shift err (px)", ".2f"),
            ("fsc0143_angstrom", "FSC0.143 (Å)", ".1f"), ("angular_step_deg", "ΔΦ (°)", ".2f"),
            ("search_s", "search (s)", ".1f"), ("wall_s", "align (s)", ".1f")]
    return write_results("accuracy" if not quick else "accuracy_quick", rows, cols, {
        "maps": MAPS, "baseline": BASELINE, "conditions": CONDITIONS})


def main_ctf(quick: bool = False) -> str:
    n = 150 if not quick else 60
    star, ref = dataset("cxcr4", n, -15.0, 0.0, "C1")
    rows = []
    for limit in (15.0, 10.0, 6.0):
        for mode in ("wiener", "reference"):
            r = run_alignment(star, ref, "C1", resolution_angstrom=limit, ctf_mode=mode,
                              index="Flat", angular_step_deg=10.0, psi_step_deg=10.0,
                              shift_step_px=2.0)
            rows.append({"map": "cxcr4", "limit_angstrom": limit, "ctf_mode": mode,
                         "n_particles": n, **r})
            print(f"cxcr4 {limit:g} Å {mode}: {r['median_err_deg']:.2f}° "
                  f"FSC {r['fsc0143_angstrom']:.1f} Å {r['wall_s']:.1f} s", flush=True)
    cols = [("limit_angstrom", "limit (Å)", ".0f"), ("ctf_mode", "CTF mode", ""),
            ("median_err_deg", "median err (°)", ".2f"), ("p90_err_deg", "p90 (°)", ".1f"),
            ("median_shift_err_px", "shift err (px)", ".2f"),
            ("fsc0143_angstrom", "FSC0.143 (Å)", ".1f"), ("search_s", "search (s)", ".1f"),
            ("wall_s", "align (s)", ".1f")]
    return write_results("accuracy_ctf" if not quick else "accuracy_ctf_quick", rows, cols,
                         {"dataset": f"cxcr4 (8ZPM density), {n} particles, -15 dB white, C1; "
                          "ΔΦ 10°, Δs 2 px fixed"})


def main_refine(quick: bool = False) -> str:
    import json
    import shutil
    import subprocess

    import starfile

    from swiftalign.evaluate import symmetric_angular_error_deg
    from swiftalign.fsc import lowpass
    from swiftalign.io import write_map

    n = 1000 if not quick else 300
    star, ref = dataset("trpv1", n, -10.0, 1.0, "C4", seed=5)
    ps = ref.voxel_size_angstrom
    init = TMP / "trpv1_init30.mrc"
    write_map(init, lowpass(ref.data, 30.0, ps), ps)
    truth = starfile.read(star, always_dict=True)["particles"]
    index = {name.split("@")[0]: i for i, name in enumerate(truth["rlnImageName"])}
    true_euler = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    rows = []
    for weighting in ("none", "noise"):
        out = TMP / f"refine_{weighting}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "swiftalign", "refine", str(star), "--reference",
                        str(init), "--initial-resolution", "30", "--symmetry", "C4",
                        "--iterations", "3", "--weighting", weighting, "-q", "-o", str(out)],
                       check=True)
        wall = time.perf_counter() - t0
        run = json.loads((out / "final" / "run.json").read_text())
        parts = [starfile.read(out / "final" / f, always_dict=True)["particles"]
                 for f in ("particles.star", "particles_rejected.star")
                 if (out / "final" / f).exists()]
        got = np.concatenate([p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
                              for p in parts])
        idx = np.concatenate([[index[x.split("@")[0]] for x in p["rlnImageName"]]
                              for p in parts])
        err = symmetric_angular_error_deg(got, true_euler[idx], "C4")
        hist = run["history"]
        rows.append({"weighting": weighting, "n_particles": n,
                     "resolution_angstrom": hist[-1]["resolution_angstrom"],
                     "resolutions": [h["resolution_angstrom"] for h in hist],
                     "median_err_deg": float(np.median(err)),
                     "p90_err_deg": float(np.percentile(err, 90)),
                     "kept": hist[-1]["kept"], "wall_s": wall})
        print(rows[-1], flush=True)
    cols = [("weighting", "refine --weighting", ""), ("resolution_angstrom", "FSC0.143 (Å)", ".2f"),
            ("median_err_deg", "median err (°)", ".2f"), ("p90_err_deg", "p90 (°)", ".1f"),
            ("kept", "kept", "d"), ("wall_s", "wall (s)", ".0f")]
    return write_results("accuracy_refine" if not quick else "accuracy_refine_quick", rows, cols,
                         {"dataset": f"trpv1, {n} particles, -10 dB, 1/k noise, C4; refine from "
                          "the map low-passed to 30 Å, 3 iterations"})


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    quick = "--quick" in sys.argv
    parts = [a for a in sys.argv[1:] if not a.startswith("--")] or ["ctf", "study", "refine"]
    if "ctf" in parts:
        print(main_ctf(quick))
    if "study" in parts:
        print(main_study(quick))
    if "refine" in parts:
        print(main_refine(quick))
