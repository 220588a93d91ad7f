"""Shared fixtures: the bundled map, ../shared/data (skipped when absent), small datasets."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(rel: str) -> Path:
    """A file under ../shared/data, or skip the test."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture(scope="session")
def trpv1_map():
    from swiftalign.io import read_map

    return read_map(Path(str(files("swiftalign") / "data" / "trpv1_volume.mrc")))


@pytest.fixture(scope="session")
def noisy_dataset(trpv1_map, tmp_path_factory):
    """300 TRPV1 particles, C4, −10 dB, CTF: (star path, truth frame)."""
    from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset

    cfg = SimulationConfig(n_particles=300, snr_db=-10.0, symmetry="C4", seed=7)
    images, truth = simulate_particles(trpv1_map, cfg)
    out = tmp_path_factory.mktemp("noisy")
    star = write_dataset(out, images, truth, pixel_size_angstrom=trpv1_map.voxel_size_angstrom,
                         config=cfg)
    return star, truth


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


#: A small trained index (issue 6 tests): 12° steps, shifts to 4 px (≈ 20k poses), IVF-PQ.
SMALL_INDEX = dict(resolution_angstrom=25.0, symmetry="C4", angular_step_deg=12.0,
                   max_shift_px=4.0, index="IVF64,PQ32x4fs", local_rounds=1, weighting="none")


@pytest.fixture(scope="session")
def small_index(trpv1_map, tmp_path_factory):
    """(reference set with its populated index, index file, build seconds)."""
    import time

    from swiftalign.alignment import AlignConfig, build_reference_set
    from swiftalign.index_file import save_reference_index

    t0 = time.perf_counter()
    refset = build_reference_set(trpv1_map, AlignConfig(**SMALL_INDEX), pixel_size_angstrom=4.88,
                                 populate=True)
    path = tmp_path_factory.mktemp("index") / "refs.swidx"
    save_reference_index(path, refset)
    return refset, path, time.perf_counter() - t0
