"""STAR reading: RELION 3.0 / 3.1 / block order / several optics groups, and writing."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from tests.conftest import shared_file

from swiftalign.errors import StarFileError
from swiftalign.io import read_particles, write_particles


def _fields(t):
    return np.stack([t.pixel_size_angstrom, t.voltage_kv, t.cs_mm, t.amplitude_contrast], 1)


def test_relion31_and_reversed_blocks_read_identically():
    a = read_particles(shared_file("cryodrgn/relion31.star"))
    b = read_particles(shared_file("cryodrgn/relion31.v2.star"))
    assert len(a) == len(b) == 5
    np.testing.assert_allclose(_fields(a), _fields(b))
    np.testing.assert_allclose(a.pixel_size_angstrom, 2.806)
    np.testing.assert_allclose(a.cs_mm, 0.01)
    np.testing.assert_allclose(a.origins_shift_px(), b.origins_shift_px())


def test_relion30_and_31_same_particles_same_values():
    t30 = read_particles(shared_file("aspire/sample_particles_relion30.star"))
    t31 = read_particles(shared_file("aspire/sample_particles_relion31.star"))
    assert len(t30) == len(t31) == 17
    # 3.0: DetectorPixelSize 5 µm · 1e4 / Mag 37369.2
    np.testing.assert_allclose(t30.pixel_size_angstrom, 5 * 1e4 / 37369.2, rtol=1e-6)
    np.testing.assert_allclose(t31.pixel_size_angstrom, 1.4)
    # the 3.1 file has two optics groups, 300 and 200 kV
    groups = t31.particles["rlnOpticsGroup"].to_numpy()
    np.testing.assert_allclose(t31.voltage_kv[groups == 1], 300.0)
    np.testing.assert_allclose(t31.voltage_kv[groups == 2], 200.0)
    np.testing.assert_allclose(
        t30.particles["rlnDefocusU"].to_numpy(), t31.particles["rlnDefocusU"].to_numpy()
    )


def test_empiar_relion30_pixel_size():
    t = read_particles(shared_file("cryodrgn/empiar_10076_7.star"))
    np.testing.assert_allclose(t.pixel_size_angstrom, 5 * 1e4 / 38168, rtol=1e-6)
    np.testing.assert_allclose(t.amplitude_contrast, 0.07)


def test_six_optics_groups_per_group_values():
    t = read_particles(shared_file("cryodrgn/relion31.6opticsgroups.star"))
    assert len(t) == 139
    optics = t.optics.set_index("rlnOpticsGroup")
    g = t.particles["rlnOpticsGroup"].to_numpy()
    np.testing.assert_allclose(t.pixel_size_angstrom,
                               optics.loc[g, "rlnImagePixelSize"].to_numpy())
    np.testing.assert_allclose(t.voltage_kv, 200.0)


def test_no_pixel_size_needs_angpix():
    path = shared_file("aspire/rln_proj_65.star")
    with pytest.raises(StarFileError, match="--angpix"):
        read_particles(path)
    t = read_particles(path, angpix=5.0)
    np.testing.assert_allclose(t.pixel_size_angstrom, 5.0)


def test_windows_line_endings_parse_like_lf(tmp_path):
    src = shared_file("cryodrgn/relion31.star")
    crlf = tmp_path / "crlf.star"
    crlf.write_bytes(src.read_bytes().replace(b"\n", b"\r\n"))
    a, b = read_particles(src), read_particles(crlf)
    pd.testing.assert_frame_equal(a.particles, b.particles)
    np.testing.assert_allclose(_fields(a), _fields(b))


def test_not_a_star_file(tmp_path):
    p = tmp_path / "page.star"
    p.write_text("<html>\n<body>oops</body>\n</html>\n")
    with pytest.raises(StarFileError, match="not a STAR file.*line 1"):
        read_particles(p)


def test_no_particles(tmp_path):
    p = tmp_path / "empty.star"
    p.write_text("data_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n")
    with pytest.raises(StarFileError, match="no particles"):
        read_particles(p)


def test_write_keeps_columns_and_round_trips(tmp_path):
    src = shared_file("cryodrgn/relion31.star")
    shutil.copy(src, tmp_path / "in.star")
    t = read_particles(tmp_path / "in.star")
    n = len(t)
    updates = {"rlnAngleRot": np.arange(n, dtype=float), "rlnSwiftalignScore": np.ones(n)}
    write_particles(tmp_path / "out.star", t, box_size=256, updates=updates)
    back = read_particles(tmp_path / "out.star")
    for col in t.particles.columns:
        assert col in back.particles
    np.testing.assert_allclose(back.particles["rlnAngleRot"], np.arange(n))
    np.testing.assert_allclose(_fields(back), _fields(t))
    assert not list(tmp_path.glob("*.tmp"))


def test_relion30_written_as_31_with_optics(tmp_path):
    t = read_particles(shared_file("aspire/sample_particles_relion30.star"))
    write_particles(tmp_path / "o.star", t, box_size=200)
    back = read_particles(tmp_path / "o.star")
    assert back.optics is not None
    np.testing.assert_allclose(back.pixel_size_angstrom, t.pixel_size_angstrom, rtol=1e-6)


def test_optics_group_and_values_follow_the_optics_block(tmp_path):
    """One lookup of optics values for every module: a single optics group numbered 2 and a
    particle block without rlnOpticsGroup resolve to group 2; two groups map per particle."""
    import starfile

    optics = pd.DataFrame({"rlnOpticsGroup": [2], "rlnOpticsGroupName": ["g2"],
                           "rlnImagePixelSize": [1.5], "rlnImageSize": [64],
                           "rlnCtfBfactor": [30.0]})
    parts = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs"],
                          "rlnDefocusU": [1e4, 2e4], "rlnDefocusV": [1e4, 2e4]})
    starfile.write({"optics": optics, "particles": parts}, tmp_path / "one.star")
    table = read_particles(tmp_path / "one.star")
    assert table.optics_group.tolist() == [2, 2]
    assert table.optics_value("rlnImageSize").tolist() == [64, 64]
    assert table.optics_value("rlnNoSuchLabel") is None

    optics2 = pd.concat([optics, optics.assign(rlnOpticsGroup=5, rlnImageSize=96,
                                               rlnCtfBfactor=-10.0)], ignore_index=True)
    parts2 = parts.assign(rlnOpticsGroup=[5, 2])
    starfile.write({"optics": optics2, "particles": parts2}, tmp_path / "two.star")
    table = read_particles(tmp_path / "two.star")
    assert table.optics_value("rlnImageSize").tolist() == [96, 64]
    from swiftalign.ctf import ctf_envelope_from_table

    bfactor, scale = ctf_envelope_from_table(table)
    assert bfactor.tolist() == [-10.0, 30.0] and scale.tolist() == [1.0, 1.0]
