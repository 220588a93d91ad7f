"""Memory: particles aligned in chunks give the same poses; jobs that cannot fit are refused."""

from __future__ import annotations

import numpy as np
import pytest

from swiftalign.alignment import AlignConfig, align_particles
from swiftalign.errors import InputError
from swiftalign.io.particles import ParticleImages
from swiftalign.io.star import read_particles
from swiftalign.memory import check_free_disk, plan_align_memory, reconstruction_bytes


@pytest.mark.parametrize("options", [{"ctf_mode": "reference"},
                                     {"index": "PCA32,Flat", "ctf_mode": "wiener"}])
def test_chunked_alignment_equals_one_chunk(trpv1_map, noisy_dataset, options):
    """Chunks of 23 particles (reference CTF groups over all particles; one trained index)
    give exactly the poses of one chunk."""
    star, _ = noisy_dataset
    table = read_particles(star)
    rows = np.arange(0, 300, 4)  # 75 particles
    config = AlignConfig(resolution_angstrom=30.0, symmetry="C4", local_rounds=1, **options)
    with ParticleImages(table) as parts:
        one = align_particles(table, parts, trpv1_map, config, rows=rows)
        chunked = align_particles(table, parts, trpv1_map, config, rows=rows, chunk_particles=23)
    assert one.euler_deg.shape == chunked.euler_deg.shape == (75, 1, 3)
    np.testing.assert_allclose(chunked.euler_deg, one.euler_deg, atol=1e-6)
    np.testing.assert_allclose(chunked.shift_yx_px, one.shift_yx_px, atol=1e-6)
    np.testing.assert_allclose(chunked.score, one.score, atol=1e-5)


def test_budget_gives_chunks_and_search_workspace():
    mem = plan_align_memory(budget_bytes=2 * 1024**3, gallery_bytes=500e6, box_size=160,
                            per_particle_bytes=20_000, n_particles=500_000)
    assert mem.peak_bytes <= 2 * 1024**3
    assert 10_000 < mem.chunk_particles < 500_000
    assert mem.search_bytes >= mem.chunk_particles * mem.per_particle_bytes
    small = plan_align_memory(budget_bytes=2 * 1024**3, gallery_bytes=500e6, box_size=160,
                              per_particle_bytes=20_000, n_particles=100)
    assert small.chunk_particles == 100


def test_job_that_cannot_fit_is_refused_naming_sizes():
    with pytest.raises(InputError, match=r"gallery 1\.86 GB.*more than --max-memory 2 GB"):
        plan_align_memory(budget_bytes=2 * 1024**3, gallery_bytes=2e9, box_size=160,
                          per_particle_bytes=20_000, n_particles=5000)
    # two (3, 320, 320, 161) float32 grids, their copy and a few maps
    assert reconstruction_bytes(160) == 3 * 3 * 320 * 320 * 161 * 4 + 8 * 160**3 * 8


def test_disk_check_names_sizes(tmp_path):
    check_free_disk(tmp_path / "new" / "run", 1024, "refine")
    with pytest.raises(InputError, match=r"needs about .* GB of disk, but only .* GB is free"):
        check_free_disk(tmp_path / "run", 1 << 60, "refine")
