"""B2: query time and memory as the reference set and the particle count grow.

Reference set ×1, ×4, ×16 poses by a finer angular step (ΔΦ, ΔΦ/2, ΔΦ/4 at a 25 Å
disc), particles ×1 and ×4; exact search (Flat) and IVF-PQ (`ivfpq`). The
exponent is the slope of log(query time) against log(size).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import MAP, RESULTS, peak_rss_mb, simulated_dataset, write_results

BASE_STEP = 6.13


def run_one(index: str, star: Path, n_particles: int, factor: int) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    from swiftalign.alignment import AlignConfig, align_particles
    from swiftalign.io import ParticleImages, read_map, read_particles

    ref = read_map(MAP)
    table = read_particles(star)
    step = BASE_STEP / np.sqrt(factor) ** (2 / 3)  # poses ∝ ΔΦ⁻³
    with ParticleImages(table) as parts:
        t0 = time.perf_counter()
        res = align_particles(table, parts, ref, AlignConfig(
            resolution_angstrom=25.0, symmetry="C4", index=index, local_rounds=0,
            angular_step_deg=step, psi_step_deg=step), rows=np.arange(n_particles))
        wall = time.perf_counter() - t0
    tm = res.timings
    return {"index": index, "n_particles": n_particles, "factor": factor,
            "n_poses": res.sampling.n_poses, "query_s": tm["query"],
            "build_s": tm.get("train", 0) + tm.get("populate", 0) + tm.get("tune", 0),
            "wall_s": wall, "peak_rss_mb": peak_rss_mb(), "factory": res.search.factory}


def run_align(index: str, star: Path, n_particles: int) -> dict:
    """The whole ``align`` with its defaults (local refinement included) on the first particles."""
    import warnings

    warnings.simplefilter("ignore")
    from benchmarks.common import errors
    from swiftalign.alignment import AlignConfig, align_particles
    from swiftalign.io import ParticleImages, read_map, read_particles

    ref = read_map(MAP)
    table = read_particles(star)
    truth = np.load(star.parent / "truth.npz")
    with ParticleImages(table) as parts:
        t0 = time.perf_counter()
        res = align_particles(table, parts, ref, AlignConfig(
            resolution_angstrom=25.0, symmetry="C4", index=index), rows=np.arange(n_particles))
        wall = time.perf_counter() - t0
    ang, _ = errors(res.euler_deg[:, 0], res.shift_yx_px[:, 0], truth["euler"][:n_particles],
                    truth["shift"][:n_particles])
    return {"index": index, "factory": res.search.factory, "n_particles": n_particles,
            "n_poses": res.sampling.n_poses, "wall_s": wall, "median_err_deg": float(np.median(ang)),
            **{f"{k}_s": v for k, v in res.timings.items()}}


def marginal(n_small: int = 1000, n_large: int = 4000) -> str:
    """Marginal per-particle cost of the whole align: default index vs ``Flat``.

    ``(wall(n_large) − wall(n_small)) / (n_large − n_small)`` for each index, each run in
    its own process; the search stage (train + populate + tune + query) is reported apart.
    """
    out = RESULTS / "tmp" / "b2"
    out.mkdir(parents=True, exist_ok=True)
    star, _, _ = simulated_dataset(n_large, out)
    rows = []
    for index in ("auto", "Flat"):
        for n in (n_small, n_large):
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.b2_scaling", "--align", index, str(star),
                 str(n)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip().splitlines()[-1])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["search_s"] = sum(r.get(f"{k}_s", 0.0) for k in ("train", "populate", "tune",
                                                                "query"))
            rows.append(r)
            print(json.dumps(r), flush=True)  # each run as it ends (long runs)
    for index in ("auto", "Flat"):
        small, large = (r for r in rows if r["index"] == index)
        large["marginal_ms"] = 1e3 * (large["wall_s"] - small["wall_s"]) / (n_large - n_small)
    cols = [("index", "index", ""), ("factory", "factory", ""), ("n_particles", "particles", "d"),
            ("search_s", "search (s)", ".1f"), ("ctf_rescore_s", "ctf_rescore (s)", ".1f"),
            ("local_s", "local (s)", ".1f"), ("wall_s", "wall (s)", ".1f"),
            ("marginal_ms", "marginal (ms/particle)", ".2f"),
            ("median_err_deg", "median err (°)", ".2f")]
    return write_results("b2_marginal", rows, cols)


def main(n_particles: int = 1000, factors=(1, 4, 16)) -> str:
    out = RESULTS / "tmp" / "b2"
    out.mkdir(parents=True, exist_ok=True)
    star, _, _ = simulated_dataset(4 * n_particles, out)
    rows = []
    for index in ("Flat", "ivfpq"):
        for factor in factors:
            for mult in (1, 4):
                if mult == 4 and factor != factors[0]:
                    continue
                proc = subprocess.run(
                    [sys.executable, "-m", "benchmarks.b2_scaling", "--one", index, str(star),
                     str(n_particles * mult), str(factor)], capture_output=True, text=True)
                if proc.returncode != 0:
                    rows.append({"index": index, "factor": factor,
                                 "note": proc.stderr.strip().splitlines()[-1][:120]})
                    continue
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    exponents = {}
    for index in ("Flat", "ivfpq"):
        pts = [(r["n_poses"], r["query_s"]) for r in rows
               if r.get("index") == index and r.get("n_particles") == n_particles]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            exponents[f"{index}_poses"] = float(np.polyfit(x, y, 1)[0])
        pp = [(r["n_particles"], r["query_s"]) for r in rows
              if r.get("index") == index and r.get("factor") == factors[0]]
        if len(pp) >= 2:
            x, y = np.log([p[0] for p in pp]), np.log([p[1] for p in pp])
            exponents[f"{index}_particles"] = float(np.polyfit(x, y, 1)[0])
    _plot(rows, n_particles)
    cols = [("index", "index", ""), ("factory", "factory", ""), ("n_poses", "poses", ",d"),
            ("n_particles", "particles", "d"), ("query_s", "query (s)", ".2f"),
            ("build_s", "build (s)", ".1f"), ("peak_rss_mb", "peak RSS (MB)", ".0f")]
    md = write_results("b2_scaling", rows, cols, {"exponents": exponents})
    md += "\nMeasured exponents (query time ∝ size^e): " + ", ".join(
        f"{k} {v:.2f}" for k, v in exponents.items()) + "\n"
    (RESULTS / "b2_scaling.md").write_text(md)
    return md


def _plot(rows, n_particles):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for index in ("Flat", "ivfpq"):
        pts = sorted((r["n_poses"], r["query_s"], r["peak_rss_mb"]) for r in rows
                     if r.get("index") == index and r.get("n_particles") == n_particles)
        if pts:
            axes[0].loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=index)
            axes[1].semilogx([p[0] for p in pts], [p[2] for p in pts], "o-", label=index)
    axes[0].set_xlabel("reference poses")
    axes[0].set_ylabel(f"query time for {n_particles} particles (s)")
    axes[1].set_xlabel("reference poses")
    axes[1].set_ylabel("peak RSS (MB)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "b2_scaling.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--align":
        print(json.dumps(run_align(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "marginal":
        print(marginal(*(int(a) for a in sys.argv[2:4])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(run_one(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]),
                                 int(sys.argv[5]))))
    else:
        print(main())
