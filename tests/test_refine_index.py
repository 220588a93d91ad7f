"""Refinement (issue 3): one FAISS index trained per iteration (per half and class) on the
references of all repetitions, populated and queried per repetition; the poses are as good as
with an index trained for each repetition."""

from __future__ import annotations

import numpy as np
import pytest
import starfile

from swiftalign import search
from swiftalign.alignment import AlignConfig, align_particles, build_reference_set, index_settings
from swiftalign.evaluate import symmetric_angular_error_deg
from swiftalign.fsc import lowpass
from swiftalign.io import MapData, ParticleImages, read_particles
from swiftalign.refinement import RefineConfig, run_refinement
from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset


@pytest.fixture(scope="module")
def data(trpv1_map, tmp_path_factory):
    out = tmp_path_factory.mktemp("refidx")
    cfg = SimulationConfig(n_particles=60, snr_db=-5.0, symmetry="C4", shift_sigma_px=1.0,
                           seed=5)
    imgs, truth = simulate_particles(trpv1_map, cfg)
    star = write_dataset(out / "d", imgs, truth, pixel_size_angstrom=4.88, config=cfg)
    init = MapData(lowpass(trpv1_map.data, 40.0, 4.88), 4.88, trpv1_map.path)
    return out, star, truth, init


def _run(out, star, init, index, monkeypatch):
    calls = {"train": 0, "populate": 0}
    train, populate = search._faiss_train, search.populate_index

    def counting_train(*a, **kw):
        calls["train"] += 1
        return train(*a, **kw)

    def counting_populate(*a, **kw):
        calls["populate"] += 1
        return populate(*a, **kw)

    monkeypatch.setattr(search, "_faiss_train", counting_train)
    monkeypatch.setattr(search, "populate_index", counting_populate)
    table = read_particles(star)
    cfg = RefineConfig(initial_resolution_angstrom=40.0, global_resolution_angstrom=40.0,
                       max_resolution_angstrom=20.0, symmetry="C4", repetitions=2,
                       iterations=1, max_shift_px=3.0, index=index, seed=3)
    with ParticleImages(table) as images:
        run_refinement(table, images, [init], out / index.replace(",", "_"), cfg)
    p = starfile.read(out / index.replace(",", "_") / "final" / "particles.star",
                      always_dict=True)["particles"]
    return calls, p


def test_one_training_per_iteration_and_half(data, monkeypatch):
    out, star, truth, init = data
    calls, p = _run(out, star, init, "IVF16,PQ16x4fs", monkeypatch)
    # 1 iteration × 2 halves × 1 class trainings (one per repetition before: 4);
    # each of the 2 repetitions of each half populated and queried
    assert calls == {"train": 2, "populate": 4}
    # particles.star lists the kept particles (the ones in the maps)
    rows = p["rlnImageName"].str.split("@").str[0].astype(int).to_numpy() - 1
    true_e = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()[rows]
    err = symmetric_angular_error_deg(
        p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), true_e, "C4")
    assert len(p) > 0.6 * len(truth)
    assert np.median(err) < 9.8  # ΔΦ at 40 Å


def test_shared_training_finds_the_poses_of_own_training(trpv1_map, data):
    """Each repetition's gallery queried through the index trained on both galleries finds
    the exact search's poses as often as an index trained on that gallery alone."""
    _, star, truth, _ = data
    table = read_particles(star)

    def cfg(seed, index):
        return AlignConfig(resolution_angstrom=25.0, symmetry="C4", angular_step_deg=12.0,
                           max_shift_px=4.0, index=index, local_rounds=0, seed=seed,
                           weighting="none")

    cfgs = [cfg(s, "IVF16,PQ16x4fs") for s in (1, 2)]
    refsets = [build_reference_set(trpv1_map, c, pixel_size_angstrom=4.88) for c in cfgs]
    shared = search.train_index([r.gallery for r in refsets], index_settings(cfgs[0]),
                                n_particles=len(table))
    true_e = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    matches = {"own": 0, "pooled": 0}
    errors = {"own": [], "pooled": []}
    with ParticleImages(table) as images:
        for seed, refset, c in zip((1, 2), refsets, cfgs, strict=True):
            flat = cfg(seed, "Flat")
            exact = align_particles(table, images, build_reference_set(
                trpv1_map, flat, pixel_size_angstrom=4.88), flat).euler_deg[:, 0]
            for name, trained in (("own", None), ("pooled", shared)):
                e = align_particles(table, images, refset, c, trained_index=trained).euler_deg
                matches[name] += int(np.all(np.isclose(e[:, 0], exact), axis=1).sum())
                errors[name].append(symmetric_angular_error_deg(e[:, 0], true_e, "C4"))
    assert matches["pooled"] >= matches["own"] - 3  # of 120 alignments
    assert matches["pooled"] >= 100
    assert np.median(errors["pooled"]) <= np.median(errors["own"]) + 0.5
