"""Exports (cryoSPARC .cs through cryosparc-tools, ChimeraX .bild) and particle selection."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.spatial.transform import Rotation
from tests.conftest import shared_file
from typer.testing import CliRunner

from swiftalign.cli.main import app
from swiftalign.conventions import (
    angular_distance_deg,
    cryosparc_pose_to_euler,
    euler_to_cryosparc_pose,
    euler_to_matrix,
)
from swiftalign.errors import InputError, StarFileError
from swiftalign.io import read_particles, write_stack

runner = CliRunner()
N = 40


@pytest.fixture
def star(tmp_path):
    """A RELION 3.1 STAR of 40 particles: random poses (tilt 0 and 180 included), two optics
    groups with different pixel sizes, CTF with phase shift, half sets, classes, scores."""
    rng = np.random.default_rng(5)
    write_stack(tmp_path / "stacks" / "a.mrcs", np.zeros((N, 8, 8), np.float32), 1.1)
    euler = Rotation.random(N, random_state=rng).as_euler("ZYZ", degrees=True)
    euler[0] = (30.0, 0.0, 0.0)
    euler[1] = (-50.0, 180.0, 20.0)
    groups = rng.integers(1, 3, N)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@stacks/a.mrcs" for i in range(N)],
        "rlnAngleRot": euler[:, 0], "rlnAngleTilt": euler[:, 1], "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": rng.normal(0, 4, N), "rlnOriginYAngst": rng.normal(0, 4, N),
        "rlnDefocusU": rng.uniform(8000, 25000, N), "rlnDefocusV": rng.uniform(8000, 25000, N),
        "rlnDefocusAngle": rng.uniform(-180, 180, N), "rlnPhaseShift": rng.uniform(0, 90, N),
        "rlnOpticsGroup": groups, "rlnRandomSubset": rng.integers(1, 3, N),
        "rlnClassNumber": rng.integers(1, 4, N), "rlnSwiftalignScore": rng.uniform(0, 1, N),
        "rlnMicrographName": [f"mic{i % 3}.mrc" for i in range(N)],
    })
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["g1", "g2"], "rlnOpticsGroup": [1, 2], "rlnVoltage": [300.0, 200.0],
        "rlnSphericalAberration": [2.7, 1.4], "rlnAmplitudeContrast": [0.1, 0.07],
        "rlnImagePixelSize": [1.1, 1.3], "rlnImageSize": [8, 8], "rlnImageDimensionality": [2, 2],
    })
    path = tmp_path / "particles.star"
    starfile.write({"optics": optics, "particles": particles}, path)
    return path


def test_cryosparc_pose_known_answer_and_inverse():
    # rot = 90° alone: A = Rz(90°)ᵀ, so R(v) = Aᵀ = Rz(+90°): v = (0, 0, π/2)
    assert np.allclose(euler_to_cryosparc_pose(np.array([90.0, 0.0, 0.0])), [0, 0, np.pi / 2])
    euler = Rotation.random(200, random_state=1).as_euler("ZYZ", degrees=True)
    back = cryosparc_pose_to_euler(euler_to_cryosparc_pose(euler))
    assert np.allclose(euler_to_matrix(back), euler_to_matrix(euler), atol=1e-12)


def test_cryosparc_round_trip_from_star(star, tmp_path):
    from cryosparc.dataset import Dataset

    out = tmp_path / "out" / "particles.cs"
    out.parent.mkdir()
    r = runner.invoke(app, ["export", str(star), "--to", "cryosparc", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    a, b = read_particles(star), read_particles(out)
    pa, pb = a.particles, b.particles
    pose_cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    err = angular_distance_deg(euler_to_matrix(pa[pose_cols].to_numpy()),
                               euler_to_matrix(pb[pose_cols].to_numpy()))
    assert np.radians(err).max() < 1e-4
    for col in ("rlnOriginXAngst", "rlnOriginYAngst"):
        assert np.allclose(pb[col], pa[col], atol=1e-5)
    for col in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift"):
        assert np.allclose(pb[col], pa[col], rtol=1e-6, atol=1e-4), col
    for col in ("rlnRandomSubset", "rlnClassNumber"):
        assert (pb[col].to_numpy() == pa[col].to_numpy()).all()
    assert (pb["rlnMicrographName"] == pa["rlnMicrographName"]).all()
    assert np.allclose(b.pixel_size_angstrom, a.pixel_size_angstrom)
    assert np.allclose(b.voltage_kv, a.voltage_kv) and np.allclose(b.cs_mm, a.cs_mm)
    assert np.allclose(b.amplitude_contrast, a.amplitude_contrast)
    # the image names resolve to the same stack (paths relative to the .cs folder)
    assert pb["rlnImageName"][3] == "4@../stacks/a.mrcs"
    assert (b.optics["rlnImageSize"] == 8).all()

    # cryosparc-tools reads back the fields as written
    ds = Dataset.load(out)
    assert len(ds) == N and len(set(ds["uid"].tolist())) == N
    r_cs = Rotation.from_rotvec(ds["alignments3D/pose"].astype(np.float64)).as_matrix()
    a_mats = euler_to_matrix(pa[pose_cols].to_numpy())
    assert angular_distance_deg(r_cs, a_mats.transpose(0, 2, 1)).max() < np.degrees(1e-4)
    psize = a.pixel_size_angstrom
    assert np.allclose(ds["alignments3D/shift"][:, 0], pa["rlnOriginXAngst"] / psize, atol=1e-5)
    assert np.allclose(ds["alignments3D/psize_A"], psize)
    assert np.allclose(ds["ctf/df_angle_rad"], np.radians(pa["rlnDefocusAngle"]), atol=1e-6)
    assert (ds["alignments3D/split"] == pa["rlnRandomSubset"] - 1).all()
    assert (ds["blob/idx"] == np.arange(N)).all() and (ds["blob/shape"] == 8).all()
    # exporting again gives the same uids; --absolute-paths names the same stack
    again = tmp_path / "again.cs"
    runner.invoke(app, ["export", str(star), "--to", "cryosparc", "-o", str(again), "-q",
                        "--absolute-paths"])
    ds2 = Dataset.load(again)
    assert (ds2["uid"] == ds["uid"]).all()
    assert ds2["blob/path"][0] == str((tmp_path / "stacks" / "a.mrcs").resolve())


def test_cryosparc_round_trip_of_a_real_cryosparc_file(tmp_path):
    """cryoSPARC's own poses (2019 particles) → our table → .cs: the same rotations and shifts."""
    from swiftalign.export import write_cryosparc

    src = shared_file("cryodrgn/cryosparc_P12_J24_001_particles.cs")
    raw = np.load(src)
    write_cryosparc(tmp_path / "p.cs", read_particles(src))
    out = np.load(tmp_path / "p.cs")
    rot = lambda v: Rotation.from_rotvec(v.astype(np.float64)).as_matrix()  # noqa: E731
    assert angular_distance_deg(rot(raw["alignments3D/pose"]),
                                rot(out["alignments3D/pose"])).max() < np.degrees(1e-4)
    assert np.allclose(out["alignments3D/shift"], raw["alignments3D/shift"], atol=1e-5)
    for f in ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "blob/psize_A",
              "alignments3D/split", "alignments3D/class", "blob/idx"):
        assert np.allclose(out[f], raw[f], rtol=1e-6), f


