"""Streaming (issue 6): batches dropped into a folder are aligned once complete, appended to
one output, never aligned twice (even after a restart)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import starfile
from tests.conftest import SMALL_INDEX
from typer.testing import CliRunner

from swiftalign.alignment import AlignConfig, align_particles
from swiftalign.cli.main import app
from swiftalign.index_file import load_reference_index
from swiftalign.io import ParticleImages, read_particles
from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset
from swiftalign.watch import FolderWatcher, align_stream, batches_record_path

CONFIG = AlignConfig(**SMALL_INDEX)
COLS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]


@pytest.fixture(scope="module")
def batches(trpv1_map, tmp_path_factory):
    """Three batches of 30 particles: (STAR text pointing at its stack, stack bytes)."""
    out = tmp_path_factory.mktemp("batches")
    made = []
    for i in range(3):
        cfg = SimulationConfig(n_particles=30, snr_db=0.0, symmetry="C4", shift_sigma_px=1.5,
                               seed=40 + i)
        images, truth = simulate_particles(trpv1_map, cfg)
        star = write_dataset(out / f"b{i}", images, truth, pixel_size_angstrom=4.88, config=cfg)
        made.append(star)
    return made


def _drop(batch_star: Path, folder: Path, name: str, *, truncate: bool = False) -> Path:
    """Copy a batch into the watched folder: its stack first, then the STAR naming it."""
    stack = folder / f"{name}.mrcs"
    data = (batch_star.parent / "particles.mrcs").read_bytes()
    stack.write_bytes(data[: len(data) // 2] if truncate else data)
    blocks = starfile.read(batch_star, always_dict=True)
    idx = blocks["particles"]["rlnImageName"].str.split("@").str[0]
    blocks["particles"]["rlnImageName"] = idx + f"@{name}.mrcs"
    star = folder / f"{name}.star"
    starfile.write(blocks, star, overwrite=True)
    return star


def _direct(index, star: Path) -> np.ndarray:
    table = read_particles(star)
    with ParticleImages(table) as images:
        res = align_particles(table, images, index, CONFIG)
    cols = res.star_columns()
    return np.stack([cols[c] for c in COLS], axis=1)


def test_batches_dropped_into_a_folder_are_aligned_once(small_index, batches, tmp_path):
    _, index_path, _ = small_index
    index = load_reference_index(index_path)
    watch = tmp_path / "incoming"
    watch.mkdir()
    out = tmp_path / "out" / "aligned.star"
    dropped = [_drop(batches[0], watch, "b0")]

    def on_batch(summary):
        if summary.total_batches == 1:  # the microscope writes the next batches meanwhile
            dropped.append(_drop(batches[1], watch, "b1"))
            dropped.append(_drop(batches[2], watch, "b2", truncate=True))  # stack incomplete

    s = align_stream(FolderWatcher(watch, interval_s=0.1, idle_timeout_s=1.5), index_path,
                     CONFIG, out, on_batch=on_batch)
    assert [Path(b.star).name for b in s.batches] == ["b0.star", "b1.star"]  # not b2
    p = starfile.read(out, always_dict=True)["particles"]
    assert len(p) == 60
    want = np.concatenate([_direct(index, d) for d in dropped[:2]])
    np.testing.assert_allclose(p[COLS].to_numpy(), want, atol=1e-5)
    record = json.loads(batches_record_path(out).read_text())
    assert [Path(b["star"]).name for b in record["batches"]] == ["b0.star", "b1.star"]

    # b2's stack is completed; a restart aligns only b2
    _drop(batches[2], watch, "b2")
    s = align_stream(FolderWatcher(watch, interval_s=0.1, idle_timeout_s=1.0), index_path,
                     CONFIG, out)
    assert s.skipped_known == 2 and [Path(b.star).name for b in s.batches] == ["b2.star"]
    p2 = starfile.read(out, always_dict=True)["particles"]
    assert len(p2) == 90
    np.testing.assert_array_equal(p2[COLS].to_numpy()[:60], p[COLS].to_numpy())
    np.testing.assert_allclose(p2[COLS].to_numpy()[60:], _direct(index, dropped[2]), atol=1e-5)

    # a crash after the output was written but before the record: b2 is aligned again,
    # its first rows dropped, no duplicates
    record = json.loads(batches_record_path(out).read_text())
    record["batches"] = record["batches"][:2]
    batches_record_path(out).write_text(json.dumps(record))
    s = align_stream([dropped[0], dropped[2]], index_path, CONFIG, out)
    assert s.skipped_known == 1 and len(s.batches) == 1
    p3 = starfile.read(out, always_dict=True)["particles"]
    assert len(p3) == 90
    np.testing.assert_allclose(p3[COLS].to_numpy(), p2[COLS].to_numpy(), atol=1e-6)


def test_stop_file_and_bad_batches(small_index, batches, tmp_path):
    _, index_path, _ = small_index
    watch = tmp_path / "in"
    watch.mkdir()
    _drop(batches[0], watch, "good")
    bad = watch / "bad.star"  # a STAR whose stack is 4.88 Å/px declared as 6 Å/px
    blocks = starfile.read(_drop(batches[1], watch, "other"), always_dict=True)
    (watch / "other.star").unlink()
    blocks["optics"]["rlnImagePixelSize"] = 6.0
    starfile.write(blocks, bad, overwrite=True)
    (watch / "swiftalign.stop").touch()  # stop once the files complete now are done
    out = tmp_path / "a.star"
    s = align_stream(FolderWatcher(watch, interval_s=0.1), index_path, CONFIG, out)
    by_name = {Path(b.star).name: b for b in s.batches}
    assert by_name["good.star"].n_particles == 30 and by_name["good.star"].error is None
    assert "built for pixel size 4.88" in by_name["bad.star"].error
    assert len(starfile.read(out, always_dict=True)["particles"]) == 30


def test_cli_watch(small_index, batches, tmp_path):
    _, index_path, _ = small_index
    watch = tmp_path / "in"
    watch.mkdir()
    for i in range(2):
        _drop(batches[i], watch, f"b{i}")
    out = watch / "aligned.star"  # inside the watched folder: never picked up itself
    args = ["align", "--watch", str(watch), "--index-file", str(index_path), "-o", str(out),
            "--watch-timeout", "0.5", "--watch-interval", "0.1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert len(starfile.read(out, always_dict=True)["particles"]) == 60
    assert "total 60 particles" in " ".join(r.output.split())
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "2 batches done before, not re-aligned" in " ".join(r.output.split())
    assert len(starfile.read(out, always_dict=True)["particles"]) == 60
    r = CliRunner().invoke(app, ["align", "--watch", str(watch), "-o", str(out)])
    assert r.exit_code == 2 and "needs --index-file" in r.output
