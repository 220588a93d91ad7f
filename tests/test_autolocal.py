"""The auto-local switch of refine (swiftalign.autolocal): rule, ranges, pose changes."""

from __future__ import annotations

import numpy as np
import pytest

from swiftalign.autolocal import (
    MAX_CLASS_CHANGE,
    choose_search,
    local_ranges,
    pose_changes,
    spread_summary,
)

BOX_A = 48 * 4.88  # TRPV1 demo box (Å): one shell = 1/234 Å⁻¹


def _entry(res, search="global", moved=None, changed=None, **kw):
    return {"resolution_angstrom": res, "search": search, "pose_change_deg": moved,
            "class_change_fraction": changed, **kw}


def _plan(history, iteration=None, *, step=2.0, auto=True, iterations=8, local_passes=0):
    return choose_search(history, iteration=iteration or len(history) + 1, iterations=iterations,
                         local_passes=local_passes, auto_local=auto, angular_step_deg=step,
                         box_angstrom=BOX_A)


def test_first_iterations_are_global():
    assert _plan([]).search == "global"
    p = _plan([_entry(20.0)])  # iteration 1 has no earlier poses: its change is unknown
    assert (p.search, p.reason) == ("global", "no earlier poses to compare: global")


def test_stable_poses_switch_to_local_with_the_reason():
    p = _plan([_entry(20.0), _entry(15.0, moved=0.4, changed=0.0)], step=1.2)
    assert p.search == "local"
    assert p.reason == "poses moved 0.40° (< step 1.20°): local"
    p = _plan([_entry(20.0), _entry(15.0, moved=1.5, changed=0.0)], step=1.2)
    assert p.search == "global" and "poses moved 1.50° (≥ step 1.20°)" in p.reason
    assert _plan([_entry(20.0), _entry(15.0, moved=0.4)], step=1.2, auto=False).search == "global"


def test_local_stays_local_until_resolution_drops_or_classes_change():
    base = [_entry(20.0), _entry(15.0, moved=0.4, changed=0.0)]
    stay = _plan([*base, _entry(14.0, "local", moved=0.3, changed=0.0)])
    assert stay.search == "local" and "resolution held" in stay.reason
    # 15 → 17 Å: 234/17 − 234/15 = −1.8 shells
    drop = _plan([*base, _entry(17.0, "local", moved=0.3, changed=0.0)])
    assert drop.search == "global"
    assert drop.reason == "resolution fell from 15.00 to 17.00 Å (≥ 1 shell): global"
    # 15 → 15.5 Å is −0.5 shell: not a drop
    assert _plan([*base, _entry(15.5, "local", moved=0.3, changed=0.0)]).search == "local"
    swap = _plan([*base, _entry(14.0, "local", moved=0.3, changed=2 * MAX_CLASS_CHANGE)])
    assert swap.search == "global" and "10.0 % of particles changed class" in swap.reason


def test_local_passes_force_the_last_iterations_local():
    p = _plan([_entry(20.0)], iteration=2, iterations=2, local_passes=1, auto=False)
    assert p.search == "local" and "--local-passes 1" in p.reason
    assert _plan([], iteration=1, iterations=1, local_passes=1).search == "global"


def test_local_ranges_follow_the_last_global_spread_within_step_and_cap():
    hist = [_entry(20.0, spread_deg=3.0, spread_px=0.8)]
    assert local_ranges(hist, angular_step_deg=1.0, shift_step_px=0.5, max_angle_deg=5.0,
                        max_shift_px=2.0) == (3.0, 0.8)
    # after a local iteration: how far it moved the particles (settling: one step)
    settled = [*hist, _entry(15.0, "local", spread_deg=0.2, spread_px=0.1)]
    assert local_ranges(settled, angular_step_deg=1.0, shift_step_px=0.5, max_angle_deg=5.0,
                        max_shift_px=2.0) == (1.0, 0.5)
    # at least one step, at most the cap (never below one step)
    assert local_ranges(hist, angular_step_deg=4.0, shift_step_px=1.0, max_angle_deg=5.0,
                        max_shift_px=2.0) == (4.0, 1.0)
    assert local_ranges(hist, angular_step_deg=1.0, shift_step_px=0.1, max_angle_deg=2.0,
                        max_shift_px=0.5) == (2.0, 0.5)
    assert local_ranges([_entry(20.0)], angular_step_deg=1.5, shift_step_px=0.5,
                        max_angle_deg=5.0, max_shift_px=2.0) == (1.5, 0.5)