def test_cryosparc_export_equals_cryosparc_own_import(tmp_path):
    """EMPIAR-10076 (7 particles): the same particles as cryoSPARC imported them from RELION."""
    from swiftalign.export import write_cryosparc

    ref = np.load(shared_file("cryodrgn/empiar_10076_7.cs"))
    write_cryosparc(tmp_path / "e.cs", read_particles(shared_file("cryodrgn/empiar_10076_7.star")),
                    sign=-1)  # these particles show dark protein; cryoSPARC says -1
    ours = np.load(tmp_path / "e.cs")
    for f in ("blob/idx", "blob/shape", "blob/psize_A", "blob/sign", "ctf/accel_kv", "ctf/cs_mm",
              "ctf/amp_contrast", "ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad",
              "ctf/phase_shift_rad", "ctf/scale", "ctf/bfactor"):
        assert ours[f].dtype == ref[f].dtype, f
        assert np.array_equal(ours[f], ref[f]), f
    assert "alignments3D/pose" not in ours.dtype.names  # no poses in the STAR: none exported


def test_cryosparc_export_refuses_missing_ctf(star, tmp_path):
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnDefocusU"])
    bad = tmp_path / "bad.star"
    starfile.write(blocks, bad)
    r = runner.invoke(app, ["export", str(bad), "--to", "cryosparc", "-o", str(tmp_path / "x.cs")])
    assert r.exit_code == 2
    assert "rlnDefocusU" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.cs").exists()


