"""The inputs people really have: right value or a clear error, never a crash mid-run.

Numbered as in the reliability issue.
"""

from __future__ import annotations

import os
import warnings

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
