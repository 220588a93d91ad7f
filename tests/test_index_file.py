"""Persisted index (issue 6): built once, reused for several datasets without retraining;
refused with a clear message when it does not fit the particles or the file is not an index."""

from __future__ import annotations

import json
import zipfile
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import starfile
from tests.conftest import SMALL_INDEX
from typer.testing import CliRunner

from swiftalign import alignment, search
from swiftalign.alignment import AlignConfig, align_particles
from swiftalign.cli.main import app
from swiftalign.errors import InputError
from swiftalign.index_file import load_reference_index, read_manifest
from swiftalign.io import ParticleImages, read_map, read_particles, write_map
from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset

MAP = Path(str(files("swiftalign") / "data" / "trpv1_volume.mrc"))
runner = CliRunner()

CONFIG = AlignConfig(**SMALL_INDEX)


def _dataset(trpv1_map, out: Path, seed: int, n: int = 80, **kw) -> Path:
    cfg = SimulationConfig(n_particles=n, snr_db=0.0, symmetry="C4", shift_sigma_px=1.5,
                           seed=seed, **kw)
    images, truth = simulate_particles(trpv1_map, cfg)
    return write_dataset(out, images, truth, pixel_size_angstrom=trpv1_map.voxel_size_angstrom,
                         config=cfg)


@pytest.fixture(scope="module")
def built(trpv1_map, small_index, tmp_path_factory):
    """The index built in memory and written to a file; two simulated datasets."""
    out = tmp_path_factory.mktemp("datasets")
    refset, path, build_s = small_index
    stars = [_dataset(trpv1_map, out / f"d{i}", seed=11 + i) for i in range(2)]
    return refset, path, stars, build_s


def test_manifest_holds_every_parameter(built):
    refset, path, _, _ = built
    m = read_manifest(path)
    assert m["format"] == "swiftalign-index" and m["format_version"] == 2
    assert m["config"]["resolution_angstrom"] == 25.0 and m["config"]["symmetry"] == "C4"
    assert m["config"]["ctf_mode"] == "wiener" and m["box_size"] == 48
    assert m["pixel_size_angstrom"] == pytest.approx(4.88)
    assert m["factory"] == "IVF64,PQ32x4fs" and m["nprobe"] >= 1
    assert m["n_poses"] == refset.gallery.n_poses > 15_000
    with zipfile.ZipFile(path) as zf:
        assert {"faiss.index", "gallery_coeffs.npy", "reference.npy"} <= set(zf.namelist())