def test_bild_cylinders_follow_counts(tmp_path):
    from swiftalign.export import angular_distribution_bild

    euler = np.array([[30.0, 60.0, 10.0]] * 100 + [[0.0, 0.0, 77.0]] * 50)
    text = angular_distribution_bild(euler, radius_angstrom=100.0, bin_deg=7.5)
    colours = [line.split()[1:] for line in text.splitlines() if line.startswith(".color")]
    cyl = np.array([line.split()[1:] for line in text.splitlines() if line.startswith(".cylinder")],
                   dtype=float)
    assert len(cyl) == 2 and len(colours) == 2
    centre = np.array([100.0, 100.0, 100.0])
    lengths = np.linalg.norm(cyl[:, 3:6] - cyl[:, 0:3], axis=1)
    order = np.argsort(-lengths)
    assert np.allclose(lengths[order], [30.0, 15.0], atol=1e-2)  # 0.3 R · count / max
    # the longest starts on the sphere of radius R in the (rot 30°, tilt 60°) direction (±½ bin)
    v = np.array([np.cos(np.radians(30)) * np.sin(np.radians(60)),
                  np.sin(np.radians(30)) * np.sin(np.radians(60)), np.cos(np.radians(60))])
    start = cyl[order[0], :3] - centre
    assert np.linalg.norm(start) == pytest.approx(100.0, abs=1e-2)
    assert np.degrees(np.arccos(np.clip(start @ v / 100.0, -1, 1))) < 7.5 / 2
    assert cyl[0, 6] == pytest.approx(0.5 * np.pi * 100.0 * 7.5 / 360.0, abs=1e-3)
    # colour = clip(z, -1, 5)/6 + 1/6 over all round(4π/bin²) = 733 bins (RELION's z-score)
    pdf = np.zeros(733)
    pdf[:2] = [100 / 150, 50 / 150]
    z = (pdf[:2] - pdf.mean()) / pdf.std()
    red = np.array([float(c[0]) for c in colours])
    assert np.allclose(red[order], np.clip(z, -1, 5) / 6 + 1 / 6, atol=1e-4)
    assert np.allclose([float(c[2]) for c in colours], 1 - red, atol=1e-4)


def test_bild_from_cli(star, tmp_path):
    out = tmp_path / "angdist.bild"
    r = runner.invoke(app, ["export", str(star), "--to", "bild", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    lines = out.read_text().splitlines()
    n_cyl = sum(line.startswith(".cylinder") for line in lines)
    assert 0 < n_cyl <= N and len(lines) == 2 * n_cyl
    # R = box · pixel / 2 (first particle) Å around the map centre (R, R, R)
    radius = 8 * read_particles(star).pixel_size_angstrom[0] / 2
    first = np.array(next(line for line in lines if line.startswith(".cylinder")).split()[1:4],
                     dtype=float)
    assert np.linalg.norm(first - radius) == pytest.approx(radius, abs=2e-3)


def test_select_range_top_fraction_class(star, tmp_path):
    from swiftalign.selection import select_particles

    table = read_particles(star)
    score = table.particles["rlnSwiftalignScore"].to_numpy()
    cls = table.particles["rlnClassNumber"].to_numpy()
    keep = select_particles(table, min_value=0.25, max_value=0.75)
    assert (keep == ((score >= 0.25) & (score <= 0.75))).all()
    keep = select_particles(table, top_fraction=0.25)
    assert keep.sum() == 10 and score[keep].min() >= score[~keep].max()
    keep = select_particles(table, class_number=2, top_fraction=0.5)
    in_class = np.nonzero(cls == 2)[0]
    assert keep.sum() == int(np.ceil(0.5 * len(in_class))) and (cls[keep] == 2).all()
    assert score[keep].min() >= score[in_class][~keep[in_class]].max()
    keep = select_particles(table, column="rlnDefocusU", max_value=15000)
    assert (keep == (table.particles["rlnDefocusU"].to_numpy() <= 15000)).all()
    with pytest.raises(InputError, match="give a selection"):
        select_particles(table)
    with pytest.raises(StarFileError, match="rlnNoSuchColumn"):
        select_particles(table, column="rlnNoSuchColumn", min_value=0)


def test_select_cli_writes_star_with_optics(star, tmp_path):
    out = tmp_path / "sub" / "subset.star"
    out.parent.mkdir()
    r = runner.invoke(app, ["select", str(star), "-o", str(out), "--min-score", "0.5", "-q"])
    assert r.exit_code == 0, r.output
    blocks = starfile.read(out, always_dict=True)
    src = starfile.read(star, always_dict=True)
    assert blocks["optics"].equals(src["optics"])
    expected = src["particles"][src["particles"]["rlnSwiftalignScore"] >= 0.5]
    assert len(blocks["particles"]) == len(expected)
    assert np.allclose(blocks["particles"]["rlnAngleRot"], expected["rlnAngleRot"])
    # image names reach the stack from the project folder (the working directory), as
    # RELION writes them, wherever the new STAR file goes
    name = blocks["particles"]["rlnImageName"].iloc[0].split("@", 1)[1]
    assert os.path.samefile(name, tmp_path / "stacks" / "a.mrcs")
    # nothing passes: an error, no file
    empty = tmp_path / "empty.star"
    r = runner.invoke(app, ["select", str(star), "-o", str(empty), "--min-score", "2"])
    assert r.exit_code == 2 and "no particle passes" in r.output and not empty.exists()
