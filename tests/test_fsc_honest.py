"""Honest FSC resolutions: no signal, bounds at Nyquist, nothing beyond the box, rising curves."""

from __future__ import annotations

import numpy as np
import pytest
import starfile

from swiftalign.fsc import (
    NoSignalError,
    auto_solvent_mask,
    estimate_resolution,
    fsc_curve,
    gold_standard_fsc,
    require_signal,
    resolution_at,
    write_fsc_star,
)


def test_independent_noise_maps_have_no_signal():
    rng = np.random.default_rng(0)
    for box in (32, 48, 64):
        a, b = rng.normal(size=(2, box, box, box))
        est = estimate_resolution(fsc_curve(a, b), 0.143, box, 2.0)
        assert est.no_signal and np.isnan(est.resolution_angstrom), box
        assert est.text() == "no signal"
        assert np.isnan(resolution_at(fsc_curve(a, b), 0.5, box, 2.0))


def test_empty_maps_have_no_signal():
    z = np.zeros((32, 32, 32))
    est = estimate_resolution(fsc_curve(z, z), 0.143, 32, 2.0)
    assert est.no_signal
    assert estimate_resolution(np.full(17, np.nan), 0.143, 32, 2.0).no_signal


def test_identical_maps_give_nyquist_as_a_bound(trpv1_map):
    f = fsc_curve(trpv1_map.data, trpv1_map.data)
    est = estimate_resolution(f, 0.143, 48, 4.88)
    assert est.is_bound and not est.no_signal
    assert est.resolution_angstrom == pytest.approx(2 * 4.88)
    assert est.text() == "≤ 9.76 Å"


def test_crossing_is_interpolated_and_never_beyond_the_box():
    f = np.r_[1.0, 0.97, 0.9, 0.5, 0.1, np.zeros(28)]  # box 64
    est = estimate_resolution(f, 0.143, 64, 2.0)
    # between shell 3 (0.5) and 4 (0.1): 3 + 0.357/0.4 = 3.8925
    assert est.resolution_angstrom == pytest.approx(128 / 3.8925, rel=1e-6)
    assert not est.is_bound and est.message is None
    # falls below 0.5 between shells 1 and 2: at most the box (128 Å), never 2× the box
    low = np.r_[1.0, 0.97, 0.2, np.zeros(30)]
    assert estimate_resolution(low, 0.5, 64, 2.0).resolution_angstrom <= 128.0
    assert estimate_resolution(low, 0.5, 64, 2.0).resolution_angstrom == pytest.approx(
        128 / (1 + 0.47 / 0.77))


def test_dip_then_rise_is_warned():
    f = np.r_[1.0, 0.98, 0.95, 0.9, 0.1, 0.05, 0.8, 0.85, 0.9, np.zeros(24)]
    est = estimate_resolution(f, 0.143, 64, 2.0)
    assert est.message is not None and "rises to 0.90" in est.message
    assert est.resolution_angstrom == pytest.approx(128 / (3 + 0.757 / 0.8), rel=1e-4)


def test_gold_standard_on_noise_stops_refinement_and_is_marked(tmp_path):
    rng = np.random.default_rng(1)
    h1, h2 = rng.normal(size=(2, 32, 32, 32)).astype(np.float32)
    mask = auto_solvent_mask((h1 + h2) / 2, 3.0)
    res = gold_standard_fsc(h1, h2, mask, 3.0)
    assert res.no_signal and np.isnan(res.resolution_angstrom)
    assert res.resolution_text() == "no signal"
    with pytest.raises(NoSignalError, match=r"^iteration 3, class 1: no signal"):
        require_signal(res, "iteration 3, class 1")
    write_fsc_star(tmp_path / "fsc.star", res, 3.0, average_map=(h1 + h2) / 2, mask=mask)
    general = starfile.read(tmp_path / "fsc.star", always_dict=True)["general"]
    assert general["rlnFinalResolution"] == 999.0 and general["swiftalignNoSignal"] == 1


def test_bound_is_marked_in_fsc_star_and_plot(trpv1_map, tmp_path):
    from swiftalign.plots import fsc_figure_from_result, fsc_figure_from_star

    m = trpv1_map.data
    mask = auto_solvent_mask(m, 4.88)
    res = gold_standard_fsc(m, m, mask, 4.88)
    assert res.resolution_is_bound and not res.no_signal
    assert res.resolution_text() == "≤ 9.76 Å"
    require_signal(res, "iteration 1")  # passes
    write_fsc_star(tmp_path / "fsc.star", res, 4.88, average_map=m, mask=mask)
    general = starfile.read(tmp_path / "fsc.star", always_dict=True)["general"]
    assert general["swiftalignResolutionIsBound"] == 1 and "swiftalignNoSignal" not in general
    for fig in (fsc_figure_from_result(res, 4.88), fsc_figure_from_star(tmp_path / "fsc.star")):
        texts = [t.get_text() for t in fig.axes[0].texts] + [fig.axes[0].get_title()]
        assert any("≤ 9.76 Å" in t for t in texts)