def test_reused_for_two_datasets_without_retraining(built, monkeypatch):
    """Loaded index: no projection, no training, no populating, and the same poses as the
    index it was saved from."""
    refset, path, stars, _ = built
    calls = {"train": 0, "gallery": 0, "add": 0}

    def counting(name, fn):
        def wrapper(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(search, "_faiss_train", counting("train", search._faiss_train))
    monkeypatch.setattr(search, "_faiss_add", counting("add", search._faiss_add))
    monkeypatch.setattr(alignment, "build_gallery", counting("gallery", alignment.build_gallery))
    loaded = load_reference_index(path)
    for star in stars:
        table = read_particles(star)
        with ParticleImages(table) as images:
            got = align_particles(table, images, loaded, CONFIG)
            want = align_particles(table, images, refset, CONFIG)
        np.testing.assert_array_equal(got.search.ids, want.search.ids)
        np.testing.assert_allclose(got.euler_deg, want.euler_deg, atol=1e-9)
        np.testing.assert_allclose(got.shift_yx_px, want.shift_yx_px, atol=1e-9)
        assert got.timings["train"] == got.timings["populate"] == 0.0
        # recovered poses: the index works, not just agrees with itself
        truth = starfile.read(star)["particles"]
        from swiftalign.evaluate import symmetric_angular_error_deg

        err = symmetric_angular_error_deg(
            got.euler_deg[:, 0], truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(),
            "C4")
        assert np.median(err) < 12.0
    # nothing rebuilt (the time saved is measured in benchmarks/, not asserted here)
    assert calls == {"train": 0, "gallery": 0, "add": 0}


def test_cli_build_and_reuse_match(trpv1_map, built, tmp_path):
    _, _, stars, _ = built
    idx = tmp_path / "r.swidx"
    r = runner.invoke(app, ["index", "build", "-r", str(MAP), "--resolution", "25", "--symmetry",
                            "C4", "--angular-step", "12", "--max-shift", "4", "--index", "Flat",
                            "-o", str(idx), "-q"])
    assert r.exit_code == 0, r.output
    with zipfile.ZipFile(idx) as zf:
        assert "faiss.index" not in zf.namelist()  # exact search: the gallery is the index
    a, b = tmp_path / "a.star", tmp_path / "b.star"
    r = runner.invoke(app, ["align", str(stars[0]), "--index-file", str(idx), "-o", str(a), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["align", str(stars[0]), "-r", str(MAP), "--resolution", "25",
                            "--symmetry", "C4", "--angular-step", "12", "--max-shift", "4",
                            "--index", "Flat", "--weighting", "none", "-o", str(b), "-q"])
    assert r.exit_code == 0, r.output
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    pa, pb = starfile.read(a)["particles"], starfile.read(b)["particles"]
    np.testing.assert_allclose(pa[cols].to_numpy(), pb[cols].to_numpy(), atol=1e-5)
    run = json.loads((tmp_path / "a_run.json").read_text())
    assert run["inputs"]["index_file"] == str(idx)
    assert run["timings_s"]["train"] == 0.0 and "gallery" not in run["timings_s"]
    # an option that the index fixes, given differently
    r = runner.invoke(app, ["align", str(stars[0]), "--index-file", str(idx), "--symmetry", "C1",
                            "-o", str(tmp_path / "c.star"), "-q"])
    assert r.exit_code == 2
    assert "symmetry = 'C4'" in " ".join(r.output.split())
    assert not (tmp_path / "c.star").exists()


def test_weighted_index_whitens_every_dataset_with_its_stored_spectrum(trpv1_map, tmp_path):
    """``index build --particles`` stores the noise spectrum the gallery was whitened with;
    aligning with the file equals aligning with the map and the same spectrum, and on coloured
    noise the whitened index recovers poses the unweighted one does not."""
    # the coloured dataset at -10 dB (snr 0 in _dataset is too easy to tell the weights apart)
    cfg = SimulationConfig(n_particles=60, snr_db=-10.0, symmetry="C4", shift_sigma_px=1.5,
                           seed=5, noise_psd_exponent=1.0)
    images, truth = simulate_particles(trpv1_map, cfg)
    star = write_dataset(tmp_path / "col", images, truth, pixel_size_angstrom=4.88, config=cfg)
    common = ["--resolution", "25", "--symmetry", "C4", "--angular-step", "12", "--max-shift",
              "4", "--index", "Flat", "-q"]
    idx = tmp_path / "w.swidx"
    r = runner.invoke(app, ["index", "build", "-r", str(MAP), "--particles", str(star),
                            "-o", str(idx), *common])
    assert r.exit_code == 0, r.output
    m = read_manifest(idx)
    assert m["config"]["weighting"] == "noise"
    loaded = load_reference_index(idx)
    assert loaded.noise is not None and loaded.noise.noise_power.shape == (1, 25)
    # 1/|k| noise: low shells hold several times the power of high ones
    assert loaded.noise.noise_power[0, 3] > 3 * loaded.noise.noise_power[0, 20]
    a, b, c = tmp_path / "a.star", tmp_path / "b.star", tmp_path / "c.star"
    r = runner.invoke(app, ["align", str(star), "--index-file", str(idx), "-o", str(a), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["align", str(star), "-r", str(MAP), "-o", str(b), *common])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["align", str(star), "-r", str(MAP), "--weighting", "none",
                            "-o", str(c), *common])
    assert r.exit_code == 0, r.output
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    pa, pb, pc = (starfile.read(p)["particles"] for p in (a, b, c))
    np.testing.assert_allclose(pa[cols].to_numpy(), pb[cols].to_numpy(), atol=1e-4)
    from swiftalign.evaluate import symmetric_angular_error_deg

    true = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    err_w = np.median(symmetric_angular_error_deg(pa[cols[:3]].to_numpy(), true, "C4"))
    err_n = np.median(symmetric_angular_error_deg(pc[cols[:3]].to_numpy(), true, "C4"))
    assert err_w < 0.6 * err_n, (err_w, err_n)
    # the weighting is fixed by the file
    r = runner.invoke(app, ["align", str(star), "--index-file", str(idx), "--weighting", "none",
                            "-o", str(tmp_path / "d.star"), "-q"])
    assert r.exit_code == 2 and "weighting = 'noise'" in " ".join(r.output.split())
    # so is the mask its noise spectrum was measured in
    r = runner.invoke(app, ["align", str(star), "--index-file", str(idx), "--particle-diameter",
                            "150", "-o", str(tmp_path / "d.star"), "-q"])
    assert r.exit_code == 2 and "particle_diameter_angstrom = None" in " ".join(r.output.split())
    assert not (tmp_path / "d.star").exists()
    # without particles there is nothing to whiten with
    r = runner.invoke(app, ["index", "build", "-r", str(MAP), "--weighting", "noise",
                            "-o", str(tmp_path / "x.swidx"), *common])
    assert r.exit_code == 2 and "--particles" in r.output


def _expect_error(args, *fragments):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    for f in fragments:
        assert f in text, text
    assert "Traceback" not in r.output


def test_mismatches_are_refused(trpv1_map, built, tmp_path):
    _, path, stars, _ = built
    out = tmp_path / "o.star"
    # pixel size: the same particles declared at 5.2 Å/px
    blocks = starfile.read(stars[0], always_dict=True)
    blocks["optics"]["rlnImagePixelSize"] = 5.2
    star_ps = stars[0].with_name("ps.star")
    starfile.write(blocks, star_ps, overwrite=True)
    _expect_error(["align", str(star_ps), "--index-file", str(path), "-o", str(out)],
                  "built for pixel size 4.88", "5.2")
    # CTF mode: an index for CTF-free particles, particles with a CTF
    small = tmp_path / "none.swidx"
    r = runner.invoke(app, ["index", "build", "-r", str(MAP), "--resolution", "30",
                            "--angular-step", "20", "--max-shift", "2", "--index", "Flat",
                            "--ctf-mode", "none", "-o", str(small), "-q"])
    assert r.exit_code == 0, r.output
    _expect_error(["align", str(stars[0]), "--index-file", str(small), "-o", str(out)],
                  "--ctf-mode none", "rlnDefocusU")
    # box: an index of a 32-px map
    crop = tmp_path / "crop.mrc"
    write_map(crop, trpv1_map.data[8:40, 8:40, 8:40], 4.88)
    small32 = tmp_path / "b32.swidx"
    r = runner.invoke(app, ["index", "build", "-r", str(crop), "--resolution", "30",
                            "--angular-step", "20", "--max-shift", "2", "--index", "Flat",
                            "-o", str(small32), "-q"])
    assert r.exit_code == 0, r.output
    _expect_error(["align", str(stars[0]), "--index-file", str(small32), "-o", str(out)],
                  "built for box 32 px", "48 px")
    assert not out.exists()
    # reference CTF mode cannot be persisted
    _expect_error(["index", "build", "-r", str(MAP), "--resolution", "30", "--ctf-mode",
                   "reference", "-o", str(tmp_path / "x.swidx")], "--ctf-mode reference")
    assert not (tmp_path / "x.swidx").exists()


def test_foreign_and_corrupt_files_are_refused(built, tmp_path):
    _, path, stars, _ = built
    junk = tmp_path / "junk.swidx"
    junk.write_bytes(b"\x00" * 2000)
    with pytest.raises(InputError, match="not a swiftalign index file"):
        load_reference_index(junk)
    other = tmp_path / "other.swidx"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="format 'something-else'"):
        load_reference_index(other)
    newer = tmp_path / "newer.swidx"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "manifest.json":
                m = json.loads(data)
                m["format_version"] = 99
                data = json.dumps(m)
            dst.writestr(item, data)
    with pytest.raises(InputError, match="format_version 99 is not supported"):
        load_reference_index(newer)
    truncated = tmp_path / "truncated.swidx"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=str(truncated.name)):
        load_reference_index(truncated)
    _expect_error(["align", str(stars[0]), "--index-file", str(junk), "-o",
                   str(tmp_path / "o.star")], "not a swiftalign index file")


