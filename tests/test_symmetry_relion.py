"""Point groups, asymmetric units and symmetrised reconstructions equal RELION's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from swiftalign.conventions import euler_to_matrix
from swiftalign.sampling import fibonacci_directions
from swiftalign.symmetry import (
    equivalent_poses,
    in_asymmetric_unit,
    parse_symmetry,
    pose_operators,
    relion_group_name,
    symmetry_matrices,
    to_asymmetric_unit,
)

KNOWN = json.loads((Path(__file__).parent / "data" / "relion_symmetry_ops.json").read_text())
GROUPS = [k for k in KNOWN if not k.startswith("_")]
HAS_REFINE = shutil.which("relion_refine") is not None
HAS_RECONSTRUCT = shutil.which("relion_reconstruct") is not None


def _contains(group: np.ndarray, mats: np.ndarray, tol: float = 1e-4) -> np.ndarray:
    """`(len(mats),)` whether each matrix is an element of ``group``."""
    d = np.abs(np.asarray(mats)[:, None] - group[None]).max(axis=(-1, -2))
    return d.min(axis=1) < tol


@pytest.mark.parametrize("name", GROUPS)
def test_group_equals_relion_known_answers(name):
    g = symmetry_matrices(name)
    assert len(g) == KNOWN[name]["order"]
    assert _contains(g, KNOWN[name]["matrices"]).all()


@pytest.mark.skipif(not HAS_REFINE, reason="relion_refine not installed")
def test_group_equals_relion_live():
    for name in [*GROUPS, "C9", "D11", "C6h", "D6v", "S8"]:
        out = subprocess.run(["relion_refine", "--sym", name, "--print_symmetry_ops"],
                             capture_output=True, text=True, timeout=60).stdout
        lines = out.splitlines()
        rows = [i for i, line in enumerate(lines) if re.match(r"\s*R\(\d+\)=", line)]
        theirs = np.array([[[float(x) for x in lines[i + k].split()] for k in (1, 2, 3)]
                           for i in rows])
        ours = symmetry_matrices(name)
        assert len(ours) == len(theirs), name
        assert _contains(ours, theirs).all() and _contains(theirs, ours).all(), name


def test_names_as_relion():
    assert parse_symmetry("i") == parse_symmetry("I2")
    np.testing.assert_allclose(symmetry_matrices("Ih"), symmetry_matrices("I2h"))
    for bad in ("I5", "S3", "X2", "C0", "D", "C4vh"):
        with pytest.raises(ValueError):
            parse_symmetry(bad)
    # D7: the 2-fold is on x (RELION), not on y
    assert _contains(symmetry_matrices("D7"), [np.diag([1.0, -1.0, -1.0])]).all()
    assert not _contains(symmetry_matrices("D7"), [np.diag([-1.0, 1.0, -1.0])]).any()


@pytest.mark.parametrize("name", ["C1", "C5", "D1", "D2", "D7", "T", "O", "I", "I1", "I3", "I4",
                                  "Cs", "Ci", "C3v", "C4h", "S4", "D3h", "D2v", "Td", "Th", "Oh",
                                  "Ih", "I4h"])
def test_asymmetric_unit_covers_the_sphere_once(name):
    g = symmetry_matrices(name)
    rots, _ = pose_operators(g)
    n_views = len({tuple(np.round(r, 4).ravel()) for r in rots})  # distinct direction maps
    dirs = fibonacci_directions(20000)
    assert in_asymmetric_unit(dirs, g).mean() == pytest.approx(1.0 / n_views, rel=0.02)
    dirs = dirs[::10]
    mates = np.einsum("gij,nj->ngi", rots, dirs).reshape(-1, 3)
    covered = in_asymmetric_unit(mates, g).reshape(len(dirs), -1).any(axis=1)
    assert covered.mean() > 0.999


def test_relion_units_for_rotation_groups():
    """The units are RELION's (healpix_sampling.cpp), e.g. Cn: |rot| ≤ 180°/n; Dn: tilt ≤ 90°,
    |rot − 90°| ≤ 180°/n; so the sampled views sit where RELION's do."""
    assert relion_group_name(symmetry_matrices("I")) == "I2"
    assert relion_group_name(symmetry_matrices("D5")) == "D5"
    assert relion_group_name(symmetry_matrices("C2v")) is None
    rot = np.radians([0.0, 30.0, 40.0, 90.0, 120.0, -100.0])
    d = np.stack([np.cos(rot) * 0.6, np.sin(rot) * 0.6, np.full(6, 0.8)], axis=1)
    np.testing.assert_array_equal(in_asymmetric_unit(d, symmetry_matrices("C4")),
                                  [True, True, True, False, False, False])
    np.testing.assert_array_equal(in_asymmetric_unit(d, symmetry_matrices("D3")),
                                  [False, True, True, True, True, False])
    np.testing.assert_array_equal(in_asymmetric_unit(d * [1, 1, -1], symmetry_matrices("D3")),
                                  [False] * 6)


