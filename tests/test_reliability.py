"""The inputs people really have: right value or a clear error, never a crash mid-run.

Numbered as in the reliability issue.
"""

from __future__ import annotations

import os
import warnings
from importlib.resources import files
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import shared_file

from swiftalign.errors import InputError, MrcFileError, StarFileError
from swiftalign.io import ParticleImages, read_map, read_particles, write_particles
from swiftalign.io.mrc import open_stack
from swiftalign.io.particles import clip_hot_pixels, open_usable_particles

MAP_PATH = Path(str(files("swiftalign") / "data" / "trpv1_volume.mrc"))

OPTICS_31 = """
data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnImageSize #7
_rlnImageDimensionality #8
1 og1 1.0 300 2.7 0.1 16 2
2 og2 1.3 200 2.0 0.07 16 2
"""
PARTICLES_31 = """
data_particles

loop_
_rlnImageName #1
_rlnOpticsGroup #2
_rlnDefocusU #3
_rlnOriginXAngst #4
_rlnOriginYAngst #5
1@s.mrcs 1 10000 1.0 2.0
2@s.mrcs 2 12000 -1.3 2.6
3@s.mrcs 1 11000 0.0 0.0
"""
PARTICLES_30 = """
data_

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnVoltage #3
_rlnSphericalAberration #4
_rlnAmplitudeContrast #5
_rlnMagnification #6
_rlnDetectorPixelSize #7
_rlnOriginX #8
_rlnOriginY #9
1@s.mrcs 10000 300 2.7 0.1 10000 1.0 1.0 2.0
2@s.mrcs 12000 200 2.0 0.07 10000 1.3 -1.0 2.0
3@s.mrcs 11000 300 2.7 0.1 10000 1.0 0.0 0.0
"""


def _fields(t):
    return np.stack([t.pixel_size_angstrom, t.voltage_kv, t.cs_mm, t.amplitude_contrast], 1)


# 1 ------------------------------------------------------------------------------------------
def test_01_crlf_only_on_optics_line_and_mixed_whitespace(tmp_path):
    lf = tmp_path / "lf.star"
    lf.write_text(OPTICS_31 + PARTICLES_31)
    mixed = tmp_path / "mixed.star"
    mixed.write_bytes((OPTICS_31 + PARTICLES_31).replace("data_optics\n", "data_optics\r\n")
                      .replace("1 og1 1.0", "1\tog1   1.0").encode())
    a, b = read_particles(lf), read_particles(mixed)
    np.testing.assert_allclose(_fields(a), _fields(b))
    pd.testing.assert_frame_equal(a.particles, b.particles)


# 2 ------------------------------------------------------------------------------------------
def test_02_layout_variants_and_block_round_trip(tmp_path):
    text = (
        "data_general\n\n_rlnFinalResolution 7.5\n_rlnComment swift\n\n"
        "data_particles\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnImagePixelSize\n"
        "1@s.mrcs 10000 1.5\n\n"
        "data_empty\n\nloop_\n_rlnFoo #1\n\n"
    )
    p = tmp_path / "v.star"
    p.write_text(text)
    t = read_particles(p)
    assert len(t) == 1 and t.pixel_size_angstrom[0] == 1.5
    assert "general" in t.other_blocks
    write_particles(tmp_path / "w.star", t, box_size=16)
    t2 = read_particles(tmp_path / "w.star")
    pd.testing.assert_frame_equal(t.particles.drop(columns=[], errors="ignore"),
                                  t2.particles[t.particles.columns])
    g1, g2 = t.other_blocks["general"], t2.other_blocks["general"]
    assert dict(g1) == dict(g2)
    # blocks in any order (particles before optics)
    t3 = read_particles(shared_file("cryodrgn/relion31.v2.star"))
    t4 = read_particles(shared_file("cryodrgn/relion31.star"))
    np.testing.assert_allclose(_fields(t3), _fields(t4))


# 3 is in test_star.py (no particles, HTML page) ----------------------------------------------


# 4 ------------------------------------------------------------------------------------------
def test_04_relion30_31_and_optics_last_identical(tmp_path):
    p31 = tmp_path / "a.star"
    p31.write_text(OPTICS_31 + PARTICLES_31)
    last = tmp_path / "b.star"
    last.write_text(PARTICLES_31 + OPTICS_31)
    p30 = tmp_path / "c.star"
    p30.write_text(PARTICLES_30)
    a, b, c = (read_particles(x) for x in (p31, last, p30))
    np.testing.assert_allclose(_fields(a), [[1.0, 300, 2.7, 0.1], [1.3, 200, 2.0, 0.07],
                                            [1.0, 300, 2.7, 0.1]])
    np.testing.assert_allclose(_fields(b), _fields(a))
    np.testing.assert_allclose(_fields(c), _fields(a))
    # shifts: 3.1 Å origins and 3.0 pixel origins agree
    np.testing.assert_allclose(a.origins_shift_px(), c.origins_shift_px())


def test_04_per_particle_value_contradicting_group_warns(tmp_path):
    text = OPTICS_31 + PARTICLES_31.replace("_rlnOriginYAngst #5\n",
                                            "_rlnOriginYAngst #5\n_rlnVoltage #6\n")
    text = text.replace("1.0 2.0\n", "1.0 2.0 300\n").replace("2.6\n", "2.6 300\n")
    text = text.replace("0.0 0.0\n", "0.0 0.0 300\n")
    p = tmp_path / "x.star"
    p.write_text(text)
    with pytest.warns(UserWarning, match="optics group wins"):
        t = read_particles(p)
    assert t.voltage_kv[1] == 200.0


