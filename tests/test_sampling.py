"""Pose sampling steps (thesis eq. 4.20–4.21) and the shift grid they give."""
from __future__ import annotations

import numpy as np
import pytest

from swiftalign.alignment import AlignConfig, make_sampling
from swiftalign.sampling import shift_grid_px, shift_step_px


def test_low_resolution_shift_grid_samples_the_search_range():
    """30 Å at 1.6 Å/px: the thesis step (9.4 px) exceeds the 8 px range and its grid
    would hold only the zero shift; the capped step (4 px) samples the disc to its edge."""
    assert shift_step_px(30.0, 1.6) == pytest.approx(9.375)
    assert len(shift_grid_px(8.0, shift_step_px(30.0, 1.6))) == 1  # the old behaviour
    sampling = make_sampling(AlignConfig(resolution_angstrom=30.0, max_shift_px=8.0), 1.6, 160)
    assert sampling.shift_step_px == pytest.approx(4.0)
    grid = shift_grid_px(sampling.max_shift_px, sampling.shift_step_px)
    assert len(grid) == 13  # 0, ±4, ±8 on each axis and the four (±4, ±4)
    assert np.hypot(*grid.T).max() == pytest.approx(8.0)
    # every shift in the range is within one step of a grid point (zero shift alone: 8 px)
    rng = np.random.default_rng(0)
    r, a = 8.0 * np.sqrt(rng.uniform(size=2000)), rng.uniform(0, 2 * np.pi, 2000)
    pts = np.stack([r * np.sin(a), r * np.cos(a)], axis=1)
    nearest = np.linalg.norm(pts[:, None] - grid[None], axis=-1).min(axis=1)
    assert nearest.max() <= 4.0  # measured 3.3 px
    assert np.hypot(*pts.T).max() > 7.9


def test_high_resolution_shift_step_is_the_thesis_step():
    """Below the cap the step stays Tmax / (2·Ts) (6 Å at 1.6 Å/px: 1.875 px)."""
    assert shift_step_px(6.0, 1.6, 8.0) == pytest.approx(1.875)
    sampling = make_sampling(AlignConfig(resolution_angstrom=6.0, max_shift_px=8.0), 1.6, 160)
    assert sampling.shift_step_px == pytest.approx(1.875)
    # an explicit step is the user's choice, capped or not
    explicit = make_sampling(AlignConfig(resolution_angstrom=30.0, max_shift_px=8.0,
                                         shift_step_px=5.0), 1.6, 160)
    assert explicit.shift_step_px == 5.0
    assert shift_step_px(30.0, 1.6, 0.0) == pytest.approx(9.375)  # no search range: no cap
