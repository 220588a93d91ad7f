"""Shared helpers: datasets, timing, peak memory, result tables."""

from __future__ import annotations

import json
import os
import resource
import time
from importlib.resources import files
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MAP = Path(str(files("swiftalign") / "data" / "trpv1_volume.mrc"))


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def simulated_dataset(n_particles: int, out: Path, *, snr_db: float = -10.0, seed: int = 1):
    """Simulate TRPV1 particles (C4, CTF) once and cache them under ``out``."""
    from swiftalign.io import read_map
    from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset

    out = out / f"n{n_particles}_snr{snr_db:g}_seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    star = out / "particles.star"
    truth_file = out / "truth.npz"
    if not star.exists():
        ref = read_map(MAP)
        cfg = SimulationConfig(n_particles=n_particles, snr_db=snr_db, symmetry="C4", seed=seed)
        images, truth = simulate_particles(ref, cfg)
        write_dataset(out, images, truth, pixel_size_angstrom=4.88, config=cfg)
        np.savez(truth_file,
                 euler=truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(),
                 shift=-truth[["rlnOriginYAngst", "rlnOriginXAngst"]].to_numpy() / 4.88)
    t = np.load(truth_file)
    return star, t["euler"], t["shift"]


def errors(euler, shift, true_euler, true_shift, symmetry="C4"):
    from swiftalign.evaluate import symmetric_angular_error_deg

    ang = symmetric_angular_error_deg(euler, true_euler, symmetry)
    sh = np.hypot(*(shift - true_shift).T)
    return ang, sh


def write_results(name: str, rows: list[dict], columns: list[tuple[str, str, str]],
                  extra: dict | None = None) -> str:
    """Write ``results/NAME.json`` and ``results/NAME.md``; return the markdown table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"rows": rows, "machine": {"cpu_count": os.cpu_count(), "time": time.ctime()},
               **(extra or {})}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float))
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key, "")
            v = "–" if v is None else v
            cells.append(format(v, fmt) if isinstance(v, (int, float)) and fmt else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(md)
    return md
