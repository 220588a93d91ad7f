"""Masks, post-processing and local resolution: known answers and agreement with RELION 3.1."""

from __future__ import annotations

import shutil
import subprocess

import mrcfile
import numpy as np
import pytest
import starfile
from typer.testing import CliRunner

from swiftalign.cli.main import app
from swiftalign.fsc import fsc_curve
from swiftalign.io.mrc import write_map
from swiftalign.local_resolution import local_resolution
from swiftalign.mask import create_mask, relion_lowpass, threshold_for_molecular_weight
from swiftalign.postprocess import fit_guinier

runner = CliRunner()
HAS_RELION = shutil.which("relion_postprocess") is not None
# the bundled 48³ TRPV1 map relabelled at 1.2 Å/px, so that 10 Å … Nyquist spans 19 shells
PIXEL = 1.2
B_TRUE = 60.0


def _blur(volume: np.ndarray, bfactor: float, pixel: float) -> np.ndarray:
    n = volume.shape[0]
    k, kr = np.fft.fftfreq(n), np.fft.rfftfreq(n)
    s2 = (k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2) / pixel**2
    spec = np.fft.rfftn(volume) * np.exp(-bfactor / 4 * s2)
    return np.fft.irfftn(spec, s=volume.shape, axes=(0, 1, 2))


@pytest.fixture(scope="module")
def halves(trpv1_map, tmp_path_factory):
    """Half maps = map blurred by B = 60 Å² + independent noise; a mask from the signal."""
    out = tmp_path_factory.mktemp("halves")
    signal = _blur(trpv1_map.data.astype(np.float64), B_TRUE, PIXEL)
    rng = np.random.default_rng(0)
    sd = 2.0 * signal.std()
    h1 = (signal + rng.normal(0, sd, signal.shape)).astype(np.float32)
    h2 = (signal + rng.normal(0, sd, signal.shape)).astype(np.float32)
    mask = create_mask(relion_lowpass(signal, 8.0, PIXEL), 0.1 * signal.max(), extend_px=3,
                       soft_edge_px=4)
    for name, data in (("half1", h1), ("half2", h2), ("mask", mask)):
        write_map(out / f"{name}.mrc", data, PIXEL)
    return out, h1, h2, mask


@pytest.mark.skipif(shutil.which("relion_mask_create") is None, reason="RELION not installed")
@pytest.mark.parametrize("lowpass", [None, 15.0])
def test_mask_agrees_with_relion_mask_create(trpv1_map, tmp_path, lowpass):
    src = tmp_path / "map.mrc"
    write_map(src, trpv1_map.data, 4.88)
    cmd = ["relion_mask_create", "--i", str(src), "--o", str(tmp_path / "relion.mrc"),
           "--ini_threshold", "0.02", "--extend_inimask", "2", "--width_soft_edge", "3"]
    if lowpass:
        cmd += ["--lowpass", str(lowpass)]
    subprocess.run(cmd, check=True, capture_output=True)
    args = ["mask", str(src), "-o", str(tmp_path / "ours.mrc"), "--threshold", "0.02",
            "--extend", "2", "--soft-edge", "3", "-q"]
    r = runner.invoke(app, args + (["--lowpass", str(lowpass)] if lowpass else []))
    assert r.exit_code == 0, r.output
    theirs = mrcfile.read(tmp_path / "relion.mrc")
    with mrcfile.open(tmp_path / "ours.mrc") as m:
        ours = m.data
        assert float(m.voxel_size.x) == pytest.approx(4.88, abs=1e-3)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999
    np.testing.assert_array_equal(ours == 1, theirs == 1)  # identical binary core
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_mask_geometry_and_molecular_weight_threshold():
    vol = np.zeros((32, 32, 32), np.float32)
    vol[16, 16, 16] = 1.0  # one voxel: extension and edge are spheres around it
    m = create_mask(vol, 0.5, extend_px=3, soft_edge_px=4)
    z, y, x = np.indices(vol.shape)
    d = np.sqrt((z - 16) ** 2 + (y - 16) ** 2 + (x - 16) ** 2)
    assert (m[d < 3] == 1).all() and (m[d >= 3 + 4] == 0).all()
    # (16, 16, 21) lies 3 px from the nearest extended voxel (16, 16, 18)
    assert m[16, 16, 21] == pytest.approx(0.5 + 0.5 * np.cos(np.pi * 3 / 4), abs=1e-6)
    ramp = np.arange(32**3, dtype=np.float32).reshape(vol.shape)
    # 810 kDa = 1,000,000 Å³ = 1000 voxels of 10 Å: the threshold keeps the 1000 largest
    thr = threshold_for_molecular_weight(ramp, 810.0, 10.0)
    assert int((ramp >= thr).sum()) == 1000


def test_guinier_fit_recovers_a_known_bfactor():
    d = np.linspace(20, 2.5, 40)
    x = 1 / d**2
    fit = fit_guinier(x, 1.5 - 100.0 / 4 * x, lowres_angstrom=10.0)
    assert fit.bfactor_angstrom2 == pytest.approx(-100.0, rel=1e-9)
    assert fit.correlation == pytest.approx(1.0)


