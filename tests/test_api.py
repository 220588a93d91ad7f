"""The Python API: lazy import, input handling, and the README's notebook example run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import swiftalign
from swiftalign.errors import InputError

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_blocks() -> list[str]:
    """The ```python blocks of the README's "Python API" section, in order."""
    text = README.read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_import_is_fast_and_names_resolve():
    code = ("import sys, swiftalign; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'pandas' not in sys.modules; "
            "f = swiftalign.align, swiftalign.refine, swiftalign.simulate, swiftalign.read_particles; "
            "assert all(callable(x) for x in f); print(sorted(swiftalign.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=README.parent, env={"PYTHONPATH": str(README.parent / "src")})
    assert out.returncode == 0, out.stderr
    assert "'align'" in out.stdout and "'refine'" in out.stdout


def test_simulate_stays_callable_after_its_module_is_imported():
    import swiftalign.simulate  # noqa: F401  (rebinds the package attribute to the module)

    assert callable(swiftalign.simulate)
    assert swiftalign.simulate.SimulationConfig is not None  # still the module's contents


def test_bad_inputs_are_refused_before_work(tmp_path):
    from pydantic import ValidationError

    star = swiftalign.simulate(swiftalign.demo_map_path(), output_dir=tmp_path, n_particles=4,
                               symmetry="C4").star_path
    with pytest.raises(InputError, match="cubic"):
        swiftalign.align(star, np.zeros((4, 4)), resolution_angstrom=30)
    with pytest.raises(InputError, match="ParticleTable"):
        swiftalign.align(42, swiftalign.demo_map_path(), resolution_angstrom=30)
    with pytest.raises(ValidationError, match="no_such_option"):
        swiftalign.align(star, swiftalign.demo_map_path(), resolution_angstrom=30,
                         no_such_option=1)
    with pytest.raises(InputError, match="no_such_option"):
        swiftalign.simulate(swiftalign.demo_map_path(), output_dir=tmp_path, no_such_option=1)
    with pytest.raises(ValueError, match="X7"):
        swiftalign.refine(star, swiftalign.demo_map_path(), initial_resolution_angstrom=30,
                          output_dir=tmp_path / "r", symmetry="X7")
    assert not (tmp_path / "r").exists()


def test_read_refinement_needs_a_completed_iteration(tmp_path):
    with pytest.raises(InputError, match="state.json"):
        swiftalign.read_refinement(tmp_path)


def test_readme_example_align_block(tmp_path, monkeypatch):
    """The README's first block, as written: 200 TRPV1 particles at −10 dB aligned at 30 Å."""
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_readme_blocks()[0], "README.md", "exec"), ns)
    result, sim = ns["result"], ns["sim"]
    assert isinstance(result, swiftalign.AlignResult) and len(result.poses) == 200
    # the C4-aware median error is below the angular step (2.9° at a 7.4° step when written)
    assert np.median(ns["error_deg"]) < result.sampling["angular_step_deg"]
    # the STAR and the .cs written by the example hold the same poses
    for name in ("aligned.star", "aligned.cs"):
        back = swiftalign.read_particles(tmp_path / "api_demo" / name)
        assert np.allclose(back.particles["rlnAngleTilt"], result.poses["rlnAngleTilt"],
                           atol=1e-3), name
    assert sim.truth.shape[0] == 200


def test_array_reference_equals_path_reference(tmp_path):
    """A (N, N, N) array without a voxel size takes the particles' pixel size: same poses."""
    sim = swiftalign.simulate(swiftalign.demo_map_path(), output_dir=tmp_path, n_particles=20,
                              symmetry="C4", seed=4, snr_db=0)
    ref = swiftalign.read_map(swiftalign.demo_map_path())
    kw = dict(resolution_angstrom=40, symmetry="C4", index="Flat", local_rounds=0)
    a = swiftalign.align(sim.star_path, swiftalign.demo_map_path(), **kw)
    b = swiftalign.align(sim.particles, ref.data, **kw)
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    assert np.allclose(a.poses[cols].to_numpy(), b.poses[cols].to_numpy())


@pytest.mark.slow
def test_readme_example_both_blocks(tmp_path, monkeypatch):
    """Both README blocks: align, then one refinement iteration from the aligned STAR."""
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for block in _readme_blocks():
        exec(compile(block, "README.md", "exec"), ns)
    refined = ns["refined"]
    assert isinstance(refined, swiftalign.RefineResult)
    assert refined.map.data.shape == (48, 48, 48)
    assert refined.map.voxel_size_angstrom == pytest.approx(4.88, rel=1e-5)
    assert 2 * 4.88 <= refined.resolution_angstrom < 30
    assert len(refined.history) == 1 and len(refined.half_maps[0]) == 2
    corrected = refined.fsc[0]["rlnFourierShellCorrelationCorrected"].to_numpy()
    assert corrected[1] > 0.9  # lowest shells agree between the half maps
    assert set(refined.poses["rlnRandomSubset"]) == {1, 2}
    # the same result read back from the folder (as for a command-line run)
    again = swiftalign.read_refinement(tmp_path / "api_demo" / "refine")
    assert again.resolution_angstrom == refined.resolution_angstrom
    assert np.array_equal(again.half_maps[0][1].data, refined.half_maps[0][1].data)
    assert again.history == refined.history and again.poses.equals(refined.poses)