def test_04_no_pixel_size_anywhere(tmp_path):
    p = tmp_path / "n.star"
    p.write_text("data_particles\nloop_\n_rlnImageName #1\n1@s.mrcs\n")
    with pytest.raises(StarFileError, match="--angpix"):
        read_particles(p)


# 5 ------------------------------------------------------------------------------------------
def test_05_pixel_and_angstrom_origins_conflict_angstrom_wins(tmp_path):
    text = OPTICS_31 + PARTICLES_31.replace("_rlnOriginYAngst #5\n",
                                            "_rlnOriginYAngst #5\n_rlnOriginX #6\n_rlnOriginY #7\n")
    text = text.replace("1.0 2.0\n", "1.0 2.0 9 9\n").replace("2.6\n", "2.6 9 9\n")
    text = text.replace("0.0 0.0\n", "0.0 0.0 9 9\n")
    p = tmp_path / "o.star"
    p.write_text(text)
    t = read_particles(p)
    with pytest.warns(UserWarning, match="using rlnOriginX/YAngst"):
        shifts = t.origins_shift_px()
    np.testing.assert_allclose(shifts[0], [-2.0, -1.0])  # (y, x) = −origin / pixel size
    write_particles(tmp_path / "out.star", t, box_size=16,
                    updates={"rlnOriginXAngst": np.zeros(3), "rlnOriginYAngst": np.zeros(3)})
    out = starfile.read(tmp_path / "out.star", always_dict=True)["particles"]
    assert "rlnOriginX" not in out and "rlnOriginXAngst" in out


# 6 ------------------------------------------------------------------------------------------
CS_DIR = "cryodrgn"


