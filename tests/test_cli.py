"""The command line end to end, and bad input: clear errors before work, no output written."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from typer.testing import CliRunner

from swiftalign.cli.main import app

MAP = Path(str(files("swiftalign") / "data" / "trpv1_volume.mrc"))
runner = CliRunner()


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    r = runner.invoke(app, ["simulate", str(MAP), "-o", str(out), "-n", "120", "--symmetry",
                            "C4", "--snr-db", "0", "--seed", "3", "-q"])
    assert r.exit_code == 0, r.output
    return out


def _align(star, out, *extra, reference=MAP):
    return runner.invoke(app, ["align", str(star), "--reference", str(reference),
                               "--resolution", "25", "-o", str(out), "--symmetry", "C4", "-q",
                               *extra])


def test_simulate_align_evaluate(sim, tmp_path):
    out = tmp_path / "aligned.star"
    r = _align(sim / "particles.star", out, "--index", "Flat")
    assert r.exit_code == 0, r.output
    blocks = starfile.read(out, always_dict=True)
    p = blocks["particles"]
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                "rlnOriginYAngst", "rlnSwiftalignScore", "rlnDefocusU", "rlnRandomSubset"):
        assert col in p
    assert len(p) == 120
    run = json.loads((tmp_path / "aligned_run.json").read_text())
    assert run["parameters"]["resolution_angstrom"] == 25.0
    r = runner.invoke(app, ["evaluate", str(out), "--truth", str(sim / "particles.star"),
                            "--symmetry", "C4", "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "e.json").read_text())["summary"]
    assert summary["angular_error_deg"]["median"] < 6.13  # ΔΦ at 25 Å, 48 px, 4.88 Å/px
    assert summary["shift_error_px"]["median"] < 1.0


def test_topk_output(sim, tmp_path):
    out = tmp_path / "a.star"
    r = _align(sim / "particles.star", out, "--index", "Flat", "-k", "3", "--local-rounds", "0")
    assert r.exit_code == 0, r.output
    top = starfile.read(tmp_path / "a_top3.star", always_dict=True)["particles"]
    assert len(top) == 360
    scores = top["rlnSwiftalignScore"].to_numpy().reshape(120, 3)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def _copy_dataset(sim, tmp_path):
    blocks = starfile.read(sim / "particles.star", always_dict=True)
    # the copies name their stack from their own folder
    idx = blocks["particles"]["rlnImageName"].str.split("@").str[0]
    blocks["particles"]["rlnImageName"] = idx + "@particles.mrcs"
    data = mrcfile.read(sim / "particles.mrcs").copy()
    return blocks, data


def _expect_error(r, out, *fragments):
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    for f in fragments:
        assert f in text, text
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


def test_missing_stack(sim, tmp_path):
    blocks, _ = _copy_dataset(sim, tmp_path)
    starfile.write(blocks, tmp_path / "p.star")
    out = tmp_path / "o.star"
    _expect_error(_align(tmp_path / "p.star", out), out, "particles.mrcs", "does not exist")


def test_index_beyond_stack(sim, tmp_path):
    blocks, data = _copy_dataset(sim, tmp_path)
    mrcfile.write(tmp_path / "particles.mrcs", data[:20], voxel_size=4.88)
    blocks["particles"] = blocks["particles"].iloc[:21].copy()
    blocks["particles"].loc[20, "rlnImageName"] = "000050@particles.mrcs"
    starfile.write(blocks, tmp_path / "p.star")
    out = tmp_path / "o.star"
    _expect_error(_align(tmp_path / "p.star", out), out, "000050@particles.mrcs", "holds 20")


def test_unknown_pixel_size(sim, tmp_path):
    blocks, data = _copy_dataset(sim, tmp_path)
    mrcfile.write(tmp_path / "particles.mrcs", data)
    starfile.write({"particles": blocks["particles"].drop(columns=["rlnOpticsGroup"])},
                   tmp_path / "p.star")
    out = tmp_path / "o.star"
    _expect_error(_align(tmp_path / "p.star", out), out, "p.star", "pixel size", "--angpix")


def test_box_mismatch(sim, tmp_path):
    vol = mrcfile.read(MAP)[4:-4, 4:-4, 4:-4].copy()
    mrcfile.write(tmp_path / "small.mrc", vol, voxel_size=4.88)
    out = tmp_path / "o.star"
    _expect_error(_align(sim / "particles.star", out, reference=tmp_path / "small.mrc"), out,
                  "small.mrc", "box 40", "48")


def test_non_finite_pixels(sim, tmp_path):
    blocks, data = _copy_dataset(sim, tmp_path)
    data[7, 3, 3] = np.nan
    data[9, 0, 0] = np.inf
    mrcfile.write(tmp_path / "particles.mrcs", data, voxel_size=4.88)
    starfile.write(blocks, tmp_path / "p.star")
    out = tmp_path / "o.star"
    # 2 of 120 unusable (> 1 %): stop before any work, naming them
    _expect_error(_align(tmp_path / "p.star", out), out, "2 of 120", "image 8",
                  "non-finite")


def test_bad_index_string(sim, tmp_path):
    out = tmp_path / "o.star"
    _expect_error(_align(sim / "particles.star", out, "--index", "IVF64,PQ7x3y"), out,
                  "IVF64,PQ7x3y")


def test_help_lists_units():
    r = runner.invoke(app, ["align", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for unit in ("(Å)", "(px)", "(°)"):
        assert unit in text


def test_resolution_finer_than_nyquist(sim, tmp_path):
    out = tmp_path / "o.star"
    r = runner.invoke(app, ["align", str(sim / "particles.star"), "--reference", str(MAP),
                            "--resolution", "5", "-o", str(out), "-q"])
    _expect_error(r, out, "finer than Nyquist", "9.760")
    assert not (tmp_path / "o.log").exists()


def test_output_must_not_overwrite_input(sim):
    star = sim / "particles.star"
    before = star.read_bytes()
    r = _align(star, star)
    assert r.exit_code == 2 and "input STAR" in " ".join(r.output.split())
    assert star.read_bytes() == before


def test_constant_reference_refused(sim, tmp_path):
    mrcfile.write(tmp_path / "zero.mrc", np.zeros((48, 48, 48), np.float32), voxel_size=4.88)
    out = tmp_path / "o.star"
    _expect_error(_align(sim / "particles.star", out, reference=tmp_path / "zero.mrc"), out,
                  "zero.mrc", "constant")


def test_continue_needs_a_previous_run(sim, tmp_path):
    r = runner.invoke(app, ["refine", str(sim / "particles.star"), "-r", str(MAP),
                            "--initial-resolution", "30", "--continue", str(tmp_path / "none")])
    assert r.exit_code == 2 and "state.json" in r.output


def test_evaluate_matches_by_image_even_when_sorted(sim, tmp_path):
    out = tmp_path / "aligned.star"
    assert _align(sim / "particles.star", out, "--index", "Flat", "--local-rounds", "0"
                  ).exit_code == 0
    blocks = starfile.read(out, always_dict=True)
    blocks["particles"] = blocks["particles"].sort_values("rlnSwiftalignScore")
    starfile.write(blocks, tmp_path / "sorted.star")
    res = []
    for f in (out, tmp_path / "sorted.star"):
        r = runner.invoke(app, ["evaluate", str(f), "--truth", str(sim / "particles.star"),
                                "--symmetry", "C4", "--json", str(tmp_path / "e.json"), "-q"])
        assert r.exit_code == 0, r.output
        res.append(json.loads((tmp_path / "e.json").read_text())["summary"])
    assert res[0]["angular_error_deg"]["median"] == pytest.approx(
        res[1]["angular_error_deg"]["median"])