@pytest.fixture(scope="module")
def ours(halves):
    """``swiftalign postprocess`` of the halves (once: the FSCs take seconds on 2 cores)."""
    src = halves[0]
    out = src / "ours"
    r = runner.invoke(app, ["postprocess", str(src / "half1.mrc"), str(src / "half2.mrc"),
                            "--mask", str(src / "mask.mrc"), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    return out


def test_postprocess_recovers_the_applied_blur(ours):
    general = starfile.read(ours / "postprocess.star", always_dict=True)["general"]
    # the blur B = +60 Å² is found back as a sharpening B-factor of about −60 Å²
    assert -75 < general["rlnBfactorUsedForSharpening"] < -45
    assert 3.8 < general["rlnFinalResolution"] < 5.0
    assert general["rlnCorrelationFitGuinierPlot"] > 0.6
    for name in ("postprocess_masked.mrc", "postprocess_fsc.png", "postprocess_guinier.png"):
        assert (ours / name).exists(), name


@pytest.mark.skipif(not HAS_RELION, reason="RELION not installed")
def test_postprocess_agrees_with_relion_postprocess(halves, ours, tmp_path):
    src, h1, _, _ = halves
    rel = tmp_path / "relion"
    rel.mkdir()
    subprocess.run(["relion_postprocess", "--i", str(src / "half1.mrc"), "--i2",
                    str(src / "half2.mrc"), "--mask", str(src / "mask.mrc"), "--auto_bfac",
                    "--autob_lowres", "10", "--o", str(rel / "postprocess")],
                   capture_output=True, check=False)  # exit code ≠ 0 without ghostscript
    theirs = starfile.read(rel / "postprocess.star", always_dict=True)
    mine = starfile.read(ours / "postprocess.star", always_dict=True)
    assert set(mine) == {"general", "fsc", "guinier"}
    for block in ("fsc", "guinier"):
        assert list(mine[block].columns) == list(theirs[block].columns), block
    assert set(mine["general"]) == set(theirs["general"])
    g_ours, g_theirs = mine["general"], theirs["general"]
    n = h1.shape[0]
    shell = lambda res: n * PIXEL / res  # noqa: E731
    assert abs(shell(g_ours["rlnFinalResolution"])
               - shell(g_theirs["rlnFinalResolution"])) <= 1.0
    b_ours, b_theirs = g_ours["rlnBfactorUsedForSharpening"], g_theirs[
        "rlnBfactorUsedForSharpening"]
    assert b_ours == pytest.approx(b_theirs, rel=0.10)
    np.testing.assert_allclose(mine["guinier"]["rlnLogAmplitudesOriginal"],
                               theirs["guinier"]["rlnLogAmplitudesOriginal"], atol=1e-4)
    a = mrcfile.read(ours / "postprocess.mrc")
    b = mrcfile.read(rel / "postprocess.mrc")
    fsc = fsc_curve(a, b)
    up_to = int(shell(g_theirs["rlnFinalResolution"]))
    assert fsc[: up_to + 1].min() >= 0.99


def test_local_resolution_is_worse_where_a_half_region_is_noisier(halves, tmp_path):
    src, h1, h2, mask = halves
    rng = np.random.default_rng(1)
    n = h1.shape[0]
    extra = np.zeros_like(h1)
    extra[:, :, n // 2:] = 3.0 * h1.std()  # x ≥ n/2: three times more noise
    a = h1 + extra * rng.standard_normal(h1.shape).astype(np.float32)
    b = h2 + extra * rng.standard_normal(h1.shape).astype(np.float32)
    res = local_resolution(a, b, mask, PIXEL, sampling_angstrom=10.0, randomize_at_angstrom=10.0)
    local = res.local_resolution_angstrom
    inside = mask > 0.5
    clean = np.median(local[:, :, : n // 2 - 4][inside[:, :, : n // 2 - 4]])
    noisy = np.median(local[:, :, n // 2 + 4:][inside[:, :, n // 2 + 4:]])
    assert noisy > clean + 1.0  # Å
    assert 3.0 < clean < 7.0
    # CLI: map with the voxel size, histogram, slices
    write_map(src / "noisy1.mrc", a, PIXEL)
    write_map(src / "noisy2.mrc", b, PIXEL)
    r = runner.invoke(app, ["local-resolution", str(src / "noisy1.mrc"), str(src / "noisy2.mrc"),
                            "--mask", str(src / "mask.mrc"), "-o", str(tmp_path / "lr"),
                            "--sampling", "10", "--randomize-at", "10", "-q"])
    assert r.exit_code == 0, r.output
    with mrcfile.open(tmp_path / "lr" / "local_resolution.mrc") as m:
        np.testing.assert_allclose(m.data, local, rtol=1e-5)
        assert float(m.voxel_size.x) == pytest.approx(PIXEL, abs=1e-3)
    assert (tmp_path / "lr" / "local_resolution_histogram.png").exists()


def test_postprocess_refuses_mismatched_inputs_in_one_line(halves, tmp_path, trpv1_map):
    src = halves[0]
    other = tmp_path / "other.mrc"
    write_map(other, trpv1_map.data, 4.88)
    r = runner.invoke(app, ["postprocess", str(src / "half1.mrc"), str(other), "--mask",
                            str(src / "mask.mrc"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2
    assert "voxel size 4.88" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out" / "postprocess.mrc").exists()


@pytest.mark.skipif(not HAS_RELION, reason="RELION not installed")
def test_local_resolution_agrees_with_relion_locres(halves, tmp_path):
    src, h1, h2, mask = halves
    subprocess.run(["relion_postprocess", "--locres", "--i", str(src / "half1.mrc"), "--i2",
                    str(src / "half2.mrc"), "--mask", str(src / "mask.mrc"), "--locres_sampling",
                    "10", "--locres_randomize_at", "10", "--o", str(tmp_path / "relion")],
                   capture_output=True, check=False)  # exit code ≠ 0 without ghostscript
    theirs = mrcfile.read(tmp_path / "relion_locres.mrc")
    ours = local_resolution(h1, h2, mask, PIXEL, sampling_angstrom=10.0,
                            randomize_at_angstrom=10.0).local_resolution_angstrom
    inside = mask > 0.5
    # measured: medians 4.77 vs 4.66 Å (one shell here is about 0.35 Å), correlation 0.79
    assert abs(np.median(ours[inside]) - np.median(theirs[inside])) < 0.35
    assert np.corrcoef(ours[inside], theirs[inside])[0, 1] > 0.6


def test_postprocess_of_independent_noise_says_no_signal(trpv1_map, tmp_path):
    """No NaN resolution, no sharpened map as if fine: "no signal", exit 2, RELION's 999 Å."""
    rng = np.random.default_rng(0)
    for name in ("n1", "n2"):
        write_map(tmp_path / f"{name}.mrc", rng.standard_normal((48,) * 3).astype(np.float32),
                  4.88)
    write_map(tmp_path / "mask.mrc", np.ones((48,) * 3, np.float32), 4.88)
    out = tmp_path / "noise"
    r = runner.invoke(app, ["postprocess", str(tmp_path / "n1.mrc"), str(tmp_path / "n2.mrc"),
                            "--mask", str(tmp_path / "mask.mrc"), "-o", str(out)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no signal" in lines[0]
    assert "nan" not in r.output.lower()
    general = starfile.read(out / "postprocess.star", always_dict=True)["general"]
    assert general["rlnFinalResolution"] == 999.0 and general["rlnBfactorUsedForSharpening"] == 0
    assert not (out / "postprocess.mrc").exists() and not (out / "postprocess_masked.mrc").exists()
    assert "no signal" in (out / "postprocess.log").read_text()
    assert (out / "postprocess_fsc.png").exists()


def test_postprocess_bound_is_shown_as_bound_and_quiet_means_errors_only(trpv1_map, tmp_path):
    """Identical maps: the FSC never falls, "≤ 9.76 Å"; -q hides the Guinier warning."""
    write_map(tmp_path / "m.mrc", trpv1_map.data, 4.88)
    write_map(tmp_path / "mask.mrc", np.ones((48,) * 3, np.float32), 4.88)
    args = ["postprocess", str(tmp_path / "m.mrc"), str(tmp_path / "m.mrc"), "--mask",
            str(tmp_path / "mask.mrc")]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "resolution ≤ 9.76 Å (FSC 0.143)" in " ".join(r.output.split())
    assert "fewer than two Guinier points" in " ".join(r.output.split())
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "b"), "-q"])
    assert r.exit_code == 0 and r.output.strip() == "", r.output
    assert "fewer than two Guinier points" in (tmp_path / "b" / "postprocess.log").read_text()


def test_fsc_plot_never_marks_a_crossing_beyond_the_box():
    from swiftalign.plots import _crossing

    freq = np.arange(25) / (48 * 4.88)
    noise = np.r_[1.0, 0.1, np.full(23, 0.02)]  # falls below 0.5 before shell 1: 688 Å
    assert _crossing(freq, noise, 0.5) is None and _crossing(freq, noise, 0.143) is None
    real = np.r_[1.0, np.linspace(0.99, 0.0, 24)]
    assert 1 / _crossing(freq, real, 0.5) == pytest.approx(48 * 4.88 / 12.5, rel=0.02)


@pytest.mark.parametrize("bfactor", [50.0, 150.0])
def test_postprocess_finds_the_bfactor_applied_to_a_map(bfactor):
    """A map of flat amplitudes (white noise, 64³ at 1 Å/px) blurred by exp(−B s²/4):

    identical halves (FSC 1, weights 1), fitted as RELION from 10 Å to Nyquist
    (2 Å; --autob_highres 0), gives −B back (a sharpening B-factor)."""
    from swiftalign.postprocess import postprocess_half_maps

    flat = np.random.default_rng(3).standard_normal((64,) * 3)
    blurred = _blur(flat, bfactor, 1.0).astype(np.float32)
    result = postprocess_half_maps(blurred, blurred, np.ones_like(blurred), 1.0)
    assert result.bfactor_angstrom2 == pytest.approx(-bfactor, abs=3.0)
    assert result.fit is not None and result.fit.correlation > 0.99