def _relion_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix written out (src/euler.cpp), degrees → `(n, 3, 3)`."""
    a, b, g = (np.radians(np.asarray(x, np.float64)) for x in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.stack([np.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
                     np.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
                     np.stack([sc, ss, cb], -1)], -2)


def _rodrigues_transposed(v):
    """``(I + sinθ K + (1 − cosθ) K²)ᵀ`` for axis-angle vectors `(n, 3)` (pyem/cryoDRGN)."""
    theta = np.linalg.norm(v, axis=1)[:, None, None]
    w = v / np.maximum(theta[:, :, 0], 1e-12)
    k = np.zeros((len(v), 3, 3))
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
    k = k - k.transpose(0, 2, 1)
    r = np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k
    return r.transpose(0, 2, 1)


def write_cs_from_star(star, cs_path, *, prefix=">", drop=(), shift_psize=None):
    """A cryoSPARC-style .cs (the cryoSPARC units) with the particles of a RELION STAR."""
    from scipy.spatial.transform import Rotation

    from swiftalign.io.star import parse_image_name

    t = read_particles(star)
    df = t.particles
    idx, paths = zip(*(parse_image_name(n, t.path.parent) for n in t.image_names()), strict=True)
    rel = [os.path.relpath(p, cs_path.parent) for p in paths]
    ps = t.pixel_size_angstrom
    al_ps = ps if shift_psize is None else np.full(len(t), shift_psize)
    fields = {
        "uid": ("<u8", np.arange(len(t))),
        "blob/path": ("S200", [(prefix + r).encode() for r in rel]),
        "blob/idx": ("<u4", idx),
        "blob/shape": (("<u4", (2,)), np.full((len(t), 2), 48)),
        "blob/psize_A": ("<f4", ps),
        "ctf/accel_kv": ("<f4", t.voltage_kv),
        "ctf/cs_mm": ("<f4", t.cs_mm),
        "ctf/amp_contrast": ("<f4", t.amplitude_contrast),
        "ctf/df1_A": ("<f4", df["rlnDefocusU"]),
        "ctf/df2_A": ("<f4", df["rlnDefocusV"]),
        "ctf/df_angle_rad": ("<f4", np.radians(df["rlnDefocusAngle"])),
        "ctf/phase_shift_rad": ("<f4", np.radians(df["rlnPhaseShift"])),
        "ctf/exp_group_id": ("<u4", np.zeros(len(t))),
    }
    if "rlnAngleRot" in df:
        euler = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
        fields["alignments3D/pose"] = (("<f4", (3,)),
                                       Rotation.from_euler("ZYZ", euler, degrees=True).as_rotvec())
        origin = df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
        fields["alignments3D/shift"] = (("<f4", (2,)), origin / al_ps[:, None])
        fields["alignments3D/psize_A"] = ("<f4", al_ps)
        fields["alignments3D/split"] = ("<u4", df["rlnRandomSubset"] - 1)
    fields = {k: v for k, v in fields.items() if k not in drop}
    arr = np.zeros(len(t), dtype=[(k, v[0]) for k, v in fields.items()])
    for k, (_, v) in fields.items():
        arr[k] = np.asarray(v)
    with open(cs_path, "wb") as f:  # np.save would append .npy to a .cs name given as str
        np.save(f, arr)
    return cs_path


def test_06_cs_pair_gives_the_star_values():
    cs = read_particles(shared_file(f"{CS_DIR}/empiar_10076_7.cs"))
    star = read_particles(shared_file(f"{CS_DIR}/empiar_10076_7.star"))
    a, b = cs.particles, star.particles
    assert len(cs) == len(star) == 7
    assert cs.image_names() == [f"{i}@empiar_10076_7.mrc" for i in range(1, 8)]
    for col in ("rlnDefocusU", "rlnDefocusV"):
        np.testing.assert_allclose(a[col], b[col], atol=0.01)  # Å (float32 in the .cs)
    np.testing.assert_allclose(a["rlnDefocusAngle"], b["rlnDefocusAngle"], atol=1e-4)  # °
    np.testing.assert_allclose(a["rlnPhaseShift"], 0.0)
    np.testing.assert_allclose(_fields(cs), _fields(star), rtol=1e-6)
    assert cs.pixel_size_angstrom[0] == pytest.approx(1.31, abs=1e-5)
    assert "rlnAngleRot" not in a  # the pair has no poses: fine for align
    with ParticleImages(cs) as ic, ParticleImages(star) as is_:
        np.testing.assert_array_equal(ic.read(np.arange(7)), is_.read(np.arange(7)))


def test_06_cs_poses_shifts_and_halves_follow_cryosparc_conventions(tmp_path):
    from swiftalign.conventions import euler_to_matrix

    path = shared_file(f"{CS_DIR}/cryosparc_P12_J24_001_particles.cs")
    raw = np.load(path)
    t = read_particles(path)
    df = t.particles
    assert len(t) == 2019
    euler = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    ours = euler_to_matrix(euler)
    np.testing.assert_allclose(ours, _relion_matrix(*euler.T), atol=1e-9)
    np.testing.assert_allclose(ours, _rodrigues_transposed(raw["alignments3D/pose"].astype(float)),
                               atol=1e-4)
    np.testing.assert_allclose(df["rlnOriginXAngst"], raw["alignments3D/shift"][:, 0] * 2.95,
                               rtol=1e-6)
    np.testing.assert_allclose(df["rlnOriginYAngst"], raw["alignments3D/shift"][:, 1] * 2.95,
                               rtol=1e-6)
    np.testing.assert_array_equal(df["rlnRandomSubset"], raw["alignments3D/split"] + 1)
    assert set(df["rlnRandomSubset"]) == {1, 2}
    np.testing.assert_allclose(df["rlnDefocusAngle"][0], np.degrees(-1.3636448383331299),
                               atol=1e-4)
    np.testing.assert_allclose(_fields(t)[0], [2.95, 200.0, 2.0, 0.07], rtol=1e-6)
    # internal shift (y, x) px = −origin / pixel size
    np.testing.assert_allclose(t.origins_shift_px()[0], -raw["alignments3D/shift"][0, ::-1],
                               rtol=1e-5)
    # known answer: a rotation of 30° about z is rot + psi = 30°, tilt 0
    one = raw[:1].copy()
    one["alignments3D/pose"] = [0.0, 0.0, np.radians(30.0)]
    with open(tmp_path / "z.cs", "wb") as f:
        np.save(f, one)
    e = read_particles(tmp_path / "z.cs").particles.iloc[0]
    assert e["rlnAngleTilt"] == pytest.approx(0.0, abs=1e-6)
    assert (e["rlnAngleRot"] + e["rlnAnglePsi"]) % 360 == pytest.approx(30.0, abs=1e-4)


def test_06_cs_3d_classification_takes_the_most_probable_class(tmp_path):
    raw = np.load(shared_file(f"{CS_DIR}/cryosparc_P12_J24_001_particles.cs"))[:50]
    keep = [n for n in raw.dtype.names if not n.startswith("alignments3D/")]
    dtype = [(n, raw.dtype[n]) for n in keep]
    for k in (0, 1):
        dtype += [(f"alignments_class_{k}/{f}", raw.dtype[f"alignments3D/{f}"])
                  for f in ("pose", "shift", "psize_A", "split", "class_posterior")]
    arr = np.zeros(len(raw), dtype=dtype)
    for n in keep:
        arr[n] = raw[n]
    post = np.random.default_rng(0).uniform(size=len(raw))
    for k, p in ((0, post), (1, 1 - post)):
        for f in ("pose", "shift", "psize_A", "split"):
            arr[f"alignments_class_{k}/{f}"] = raw[f"alignments3D/{f}"] * (1 if k == 0 else 0.5)
        arr[f"alignments_class_{k}/class_posterior"] = p
    with open(tmp_path / "classes.cs", "wb") as f:
        np.save(f, arr)
    t = read_particles(tmp_path / "classes.cs").particles
    np.testing.assert_array_equal(t["rlnClassNumber"], np.where(post >= 0.5, 1, 2))
    first = np.where(post >= 0.5, 1.0, 0.5)
    np.testing.assert_allclose(t["rlnOriginXAngst"],
                               raw["alignments3D/shift"][:, 0] * first * 2.95 * first, rtol=1e-5)


def test_06_cs_exported_variant_loads_and_writes_star(tmp_path):
    t = read_particles(shared_file(f"{CS_DIR}/cryosparc_J2_particles_exported.cs"))
    assert len(t) == 22
    names = t.image_names()
    assert names[0] == "1@J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs"  # '>' gone
    assert "rlnAngleRot" not in t.particles  # alignments2D only: no 3D poses
    assert t.pixel_size_angstrom[0] == pytest.approx(1.345, abs=1e-5)
    write_particles(tmp_path / "out.star", t, box_size=300)
    back = read_particles(tmp_path / "out.star")
    np.testing.assert_allclose(_fields(back), _fields(t), rtol=1e-6)
    np.testing.assert_allclose(back.column("rlnDefocusAngle"), t.column("rlnDefocusAngle"))
    blocks = starfile.read(tmp_path / "out.star", always_dict=True)
    assert blocks["optics"]["rlnImageSize"][0] == 300
    # image names written as RELION writes them: relative to the project folder (cwd); this
    # stack is not in the test data, so its name is left as it was
    assert back.image_names()[0] == names[0]


def test_06_cs_malformed_files_name_file_and_field(tmp_path):
    plain = tmp_path / "plain.cs"
    with open(plain, "wb") as f:
        np.save(f, np.zeros((3, 4)))
    with pytest.raises(StarFileError, match=r"plain\.cs: not a cryoSPARC .cs file.*named fields"):
        read_particles(plain)
    raw = np.load(shared_file(f"{CS_DIR}/empiar_10076_7.cs"))
    for field in ("blob/path", "ctf/df1_A", "ctf/accel_kv"):
        keep = [n for n in raw.dtype.names if n != field]
        bad = tmp_path / f"no_{field.replace('/', '_')}.cs"
        with open(bad, "wb") as f:
            np.save(f, raw[keep])
        with pytest.raises(StarFileError, match=f"{bad.name}: cryoSPARC field '{field}' is missing"):
            read_particles(bad)
    (tmp_path / "junk.cs").write_bytes(b"data_particles\nloop_\n")
    with pytest.raises(StarFileError, match=r"junk\.cs: not a cryoSPARC .cs file"):
        read_particles(tmp_path / "junk.cs")
    nan = raw.copy()
    nan["ctf/df2_A"][4] = np.nan
    with open(tmp_path / "nan.cs", "wb") as f:
        np.save(f, nan)
    with pytest.raises(StarFileError, match=r"nan\.cs: particle 5 has non-finite 'ctf/df2_A'"):
        read_particles(tmp_path / "nan.cs")
    # images not where the .cs says: the error names the .cs and the stack it looked for
    with open(tmp_path / "moved.cs", "wb") as f:
        np.save(f, raw)
    with pytest.raises(MrcFileError, match=r"moved\.cs: particle 1 .*empiar_10076_7\.mrc does not "
                       r"exist \(cryoSPARC blob/path"):
        ParticleImages(read_particles(tmp_path / "moved.cs"))
    no_psize = tmp_path / "no_psize.cs"
    with open(no_psize, "wb") as f:
        np.save(f, raw[[n for n in raw.dtype.names if n != "blob/psize_A"]])
    with pytest.raises(StarFileError, match="--angpix"):
        read_particles(no_psize)
    assert read_particles(no_psize, angpix=1.31).pixel_size_angstrom[0] == 1.31


def test_06_cs_in_a_job_folder_finds_images_from_the_project_folder(tmp_path):
    raw = np.load(shared_file(f"{CS_DIR}/empiar_10076_7.cs"))
    job = tmp_path / "J7"
    job.mkdir()
    os.symlink(shared_file(f"{CS_DIR}/empiar_10076_7.mrc"), tmp_path / "empiar_10076_7.mrc")
    with open(job / "particles.cs", "wb") as f:
        np.save(f, raw)
    t = read_particles(job / "particles.cs")
    assert t.image_names()[0] == "1@../empiar_10076_7.mrc"
    with ParticleImages(t) as im:
        assert im.read([6]).shape == (1, 320, 320)


@pytest.fixture(scope="module")
def cs_dataset(tmp_path_factory, trpv1_map):
    """60 simulated TRPV1 particles as STAR and as .cs (shifts at a different psize_A)."""
    from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset

    out = tmp_path_factory.mktemp("cs")
    cfg = SimulationConfig(n_particles=60, snr_db=0.0, symmetry="C4", seed=5)
    images, truth = simulate_particles(trpv1_map, cfg)
    star = write_dataset(out / "data", images, truth, pixel_size_angstrom=4.88, config=cfg)
    (out / "J3").mkdir()
    cs = write_cs_from_star(star, out / "J3" / "particles.cs", shift_psize=2 * 4.88)
    return star, cs


def test_06_cs_cli_align_and_evaluate(cs_dataset, tmp_path):
    import json

    from typer.testing import CliRunner

    from swiftalign.cli.main import app

    star, cs = cs_dataset
    runner = CliRunner()
    # the .cs holds the same truth as the STAR: zero error between them
    r = runner.invoke(app, ["evaluate", str(cs), "--truth", str(star), "--symmetry", "C4",
                            "--json", str(tmp_path / "same.json"), "-q"])
    assert r.exit_code == 0, r.output
    same = json.loads((tmp_path / "same.json").read_text())["summary"]
    assert same["angular_error_deg"]["mean"] < 1e-3 and same["shift_error_px"]["mean"] < 1e-4
    out = tmp_path / "aligned.star"
    r = runner.invoke(app, ["align", str(cs), "--reference", str(MAP_PATH), "--resolution", "30",
                            "--symmetry", "C4", "--index", "Flat", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", str(out), "--truth", str(cs), "--symmetry", "C4",
                            "--json", str(tmp_path / "e.json"), "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "e.json").read_text())["summary"]
    assert summary["angular_error_deg"]["median"] < 7.36  # ΔΦ at 30 Å, 48 px, 4.88 Å/px
    assert summary["shift_error_px"]["median"] < 1.0
    bad = tmp_path / "bad.cs"
    bad.write_bytes(b"\x93NUMPY garbage")
    r = runner.invoke(app, ["align", str(bad), "--reference", str(MAP_PATH), "--resolution", "25",
                            "-o", str(tmp_path / "x.star")])
    assert r.exit_code == 2 and "bad.cs: not a cryoSPARC .cs file" in r.output
    assert "Traceback" not in r.output


# 7 ------------------------------------------------------------------------------------------
def test_07_float16_stack_reads_like_float32(tmp_path):
    src = shared_file("mrcfile/float16.mrc")
    with open_stack(src) as m:
        assert m.data.dtype == np.float16
        half = np.array(m.data, dtype=np.float32)
    p = tmp_path / "p.star"
    p.write_text(f"data_particles\nloop_\n_rlnImageName\n_rlnImagePixelSize\n1@{src} 3.5953\n")
    with ParticleImages(read_particles(p)) as im:
        img = im.read([0])[0]
    np.testing.assert_allclose(img, clip_hot_pixels(half[None].copy())[0], rtol=1e-3)


# 8 ------------------------------------------------------------------------------------------
def _write_bytes_map(path, data, *, imod_signed: bool | None):
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data.astype(np.int8))
        m.voxel_size = 2.0
        if imod_signed is not None:
            extra2 = bytearray(m.header.extra2.tobytes())
            extra2[40:44] = np.int32(1146047817).tobytes()
            extra2[44:48] = np.int32(1 if imod_signed else 0).tobytes()
            m.header.extra2 = np.frombuffer(bytes(extra2), dtype=m.header.extra2.dtype)


def test_08_byte_masks_never_negative(tmp_path):
    mask = np.zeros((8, 8, 8), dtype=np.int16)
    mask[2:6, 2:6, 2:6] = -1  # 255 as unsigned, −1 as signed
    _write_bytes_map(tmp_path / "imod.mrc", mask, imod_signed=True)
    _write_bytes_map(tmp_path / "plain.mrc", mask, imod_signed=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("imod.mrc", "plain.mrc"):
            m = read_map(tmp_path / name).data
            assert set(np.unique(m)) == {0.0, 1.0}
            assert m[3, 3, 3] == 1.0 and m[0, 0, 0] == 0.0
    grey = np.arange(512).reshape(8, 8, 8) % 200  # unsigned bytes above 127, unstamped
    _write_bytes_map(tmp_path / "grey.mrc", grey, imod_signed=None)
    g = read_map(tmp_path / "grey.mrc").data
    assert g.min() >= 0 and g.max() == 199
    real = read_map(shared_file("sfftk/test_data_multi0.map")).data
    assert real.min() >= 0


# 9 ------------------------------------------------------------------------------------------
def test_09_axis_order_refused_and_non_cubic_refused(tmp_path):
    with pytest.raises(MrcFileError, match="MAPC/MAPR/MAPS"):
        read_map(shared_file("mrcfile/EMD-3001.map"))
    from swiftalign.alignment import check_inputs
    from swiftalign.io.mrc import MapData

    class _Images:
        box_size = 20
        stack_paths = ["x.mrcs"]

    t = read_particles(shared_file("cryodrgn/relion31.star"))
    with pytest.raises(InputError, match="not cubic"):
        check_inputs(t, _Images(), MapData(np.zeros((20, 20, 18), np.float32), 2.806, "m.mrc"))


def test_09_nstart_is_ignored_and_documented():
    m = read_map(shared_file("mrcfile/EMD-3197.map"))  # nstart (−2, 0, 0)
    assert m.data.shape == (20, 20, 20) and m.voxel_size_angstrom == pytest.approx(11.4)


# 10 -----------------------------------------------------------------------------------------
def _stack(path, n=10, box=16):
    mrcfile.write(path, np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32),
                  voxel_size=1.0, overwrite=True)


def test_10_truncated_absurd_random_and_out_of_range(tmp_path):
    _stack(tmp_path / "ok.mrcs")
    raw = (tmp_path / "ok.mrcs").read_bytes()
    (tmp_path / "trunc.mrcs").write_bytes(raw[: len(raw) - 500])
    with pytest.raises(MrcFileError, match="truncated.*bytes"):
        open_stack(tmp_path / "trunc.mrcs")
    absurd = bytearray(raw[:1024]) + bytes(1024 * 1024 - 1024)
    absurd[8:12] = np.int32(2_000_000_000).tobytes()  # nz
    (tmp_path / "absurd.mrcs").write_bytes(bytes(absurd))
    with pytest.raises(MrcFileError, match="truncated"):
        open_stack(tmp_path / "absurd.mrcs")
    (tmp_path / "rand.mrcs").write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(MrcFileError):
        open_stack(tmp_path / "rand.mrcs")
    p = tmp_path / "p.star"
    p.write_text("data_particles\nloop_\n_rlnImageName\n_rlnImagePixelSize\n"
                 "000001@ok.mrcs 1\n000050@ok.mrcs 1\n")
    with pytest.raises(MrcFileError, match=r"000050@ok.mrcs.*holds 10 images"):
        ParticleImages(read_particles(p))


def test_10_zero_machine_stamp_reads_with_warning():
    src = shared_file("cryodrgn/relion31.mrcs")
    with pytest.warns(UserWarning):
        m = open_stack(src)
    assert m.data.shape == (5, 256, 256)
    m.close()


# 11 -----------------------------------------------------------------------------------------
def test_11_stack_over_2gib(tmp_path):
    box, n = 128, 40000
    path = tmp_path / "big.mrcs"
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.zeros((1, box, box), np.float32))
        m.set_image_stack()
        m.voxel_size = 1.0
    header = bytearray(path.read_bytes()[:1024])
    header[8:12] = np.int32(n).tobytes()
    with open(path, "r+b") as f:
        f.write(bytes(header))
        f.truncate(1024 + n * box * box * 4)
        for idx in (0, 32767, 32768, 39999):
            f.seek(1024 + idx * box * box * 4)
            f.write(np.full(box * box, idx + 1, np.float32).tobytes())
    assert os.path.getsize(path) > 2**31
    p = tmp_path / "p.star"
    p.write_text("data_particles\nloop_\n_rlnImageName\n_rlnImagePixelSize\n"
                 + "".join(f"{i + 1}@big.mrcs 1\n" for i in (0, 32767, 32768, 39999, 5)))
    with ParticleImages(read_particles(p)) as im:
        imgs = im.read(np.arange(5))
    np.testing.assert_array_equal(imgs[:, 0, 0], [1, 32768, 32769, 40000, 0])


# 12 -----------------------------------------------------------------------------------------
def test_12_reference_pixel_size_mismatch_resampled_or_refused(trpv1_map, tmp_path):
    from swiftalign.alignment import check_inputs
    from swiftalign.io.mrc import MapData

    class _Images:
        box_size = 48
        stack_paths = ["x.mrcs"]

    p = tmp_path / "p.star"
    p.write_text("data_particles\nloop_\n_rlnImageName\n_rlnImagePixelSize\n1@x.mrcs 4.88\n")
    t = read_particles(p)
    near = MapData(trpv1_map.data, 4.88 * 1.06 / 1.05, "m.mrc")
    with pytest.warns(UserWarning, match="resampling"):
        ps, ref = check_inputs(t, _Images(), near)
    assert ps == 4.88 and ref.voxel_size_angstrom == 4.88
    assert not np.allclose(ref.data, trpv1_map.data)
    with pytest.raises(InputError, match="resample the map"):
        check_inputs(t, _Images(), MapData(trpv1_map.data, 6.0, "m.mrc"))
    with pytest.warns(UserWarning, match="voxel size is 0"):
        ps, ref = check_inputs(t, _Images(), MapData(trpv1_map.data, 0.0, "m.mrc"))
    assert ref.voxel_size_angstrom == 4.88


# 13 -----------------------------------------------------------------------------------------
def test_13_optics_groups_with_different_pixel_sizes_refused_at_start(tmp_path, trpv1_map):
    from swiftalign.alignment import check_inputs

    class _Images:
        box_size = 48
        stack_paths = ["x.mrcs"]

    p = tmp_path / "a.star"
    p.write_text(OPTICS_31 + PARTICLES_31)
    with pytest.raises(InputError, match=r"group 1: 1.0 Å, group 2: 1.3 Å"):
        check_inputs(read_particles(p), _Images(), trpv1_map)


# 16 -----------------------------------------------------------------------------------------
def test_16_bad_particles_dropped_and_hot_pixels_clipped(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.normal(size=(200, 16, 16)).astype(np.float32)
    data[10] = np.nan
    data[20, 3, 3] = np.inf
    data[30] = 0.0
    data[40] = 5.0
    data[50, 8, 8] = 1e6  # hot pixel: clipped, particle kept
    mrcfile.write(tmp_path / "s.mrcs", data, voxel_size=1.0)
    p = tmp_path / "p.star"
    p.write_text("data_particles\nloop_\n_rlnImageName\n_rlnImagePixelSize\n"
                 + "".join(f"{i + 1}@s.mrcs 1\n" for i in range(200)))
    table = read_particles(p)
    with pytest.raises(MrcFileError, match="4 of 200"):
        open_usable_particles(table, max_bad_fraction=0.01)
    with pytest.warns(UserWarning, match="leaving out 4 of 200"):
        kept, im = open_usable_particles(table, max_bad_fraction=0.05)
    assert len(kept) == 196
    names = kept.image_names()
    assert "11@s.mrcs" not in names and "51@s.mrcs" in names
    imgs = im.read(np.arange(len(kept)))
    assert np.isfinite(imgs).all()
    hot = imgs[names.index("51@s.mrcs")]
    assert hot.max() < 20
    im.close()


# 17 -----------------------------------------------------------------------------------------
def check_outputs_complete(out_dir, n_particles):
    """Every non-temporary .mrc/.star/.npy/.json under ``out_dir`` is whole and readable."""
    checked = 0
    for path in sorted(Path(out_dir).rglob("*")):
        if path.name.startswith(".") or any(p.startswith(".") for p in path.parts[-2:-1]):
            continue  # temporaries (.NAME.XXXX.tmp, .final.tmp/) are never final names
        if path.suffix == ".mrc":
            with mrcfile.open(path, permissive=False) as m:
                h = m.header
                nbytes = int(h.nx) * int(h.ny) * int(h.nz) * m.data.dtype.itemsize
                assert path.stat().st_size == 1024 + int(h.nsymbt) + nbytes, path
                assert np.isfinite(m.data).all(), path
        elif path.suffix == ".star":
            blocks = starfile.read(path, always_dict=True)
            if path.name == "particles.star":  # kept particles + particles_rejected.star
                rejected = path.with_name("particles_rejected.star")
                n_rejected = (len(starfile.read(rejected, always_dict=True)["particles"])
                              if rejected.exists() else 0)
                assert len(blocks["particles"]) + n_rejected == n_particles, path
        elif path.suffix == ".npy":
            assert len(np.load(path)) == n_particles, path
        elif path.suffix == ".json":
            __import__("json").loads(path.read_text())
        else:
            continue
        checked += 1
    return checked


def assert_same_final(a_dir, b_dir):
    a = starfile.read(Path(a_dir) / "final" / "particles.star", always_dict=True)["particles"]
    b = starfile.read(Path(b_dir) / "final" / "particles.star", always_dict=True)["particles"]
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        if a[col].dtype.kind in "fiu":
            np.testing.assert_allclose(a[col], b[col], atol=1e-4, err_msg=col)
        else:
            assert (a[col] == b[col]).all(), col
    for name in ("half1.mrc", "half2.mrc", "map.mrc", "map_unfiltered.mrc"):
        ma, mb = (mrcfile.read(Path(d) / "final" / name) for d in (a_dir, b_dir))
        np.testing.assert_allclose(ma, mb, atol=1e-5 * np.abs(ma).max(), err_msg=name)


@pytest.mark.slow
def test_17_refinement_killed_at_any_moment_resumes_to_the_same_result(tmp_path, trpv1_map):
    """SIGKILL a real ``refine`` process (while writing iteration 1, at a random moment, while
    writing iteration 2), check that no final-named file is truncated, ``--continue``, and
    compare with an uninterrupted run. Measured: about 3-4 min on 2 shared cores."""
    import signal
    import subprocess
    import sys
    import time

    import swiftalign
    from swiftalign.fsc import lowpass
    from swiftalign.io import write_map
    from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset

    n = 80
    cfg = SimulationConfig(n_particles=n, snr_db=-5.0, symmetry="C4", seed=17)
    imgs, truth = simulate_particles(trpv1_map, cfg)
    star = write_dataset(tmp_path / "data", imgs, truth, pixel_size_angstrom=4.88, config=cfg)
    init = tmp_path / "init.mrc"
    write_map(init, lowpass(trpv1_map.data, 40.0, 4.88), 4.88)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(swiftalign.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}

    def command(*where):
        return [sys.executable, "-m", "swiftalign", "refine", str(star), "-r", str(init),
                "--initial-resolution", "40", "--max-resolution", "40", "--global-resolution",
                "40", "--symmetry", "C4", "--repetitions", "1", "--iterations", "2", "-q", *where]

    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(command("-o", str(full)), env=env, check=True, capture_output=True)

    def run_until(where, condition, timeout_s=600):
        proc = subprocess.Popen(command(*where), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        while proc.poll() is None and not condition(time.monotonic() - t0):
            time.sleep(0.02)
            assert time.monotonic() - t0 < timeout_s
        finished = proc.poll() is not None
        if not finished:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return finished

    delay_s = float(np.random.default_rng(17).uniform(3.0, 40.0))
    moments = [
        lambda t: (killed / "it001" / "half1.mrc").exists(),  # writing iteration 1
        lambda t: t > delay_s,  # a random moment
        lambda t: (killed / "it002" / "map.mrc").exists(),  # writing iteration 2
    ]
    where = ("-o", str(killed))
    kills = 0
    for moment in moments:
        if not run_until(where, moment):
            kills += 1
        assert check_outputs_complete(killed, n) >= 0
        where = ("--continue", str(killed))
    assert kills >= 2
    subprocess.run(command(*where), env=env, check=True, capture_output=True)
    assert check_outputs_complete(killed, n) > 20
    assert not list(killed.rglob(".*.tmp"))
    assert_same_final(full, killed)


# 18 -----------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=0, max_size=3000))
def test_18_fuzz_mrc_reader_random_bytes(tmp_path, blob):
    path = tmp_path / "f.mrcs"
    path.write_bytes(blob)
    try:
        open_stack(path).close()
    except MrcFileError:
        pass


@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nx=st.integers(-5, 2**31 - 1), ny=st.integers(-5, 2**31 - 1), nz=st.integers(-5, 2**31 - 1),
       mode=st.integers(-2, 20))
def test_18_fuzz_mrc_reader_valid_looking_headers(tmp_path, nx, ny, nz, mode):
    header = bytearray(1024)
    header[0:16] = np.array([nx, ny, nz, mode], dtype="<i4").tobytes()
    header[208:212] = b"MAP "
    header[212:216] = bytes([0x44, 0x44, 0, 0])
    path = tmp_path / "h.mrcs"
    path.write_bytes(bytes(header) + bytes(4096))
    try:
        open_stack(path).close()
    except MrcFileError:
        pass


@settings(max_examples=80, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=400))
def test_18_fuzz_star_reader(tmp_path, text):
    path = tmp_path / "f.star"
    path.write_text(text, encoding="utf-8", errors="surrogatepass") if False else path.write_bytes(
        text.encode("utf-8", errors="replace"))
    try:
        read_particles(path, angpix=1.0)
    except StarFileError:
        pass


# Leftovers of the same kind (found by a user test) -----------------------------------------
def test_malformed_star_rows_name_file_line_column_and_value(tmp_path):
    head = ("data_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n_rlnImagePixelSize #3\n"
            "1@s.mrcs 10000 1.0\n")
    cases = {
        "word.star": (head + "2@s.mrcs abc 1.0\n",
                      r"word\.star line 8: column 'rlnDefocusU' has value 'abc', which is not a "
                      r"number"),
        "short.star": (head + "2@s.mrcs 12000\n",
                       r"short\.star line 8: 2 values but block 'data_particles' has 3 columns; "
                       r"no value for 'rlnImagePixelSize'"),
        "long.star": (head + "2@s.mrcs 12000 1.0 7 8\n",
                      r"long\.star line 8: 5 values but block 'data_particles' has 3 columns"),
        "optics.star": (OPTICS_31.replace("1 og1 1.0 300", "1 og1 1.0 3OO") + PARTICLES_31,
                        r"optics\.star line 13: column 'rlnVoltage' has value '3OO'"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(StarFileError, match=message):
            read_particles(tmp_path / name)
    # the same through the CLI: exit 2, one line, no traceback
    from typer.testing import CliRunner

    from swiftalign.cli.main import app

    r = CliRunner().invoke(app, ["align", str(tmp_path / "word.star"), "-r", str(MAP_PATH),
                                 "--resolution", "25", "-o", str(tmp_path / "o.star")])
    assert r.exit_code == 2 and "word.star line 8: column 'rlnDefocusU'" in r.output
    assert r.output.strip().count("\n") == 0 and "Traceback" not in r.output


def test_cli_validation_errors_name_the_flags_not_the_fields(tmp_path):
    from typer.testing import CliRunner

    from swiftalign.cli.main import app

    runner = CliRunner()
    star = tmp_path / "p.star"
    star.write_text("data_particles\nloop_\n_rlnImageName\n_rlnImagePixelSize\n1@s.mrcs 1\n")
    r = runner.invoke(app, ["align", str(star), "-r", str(MAP_PATH), "--resolution", "-3",
                            "-k", "0", "--max-memory", "0", "-o", str(tmp_path / "o.star")])
    assert r.exit_code == 2
    out = r.output.strip()
    assert out.count("\n") == 0 and "Traceback" not in out
    assert "--resolution -3.0: input should be greater than 0" in out
    assert "-k 0: input should be greater than or equal to 1" in out
    assert "--max-memory 0.0" in out
    assert "_angstrom" not in out and "max_memory_gb" not in out and "validation error" not in out
    r = runner.invoke(app, ["refine", str(star), "-r", str(MAP_PATH), "--initial-resolution", "0",
                            "--local-angle", "-1", "-o", str(tmp_path / "r")])
    assert r.exit_code == 2
    assert "--initial-resolution 0.0: input should be greater than 0" in r.output
    assert "--local-angle -1.0" in r.output and "local_angle_deg" not in r.output


def test_simulated_shifts_stay_inside_the_default_search():
    import inspect

    from swiftalign.alignment import AlignConfig
    from swiftalign.cli.align import align_command
    from swiftalign.io.mrc import MapData
    from swiftalign.refinement import RefineConfig
    from swiftalign.sampling import DEFAULT_MAX_SHIFT_PX
    from swiftalign.simulate import SimulationConfig, simulate_particles

    default = inspect.signature(align_command).parameters["max_shift"].default
    assert (default == AlignConfig(resolution_angstrom=10).max_shift_px
            == RefineConfig(initial_resolution_angstrom=10).max_shift_px
            == SimulationConfig().max_shift_px == DEFAULT_MAX_SHIFT_PX == 8.0)
    vol = MapData(np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32), 2.0, "m")
    cfg = SimulationConfig(n_particles=800, seed=4, batch_size=800, ctf=False)
    _, truth = simulate_particles(vol, cfg)
    _, free = simulate_particles(vol, SimulationConfig(n_particles=800, seed=4, batch_size=800,
                                                        ctf=False, max_shift_px=np.inf))
    r = np.hypot(truth["rlnOriginXAngst"], truth["rlnOriginYAngst"]) / 2.0
    r_free = np.hypot(free["rlnOriginXAngst"], free["rlnOriginYAngst"]) / 2.0
    assert r.max() <= 8.0
    assert 0.01 < np.mean(r_free > 8.0) < 0.05  # σ = 3 px: exp(−64/18) ≈ 2.9 % were outside
    inside = r_free <= 8.0
    np.testing.assert_array_equal(r[inside], r_free[inside])  # only those are redrawn
    np.testing.assert_array_equal(truth["rlnDefocusU"], free["rlnDefocusU"])
    np.testing.assert_array_equal(truth["rlnAngleRot"], free["rlnAngleRot"])
    assert 2.7 < np.std(truth["rlnOriginXAngst"] / 2.0) < 3.1