def _projection(volume: np.ndarray, mats: np.ndarray) -> np.ndarray:
    from swiftalign.projection import project

    return project(torch.as_tensor(volume, dtype=torch.float32),
                   torch.as_tensor(mats, dtype=torch.float32)).numpy()


@pytest.mark.parametrize("name", ["C2v", "D3h", "Ci"])
def test_improper_elements_give_equal_projections(name, rng):
    """With mirrors, the pose ``F·A·(−g)ᵀ`` projects as ``A`` (docstring of symmetry.py)."""
    from scipy.ndimage import affine_transform, gaussian_filter

    c = np.full(3, 16.0)  # rotation centre N // 2
    r = np.linalg.norm(np.indices((32, 32, 32)).T - c, axis=-1)
    vol = gaussian_filter(rng.normal(size=(32, 32, 32)), 3.0) * (r < 11)  # nothing in corners
    g = symmetry_matrices(name)
    sym = np.zeros_like(vol)
    for m in g:  # V(g·y) summed over the group; array axes are (z, y, x)
        mz = m[::-1, ::-1]
        sym += affine_transform(vol, mz, offset=c - mz @ c, order=1)
    a = euler_to_matrix(np.array([[20.0, 50.0, 70.0]]))
    mates = equivalent_poses(a, g)[0]
    rots, flips = pose_operators(g)
    turned = rots[flips & (np.abs(rots - np.eye(3)).max(axis=(1, 2)) > 1e-6)]
    unflipped = np.einsum("ij,gkj->gik", a[0], turned)  # A·(−g)ᵀ without the 180° turn
    proj = _projection(sym, np.concatenate([mates, unflipped]))
    cc = np.array([np.corrcoef(proj[0].ravel(), p.ravel())[0, 1] for p in proj[1:]])
    assert cc[: len(mates) - 1].min() > 0.9  # (linear interpolation in the symmetrisation)
    assert (cc[len(mates) - 1:] < 0.8).all()
    inside = to_asymmetric_unit(a, g)
    assert in_asymmetric_unit(inside[:, 2, :], g).all()


@pytest.fixture(scope="module")
def noise_star(tmp_path_factory):
    """300 pure-noise 40-px images with random poses: a symmetrised noise map matches
    RELION's only if the group's operators (and the algorithm) agree."""
    import pandas as pd
    import starfile

    from swiftalign.io.mrc import write_stack

    out = tmp_path_factory.mktemp("symnoise")
    rng = np.random.default_rng(3)
    n = 300
    write_stack(out / "noise.mrcs", rng.normal(size=(n, 40, 40)).astype(np.float32), 3.0)
    euler = np.column_stack([rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                             rng.uniform(-180, 180, n)])
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [3.0],
                           "rlnImageSize": [40], "rlnImageDimensionality": [2],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1]})
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@noise.mrcs" for i in range(n)],
                          "rlnAngleRot": euler[:, 0], "rlnAngleTilt": euler[:, 1],
                          "rlnAnglePsi": euler[:, 2], "rlnOriginXAngst": 0.0,
                          "rlnOriginYAngst": 0.0, "rlnOpticsGroup": 1})
    starfile.write({"optics": optics, "particles": parts}, out / "noise.star")
    return out, euler


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RECONSTRUCT, reason="relion_reconstruct not installed")
@pytest.mark.parametrize("name", ["T", "O", "I", "D5", "D7"])
def test_symmetrised_reconstruction_equals_relion(noise_star, name):
    import mrcfile

    from swiftalign.fsc import fsc_curve
    from swiftalign.io import read_particles
    from swiftalign.reconstruction import reconstruct

    out, euler = noise_star
    subprocess.run(["relion_reconstruct", "--i", "noise.star", "--o", f"{name}.mrc", "--sym", name],
                   cwd=out, check=True, capture_output=True, timeout=300)
    table = read_particles(out / "noise.star")
    images = np.stack([mrcfile.read(out / "noise.mrcs")])[0]
    ours = reconstruct(images, euler, table.origins_shift_px(), ctf=None,
                       pixel_size_angstrom=3.0, symmetry_group=symmetry_matrices(name))
    f = fsc_curve(ours, mrcfile.read(out / f"{name}.mrc"))
    assert f[1:-2].min() > 0.99


