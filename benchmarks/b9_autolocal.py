"""B9: refine with automatic local searches against global searches only (issue 13 item 3).

A realistic set (:mod:`benchmarks.realistic`: GroEL 1MNF, D7, EMPIAR-10028 defoci,
−15 dB) is refined from the true map low-passed to 30 Å. The first
``SWIFTALIGN_B9_SHARED`` iterations (2) are global in both modes and run once; then
both branches continue from the same state, iteration by iteration in turn (so that
machine load hits both alike): **global** (``auto_local=False``) and **auto**
(``auto_local=True``, which switches to local searches once the poses stop moving).
Per iteration: the search that ran and why, resolution (FSC 0.143), kept particles,
median angular error against the truth, alignment and total seconds.

Sizes: ``SWIFTALIGN_B9_N`` (1000 particles), ``SWIFTALIGN_B9_BOX`` (128 px),
``SWIFTALIGN_B9_PIXEL`` (1.6 Å), ``SWIFTALIGN_B9_ITERATIONS`` (6), ``SWIFTALIGN_B9_REPETITIONS``
(2), ``SWIFTALIGN_B9_RECONSTRUCTION`` (gridding; wiener is cheaper, same in both modes).
Run: ``python -m benchmarks b9``; results in ``results/b9_autolocal.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_results
from benchmarks.realistic import DatasetSpec, build_dataset

N_PARTICLES = int(os.environ.get("SWIFTALIGN_B9_N", "1000"))
BOX = int(os.environ.get("SWIFTALIGN_B9_BOX", "128"))
PIXEL_SIZE = float(os.environ.get("SWIFTALIGN_B9_PIXEL", "1.6"))
ITERATIONS = int(os.environ.get("SWIFTALIGN_B9_ITERATIONS", "6"))
SHARED = int(os.environ.get("SWIFTALIGN_B9_SHARED", "2"))
REPETITIONS = int(os.environ.get("SWIFTALIGN_B9_REPETITIONS", "2"))
RECONSTRUCTION = os.environ.get("SWIFTALIGN_B9_RECONSTRUCTION", "gridding")
INITIAL_RESOLUTION = 30.0


def _row(mode: str, entry: dict, error_deg: float, seconds: float) -> dict:
    return {"mode": mode, "iteration": entry["iteration"], "search": entry["search"],
            "reason": entry["search_reason"], "align_at": entry["alignment_resolution_angstrom"],
            "resolution": entry["resolution_angstrom"], "kept": entry["kept"],
            "error_deg": error_deg, "align_s": entry["timings_s"]["align"], "seconds": seconds}


def main() -> str:
    """Build the set, refine both ways from a shared start, write the comparison."""
    from swiftalign.evaluate import symmetric_angular_error_deg
    from swiftalign.fsc import lowpass
    from swiftalign.io import read_map, read_particles
    from swiftalign.io.particles import open_usable_particles
    from swiftalign.refinement import (
        RefineConfig,
        _advance,
        initial_state,
        prepare_refinement,
        refine_iteration,
    )

    spec = DatasetSpec(model="1MNF", n_particles=N_PARTICLES, box=BOX,
                       pixel_size_angstrom=PIXEL_SIZE, snr_db=-15.0, seed=0,
                       projector="relion" if shutil.which("relion_project") else "package")
    ds = build_dataset(RESULTS / "tmp" / "b9", spec)
    table, images = open_usable_particles(read_particles(ds.star), max_bad_fraction=0.01)
    # the set's pose columns hold the truth
    truth_euler = table.particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    truth = read_map(ds.truth_map)
    init = type(truth)(lowpass(truth.data, INITIAL_RESOLUTION, PIXEL_SIZE), PIXEL_SIZE,
                       truth.path)
    base = dict(initial_resolution_angstrom=INITIAL_RESOLUTION, symmetry=spec.symmetry,
                repetitions=REPETITIONS, iterations=ITERATIONS, seed=0,
                reconstruction=RECONSTRUCTION)
    setups = {mode: prepare_refinement(table, images, [init], RefineConfig(
        **base, auto_local=mode == "auto")) for mode in ("global", "auto")}
    rows: list[dict] = []

    def step(mode: str, state, it: int):
        t0 = time.perf_counter()
        result = refine_iteration(setups[mode], state, it)
        seconds = time.perf_counter() - t0
        entry = {**result.entry, "seconds": seconds}
        err = float(np.median(symmetric_angular_error_deg(
            result.consensus.euler_deg, truth_euler, spec.symmetry)))
        rows.append(_row(mode, entry, err, seconds))
        print(rows[-1], flush=True)
        return _advance(state, result, entry)

    state = initial_state(setups["global"])
    for it in range(1, SHARED + 1):
        state = step("global", state, it)
    states = {"global": state, "auto": state}
    for it in range(SHARED + 1, ITERATIONS + 1):
        for mode in ("global", "auto"):
            states[mode] = step(mode, states[mode], it)
    images.close()
    columns = [("mode", "mode", ""), ("iteration", "iteration", ""), ("search", "search", ""),
               ("reason", "why", ""), ("align_at", "align at (Å)", ".2f"),
               ("resolution", "resolution (Å)", ".2f"), ("kept", "kept", ""),
               ("error_deg", "median error (°)", ".2f"), ("align_s", "alignment (s)", ".1f"),
               ("seconds", "iteration (s)", ".1f")]
    return write_results("b9_autolocal", rows, columns, extra={
        "dataset": dataclasses.asdict(spec), "repetitions": REPETITIONS,
        "reconstruction": RECONSTRUCTION,
        "shared_iterations": SHARED, "note": "times on a shared machine: compare within a run",
        "work": str(Path(ds.folder))})