def test_map_with_other_voxel_size_is_resampled_for_the_index(trpv1_map, tmp_path):
    """`index build --pixel-size` resamples a map within 5 % (as align does)."""
    m = tmp_path / "m.mrc"
    write_map(m, trpv1_map.data, 4.80)
    idx = tmp_path / "m.swidx"
    r = runner.invoke(app, ["index", "build", "-r", str(m), "--resolution", "30", "--pixel-size",
                            "4.88", "--angular-step", "20", "--max-shift", "2", "--index",
                            "Flat", "-o", str(idx), "-q"])
    assert r.exit_code == 0, r.output
    assert read_manifest(idx)["pixel_size_angstrom"] == pytest.approx(4.88)
    assert read_map(m).voxel_size_angstrom == pytest.approx(4.80)  # input untouched


def test_cuda_request_falls_back_to_cpu_with_a_message(built, monkeypatch):
    """--device cuda without CUDA (or without faiss-gpu): a clear warning, CPU results."""
    import faiss
    import torch

    refset, path, stars, _ = built
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the fallback is not taken")
    table = read_particles(stars[0])
    cuda = CONFIG.model_copy(update={"device": "cuda"})
    with ParticleImages(table) as images, pytest.warns(UserWarning, match="CUDA is not available"):
        got = align_particles(table, images, load_reference_index(path), cuda)
    with ParticleImages(table) as images:
        want = align_particles(table, images, refset, CONFIG)
    np.testing.assert_array_equal(got.search.ids, want.search.ids)
    # faiss without GPU support: the index stays on the CPU, and says so
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    with pytest.warns(UserWarning, match="faiss-gpu is not installed"):
        moved = search.index_to_device(refset.index, "cuda")
    assert moved.device == "cpu" and moved.faiss_index is refset.index.faiss_index


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_index_gives_cpu_poses(built):
    refset, path, stars, _ = built
    table = read_particles(stars[0])
    cuda = CONFIG.model_copy(update={"device": "cuda"})
    with ParticleImages(table) as images:
        got = align_particles(table, images, load_reference_index(path, device="cuda"), cuda)
        want = align_particles(table, images, refset, CONFIG)
    assert np.mean(got.search.ids[:, 0] == want.search.ids[:, 0]) >= 0.95
    np.testing.assert_allclose(np.median(got.score), np.median(want.score), atol=1e-3)