def test_pose_changes_are_symmetry_aware_and_over_kept_particles():
    rng = np.random.default_rng(3)
    n = 200
    euler = np.c_[rng.uniform(-180, 180, n), rng.uniform(10, 170, n), rng.uniform(-180, 180, n)]
    moved = euler.copy()
    moved[:, 0] += 90.0  # a C4 symmetry mate: not a change
    moved[:, 2] += 1.0  # plus 1° in plane
    moved[:10] = [0.0, 90.0, 0.0]  # ten rejected particles jumped anywhere
    keep = np.ones(n, dtype=bool)
    keep[:10] = False
    classes = np.zeros(n, dtype=int)
    new_classes = classes.copy()
    new_classes[:20] = 1
    change, class_change = pose_changes(moved, euler, new_classes, classes, keep, "C4")
    assert change == pytest.approx(1.0, abs=1e-3)
    assert class_change == pytest.approx(0.1)
    angle, shift = spread_summary(np.r_[np.full(10, 90.0), np.linspace(0, 4, 190)],
                                  np.linspace(0, 1, 200), keep)
    assert angle == pytest.approx(3.0, abs=0.03) and shift < 1.0


def test_alignment_resolution_follows_the_data_down_to_nyquist():
    """No --max-resolution: the alignment uses the current resolution down to Nyquist; a
    given cap still caps."""
    from types import SimpleNamespace

    from swiftalign.refinement import RefineConfig, alignment_resolution

    def setup(cap):
        cfg = RefineConfig(initial_resolution_angstrom=30.0, max_resolution_angstrom=cap)
        return SimpleNamespace(config=cfg, nyquist_angstrom=3.2)

    assert RefineConfig(initial_resolution_angstrom=30.0).max_resolution_angstrom is None
    assert alignment_resolution(setup(None), 4.5) == 4.5
    assert alignment_resolution(setup(None), 3.0) == 3.2  # Nyquist
    assert alignment_resolution(setup(8.0), 4.5) == 8.0  # the user's cap


def test_continue_of_a_run_saved_before_auto_local_keeps_it_off(tmp_path):
    """job.json of an older run (max_resolution 8.0, no auto_local): --continue resumes it
    as it was made (cap 8 Å, no automatic local searches)."""
    import json
    from types import SimpleNamespace

    from swiftalign.cli._refine_job import resolve_refine_params

    (tmp_path / "job.json").write_text(json.dumps({"inputs": {}, "options": {
        "max_resolution": 8.0, "symmetry": "C4", "iterations": 2}}))
    params = {"continue_dir": tmp_path, "overwrite": False, "output": None,
              "max_resolution": None, "auto_local": True, "symmetry": "C1", "iterations": 3}
    ctx = SimpleNamespace(params=params, get_parameter_source=lambda name: None)
    merged = resolve_refine_params(ctx)
    assert merged["max_resolution"] == 8.0 and merged["auto_local"] is False
    assert merged["symmetry"] == "C4"


def test_converged_only_after_a_local_iteration_without_gain_or_moves():
    """RELION's rule: no resolution gain (or a Nyquist bound) and poses that moved less
    than the step, with local (finest) sampling; otherwise go on."""
    from swiftalign.autolocal import converged

    base = {"search": "local", "stalled": True, "resolution_is_bound": False,
            "pose_change_deg": 0.3, "class_change_fraction": 0.0, "angular_step_deg": 0.8}
    assert converged(base)
    assert converged({**base, "stalled": False, "resolution_is_bound": True})
    assert not converged({**base, "stalled": False})  # gained a shell
    assert not converged({**base, "search": "global"})  # not yet at the finest sampling
    assert not converged({**base, "pose_change_deg": 0.9})  # poses still move
    assert not converged({**base, "class_change_fraction": 0.2})
    assert not converged({**base, "pose_change_deg": None})
