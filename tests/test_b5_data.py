"""The realistic-set builder of benchmark B5 (benchmarks/realistic.py): the CTF table is read
without arbitrary code, the model density sits in RELION's symmetry frame, the package's
projections agree with relion_project, and the noise has the requested SNR."""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` lives at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.realistic import (  # noqa: E402
    DatasetSpec,
    _project_package,
    _project_relion,
    add_noise,
    draw_truth,
    load_ctf_table,
    model_density,
    write_star,
)
from tests.conftest import shared_file  # noqa: E402


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_ctf_unpickler_refuses_other_globals(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(ValueError, match=r"bad\.pkl: refusing to load global .*system"):
        load_ctf_table(bad)
    assert not marker.exists()
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps(np.zeros((3, 4))))
    with pytest.raises(ValueError, match=r"wrong\.pkl: expected an \(n, 9\) CTF array, got \(3, 4\)"):
        load_ctf_table(wrong)


def test_ctf_table_of_empiar10028_loads():
    table = load_ctf_table(shared_file("cryodrgn_empiar10028/ctf.pkl"))
    assert table.shape == (105247, 9)
    assert np.allclose(table[:, 5], 300.0) and np.allclose(table[:, 6], 2.0)
    assert 8000 < table[:, 2].min() < 8200 and 38400 < table[:, 2].max() < 38500  # dfU, Å


def _rotate(volume: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``V'(y) = V(g·y)`` about voxel ``N // 2`` (g acts on xyz, the array is zyx)."""
    perm = np.eye(3)[::-1]
    m = perm @ g @ perm
    c = np.full(3, volume.shape[0] // 2, dtype=float)
    return ndimage.affine_transform(volume, m, offset=c - m @ c, order=1)


def _symmetry_correlation(volume: np.ndarray, symmetry: str) -> float:
    from swiftalign.symmetry import symmetry_matrices

    sym = np.mean([_rotate(volume, g) for g in symmetry_matrices(symmetry)], axis=0)
    return float(np.corrcoef(volume.ravel(), sym.ravel())[0, 1])


def test_groel_density_is_d7_in_relion_frame():
    pytest.importorskip("gemmi", reason="gemmi (a dev dependency) turns atomic models into densities")
    volume, info = model_density(shared_file("models/1MNF.pdb.gz"), 64, 4.0, "D7")
    assert volume.shape == (64, 64, 64)
    assert info["symmetry_residual_angstrom"] < 1.0
    assert _symmetry_correlation(volume, "D7") >= 0.9
    # centred on voxel N // 2
    com = np.array(ndimage.center_of_mass(np.clip(volume, 0, None)))
    assert np.all(np.abs(com - 32) < 1.0)
    # control: tilted by 10° off the frame, the same measure fails
    tilted = _rotate(volume, Rotation.from_euler("x", 10, degrees=True).as_matrix())
    assert _symmetry_correlation(tilted, "D7") < 0.9


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Six particles' truth and the package's clean projections of a 48 px GroEL map."""
    pytest.importorskip("gemmi", reason="gemmi (a dev dependency) turns atomic models into densities")
    spec = DatasetSpec(n_particles=6, box=48, pixel_size_angstrom=5.0, projector="package")
    volume, _ = model_density(shared_file("models/1MNF.pdb.gz"), spec.box, 5.0, "D7")
    truth = draw_truth(spec, load_ctf_table(shared_file("cryodrgn_empiar10028/ctf.pkl")))
    out = tmp_path_factory.mktemp("tiny")
    clean = _project_package(volume, truth, spec, out / "package.mrcs")
    return spec, volume, truth, out, clean


def test_package_projections_agree_with_relion_project(tiny_set):
    if shutil.which("relion_project") is None:
        pytest.skip("relion_project not installed")
    spec, volume, truth, out, clean = tiny_set
    from swiftalign.io import write_map

    write_map(out / "truth.mrc", volume, spec.pixel_size_angstrom)
    write_star(out / "poses.star", truth, spec, "clean.mrcs")
    relion = mrcfile.read(_project_relion(out / "truth.mrc", out / "poses.star", out / "rel"))
    ours = mrcfile.read(clean)
    cc = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, relion, strict=True)]
    assert min(cc) > 0.97, cc


def test_noise_has_the_requested_snr(tiny_set):
    spec, _, _, out, clean = tiny_set
    add_noise(clean, out / "noisy.mrcs", -15.0, seed=3)
    signal = mrcfile.read(clean)
    noise = mrcfile.read(out / "noisy.mrcs") - signal
    snr_db = 10 * np.log10(signal.var(axis=(1, 2)) / noise.var(axis=(1, 2)))
    assert np.allclose(snr_db, -15.0, atol=0.3)
    assert not list(out.glob(".*.tmp"))
