"""Dask (issue 6): a 2-worker LocalCluster gives the poses of the single-process run, and each
worker reads the index file once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import starfile
from tests.conftest import SMALL_INDEX

from swiftalign.alignment import AlignConfig, align_particles
from swiftalign.index_file import load_reference_index
from swiftalign.io import ParticleImages, read_particles
from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset

distributed = pytest.importorskip("dask.distributed")

CONFIG = AlignConfig(**SMALL_INDEX)


@pytest.fixture(scope="module")
def setup(trpv1_map, small_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster")
    index = small_index[1]
    cfg = SimulationConfig(n_particles=150, snr_db=0.0, symmetry="C4", shift_sigma_px=1.5,
                           seed=21)
    images, truth = simulate_particles(trpv1_map, cfg)
    star = write_dataset(out, images, truth, pixel_size_angstrom=4.88, config=cfg)
    return index, star


def _worker_env():
    """Workers import this checkout's swiftalign (PYTHONPATH of the test run)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [src, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])


def test_local_cluster_gives_single_process_poses(setup):
    from swiftalign import index_file
    from swiftalign.cluster import align_on_cluster

    index, star = setup
    table = read_particles(star)
    with ParticleImages(table) as images:
        single = align_particles(table, images, load_reference_index(index), CONFIG)
    _worker_env()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        dist = align_on_cluster(table, index, CONFIG, scheduler=cluster.scheduler_address,
                                chunk_size=40)  # 4 chunks on 2 workers
        with distributed.Client(cluster) as client:
            loads = client.run(lambda: index_file.load_count)
    np.testing.assert_array_equal(dist.search.ids, single.search.ids)
    # the local search moves continuously (parabola vertices): float32 sums that differ
    # with the threads and batches of a worker move the poses by < 1e-3 deg, not more
    np.testing.assert_allclose(dist.euler_deg, single.euler_deg, atol=1e-3)
    np.testing.assert_allclose(dist.shift_yx_px, single.shift_yx_px, atol=1e-3)
    np.testing.assert_allclose(dist.score, single.score, rtol=1e-4)
    assert len(loads) == 2 and sum(loads.values()) <= 2  # once per worker, not per chunk


def test_cli_workers(setup, tmp_path):
    from typer.testing import CliRunner

    from swiftalign.cli.main import app

    index, star = setup
    _worker_env()
    a, b = tmp_path / "a.star", tmp_path / "b.star"
    r = CliRunner().invoke(app, ["align", str(star), "--index-file", str(index), "--workers", "2",
                                 "--chunk-size", "75", "-o", str(a), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["align", str(star), "--index-file", str(index), "-o", str(b),
                                 "-q"])
    assert r.exit_code == 0, r.output
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    pa, pb = starfile.read(a)["particles"], starfile.read(b)["particles"]
    # to float32 rounding of the continuous local moves (deg; Å at 4.88 Å/px)
    np.testing.assert_allclose(pa[cols].to_numpy(), pb[cols].to_numpy(), atol=5e-3)
    r = CliRunner().invoke(app, ["align", str(star), "-r", "x.mrc", "--resolution", "25",
                                 "--workers", "2", "-o", str(tmp_path / "c.star")])
    assert r.exit_code == 2 and "needs --index-file" in r.output
