"""Memory: particles aligned in chunks give the same poses; jobs that cannot fit are refused."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from swiftalign.alignment import AlignConfig, align_particles
from swiftalign.errors import InputError
from swiftalign.io.particles import ParticleImages
from swiftalign.io.star import read_particles
from swiftalign.memory import check_free_disk, plan_align_memory, reconstruction_bytes

MAP = Path(str(files("swiftalign") / "data" / "trpv1_volume.mrc"))


@pytest.mark.parametrize("options", [{"ctf_mode": "reference"},
                                     {"index": "PCA32,Flat", "ctf_mode": "wiener"}])
def test_chunked_alignment_equals_one_chunk(trpv1_map, noisy_dataset, options):
    """Chunks of 23 particles (reference CTF groups over all particles; one trained index)
    give the poses of one chunk (to float32 rounding)."""
    star, _ = noisy_dataset
    table = read_particles(star)
    rows = np.arange(0, 300, 4)  # 75 particles
    config = AlignConfig(resolution_angstrom=30.0, symmetry="C4", local_rounds=1, **options)
    with ParticleImages(table) as parts:
        one = align_particles(table, parts, trpv1_map, config, rows=rows)
        chunked = align_particles(table, parts, trpv1_map, config, rows=rows, chunk_particles=23)
    assert one.euler_deg.shape == chunked.euler_deg.shape == (75, 1, 3)
    # the local search moves continuously (parabola vertices): float32 sums batched
    # differently move the poses by < 1e-3 deg (5e-5 measured), never to another pose
    np.testing.assert_allclose(chunked.euler_deg, one.euler_deg, atol=1e-3)
    np.testing.assert_allclose(chunked.shift_yx_px, one.shift_yx_px, atol=1e-3)
    np.testing.assert_allclose(chunked.score, one.score, rtol=1e-4, atol=1e-5)


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


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from typer.testing import CliRunner

    from swiftalign.cli.main import app

    out = tmp_path_factory.mktemp("sim")
    r = CliRunner().invoke(app, ["simulate", str(MAP), "-o", str(out), "-n", "60", "--symmetry",
                                 "C4", "--snr-db", "0", "--seed", "3", "-q"])
    assert r.exit_code == 0, r.output
    return out


def test_align_that_cannot_fit_is_refused_before_work(sim, tmp_path):
    from typer.testing import CliRunner

    from swiftalign.cli.main import app

    out = tmp_path / "o.star"
    r = CliRunner().invoke(app, ["align", str(sim / "particles.star"), "--reference", str(MAP),
                                 "--resolution", "25", "--symmetry", "C4", "-o", str(out), "-q",
                                 "--max-memory", "0.03"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert "map spectrum 0.01 GB" in text and "more than --max-memory 0.03 GB" in text
    assert "Traceback" not in r.output and not out.exists()


def test_refine_that_cannot_fit_is_refused_and_leaves_nothing(sim, tmp_path):
    from typer.testing import CliRunner

    from swiftalign.cli.main import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["refine", str(sim / "particles.star"), "-r", str(MAP),
                                 "--initial-resolution", "30", "--symmetry", "C4", "-o", str(out),
                                 "-q", "--max-memory", "0.15"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert "refine at 20 Å (3 repetitions) needs" in text
    assert "other galleries" in text and "more than --max-memory 0.15 GB" in text
    assert not out.exists() or not any(out.iterdir())


def test_box_too_large_for_the_device_says_so(monkeypatch):
    import torch

    from swiftalign.memory import check_device_memory

    check_device_memory("cpu", 1 << 60, "align")  # the CPU is bounded by --max-memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 1024**3, 8 * 1024**3))
    with pytest.raises(InputError, match=r"needs at least 3\.00 GB on cuda:0, which has 2\.00 GB "
                                         r"free of 8\.00 GB"):
        check_device_memory("cuda:0", 3 * 1024**3, "refine: the reconstruction of a 512-px box")


def test_gallery_rotated_in_sub_batches_is_the_same(trpv1_map):
    """Bounding the rotation batch (memory) changes no coefficient."""
    import torch

    from swiftalign.fourier import make_disc
    from swiftalign.gallery import build_gallery

    vol = torch.as_tensor(trpv1_map.data)
    rot_tilt = np.array([[0.0, 10.0], [40.0, 70.0], [120.0, 100.0], [250.0, 160.0]])
    disc = make_disc(48, 0.2)
    kwargs = dict(directions_rot_tilt_deg=rot_tilt, psi_step_deg=30.0,
                  shifts_yx_px=np.zeros((1, 2)), disc=disc, metric="cosine")
    whole = build_gallery(vol, rng=np.random.default_rng(0), **kwargs)
    small = build_gallery(vol, rng=np.random.default_rng(0), max_batch_bytes=1, **kwargs)
    assert whole.coeffs.shape == (4 * 12, disc.n_coeff)
    torch.testing.assert_close(small.coeffs, whole.coeffs, rtol=0, atol=1e-6)


def test_released_stack_pages_read_back_the_same(noisy_dataset):
    star, _ = noisy_dataset
    with ParticleImages(read_particles(star)) as parts:
        first = parts.read(np.arange(10))
        again = parts.read(np.arange(10))  # pages dropped after the first read
    assert first.std() > 0
    np.testing.assert_array_equal(first, again)