def _d7_maps() -> tuple[np.ndarray, np.ndarray]:
    """A D7 map as RELION sets it (2-fold on x) and the same map turned 90° about z (2-fold on y)."""
    from scipy.ndimage import affine_transform, gaussian_filter

    n = 48
    c = np.full(3, n // 2, dtype=np.float64)
    r = np.linalg.norm(np.indices((n,) * 3).reshape(3, -1).T - c, axis=1).reshape((n,) * 3)
    blob = gaussian_filter(np.random.default_rng(7).normal(size=(n,) * 3), 1.5) * (r < 16)
    blob = np.clip(blob, 0, None)
    right = np.zeros_like(blob)
    for m in symmetry_matrices("D7"):
        mz = m[::-1, ::-1]
        right += affine_transform(blob, mz, offset=c - mz @ c, order=1)
    turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])[::-1, ::-1]
    wrong = affine_transform(right, turn, offset=c - turn @ c, order=1)
    return right, wrong


def test_reference_inconsistent_with_symmetry_is_refused(caplog):
    from swiftalign.errors import InputError
    from swiftalign.symmetry import SYMMETRY_REFUSE_BELOW, check_reference_symmetry

    right, wrong = _d7_maps()
    kw = {"pixel_size_angstrom": 2.0, "resolution_angstrom": 8.0}
    good = check_reference_symmetry(right, "D7", name="right.mrc", **kw)
    assert good > 0.98  # measured 0.996
    with pytest.raises(InputError, match=r"wrong\.mrc: agrees with its own D7 symmetry at only "
                                         r"0\.[0-8]\d.*--force-symmetry"):
        check_reference_symmetry(wrong, "D7", name="wrong.mrc", **kw)
    forced = check_reference_symmetry(wrong, "D7", name="wrong.mrc", force=True, **kw)
    assert forced < SYMMETRY_REFUSE_BELOW  # measured 0.78
    assert "wrong.mrc: agrees with its own D7" in caplog.text
    assert check_reference_symmetry(wrong, "C7", **kw) > 0.98  # its 7-fold is right
    assert check_reference_symmetry(wrong, "C1", **kw) == 1.0


def test_align_and_refine_refuse_a_reference_without_the_symmetry(tmp_path, trpv1_map):
    """TRPV1 is C4: D4 (2-folds on x) is refused before any work, in one line; forced, it runs."""
    from importlib.resources import files

    from typer.testing import CliRunner

    from swiftalign.cli.main import app
    from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset

    cfg = SimulationConfig(n_particles=6, snr_db=10.0, symmetry="C4", seed=1)
    images, truth = simulate_particles(trpv1_map, cfg)
    star = write_dataset(tmp_path / "sim", images, truth, pixel_size_angstrom=4.88, config=cfg)
    ref = str(files("swiftalign") / "data" / "trpv1_volume.mrc")
    runner = CliRunner()
    for cmd in (["align", str(star), "-r", ref, "--resolution", "30", "-o", str(tmp_path / "a.star")],
                ["refine", str(star), "-r", ref, "--initial-resolution", "40", "-o",
                 str(tmp_path / "ref")]):
        r = runner.invoke(app, [*cmd, "--symmetry", "D4", "-q"])
        assert r.exit_code != 0
        assert re.search(r"trpv1_volume\.mrc: agrees with its own D4 symmetry at only 0\.[0-4]",
                         r.output), r.output
        assert "Traceback" not in r.output
    assert not (tmp_path / "a.star").exists()
