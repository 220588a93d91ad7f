"""Consensus, FSC, reconstruction and the refinement loop."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from scipy.spatial.transform import Rotation
from tests.conftest import shared_file
from typer.testing import CliRunner

from swiftalign.cli.main import app
from swiftalign.consensus import consensus
from swiftalign.conventions import matrix_to_euler, origin_angstrom_to_shift_px
from swiftalign.ctf import CtfParams
from swiftalign.evaluate import symmetric_angular_error_deg
from swiftalign.fsc import auto_solvent_mask, fsc_curve, gold_standard_fsc, lowpass, resolution_at
from swiftalign.io import read_map, write_map
from swiftalign.reconstruction import reconstruct
from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset
from swiftalign.symmetry import symmetry_matrices

MAP = Path(str(files("swiftalign") / "data" / "trpv1_volume.mrc"))
runner = CliRunner()


def test_consensus_averages_and_rejects(rng):
    n, reps = 50, 3
    true = Rotation.random(n, random_state=2)
    eul = np.zeros((n, reps, 3))
    for r in range(reps):
        noise = Rotation.from_rotvec(np.radians(1.0) * rng.normal(size=(n, 3)))
        eul[:, r] = matrix_to_euler((noise * true).inv().as_matrix())  # RELION A = R^T
    # particle 0: repetitions disagree wildly
    eul[0, 1] = [10, 80, 30]
    eul[0, 2] = [170, 20, -100]
    shifts = rng.normal(0, 0.2, (n, reps, 2))
    cls = np.zeros((n, reps), dtype=int)
    cons = consensus(eul, shifts, cls, symmetry_group=symmetry_matrices("C1"),
                     angle_tolerance_deg=5.0, shift_tolerance_px=2.0)
    truth = matrix_to_euler(true.inv().as_matrix())
    err = symmetric_angular_error_deg(cons.euler_deg[1:], truth[1:])
    assert np.median(err) < 1.5
    assert not cons.keep[0] and cons.keep[1:].all()


def test_consensus_is_symmetry_aware(rng):
    g = symmetry_matrices("C4")
    base = np.array([[30.0, 60.0, 10.0]])
    a = np.einsum("ij->ij", Rotation.from_euler("ZYZ", base, degrees=True).as_matrix()[0].T)
    reps = np.stack([a, a @ g[1].T, a @ g[2].T])  # symmetry mates of the same pose
    eul = matrix_to_euler(reps)[None]
    cons = consensus(eul, np.zeros((1, 3, 2)), np.zeros((1, 3), dtype=int), symmetry_group=g,
                     angle_tolerance_deg=1.0, shift_tolerance_px=1.0)
    assert cons.keep[0]
    assert symmetric_angular_error_deg(cons.euler_deg, base, "C4")[0] < 1e-4


def _mates_of_random_poses(group: np.ndarray, mate: np.ndarray, rng) -> tuple[np.ndarray, ...]:
    """`(n, 3, 3)` true poses and `(n, R, 3)` euler of repetitions on mates ``mate`` (1° noise)."""
    n, reps = mate.shape
    true = Rotation.random(n, random_state=3).inv().as_matrix()  # RELION A = R^T
    out = []
    for r in range(reps):
        noise = Rotation.from_rotvec(np.radians(1.0) * rng.normal(size=(n, 3))).as_matrix()
        out.append(np.einsum("nij,njk,nlk->nil", noise, true, group[mate[:, r]]))  # noise·A·gᵀ
    return true, matrix_to_euler(np.stack(out, axis=1))


def test_consensus_keeps_mates_of_a_near_symmetry_by_score(rng):
    from swiftalign.consensus import consensus_summary

    n = 60
    c4 = symmetry_matrices("C4")
    # two thirds of the particles: the repetitions on three different C4 mates; the rest
    # on the true pose (2-against-1 cases depend on the mate, the mean being pulled)
    agree = np.arange(n) % 3 == 0
    mate = np.zeros((n, 3), dtype=int)
    mate[~agree] = [rng.permutation([0, k, k % 3 + 1]) for k in rng.integers(1, 4, (~agree).sum())]
    best = np.argmin(mate, axis=1)  # the best-scoring repetition sits on the true pose
    true, eul = _mates_of_random_poses(c4, mate, rng)
    dist = rng.uniform(0.5, 1.0, (n, 3))
    dist[np.arange(n), best] = 0.1
    shifts, cls = np.zeros((n, 3, 2)), np.zeros((n, 3), dtype=int)
    c1 = symmetry_matrices("C1")
    kw = dict(angle_tolerance_deg=5.0, shift_tolerance_px=1.0)
    before = consensus(eul, shifts, cls, symmetry_group=c1, **kw)
    after = consensus(eul, shifts, cls, symmetry_group=c1, distance=dist,
                      near_symmetry_group=c4, **kw)
    assert after.keep.all() and (before.keep == agree).all() and (~agree).sum() > 10
    assert (after.via_near_symmetry == ~agree).all()
    # a particle kept thanks to the near-symmetry takes the best-scoring repetition's pose
    # (its C1 error is small, not only its error up to C4)
    err = symmetric_angular_error_deg(after.euler_deg[~agree], matrix_to_euler(true[~agree]))
    assert np.median(err) < 1.5 and err.max() < 4
    s = consensus_summary(before)
    assert s["rejected_by"] == {"classes": 0, "poses": int((~agree).sum()), "shifts": 0}
    assert s["kept_fraction"] == pytest.approx(agree.mean())
    assert consensus_summary(after)["kept_by_near_symmetry"] == int((~agree).sum())


def test_consensus_without_near_symmetry_is_unchanged_and_gives_reasons(rng):
    n = 40
    _, eul = _mates_of_random_poses(symmetry_matrices("C1"), np.zeros((n, 3), dtype=int), rng)
    eul[0, 1:] = [[10, 80, 30], [170, 20, -100]]  # poses disagree
    shifts = rng.normal(0, 0.2, (n, 3, 2))
    shifts[1, 1:] = [[5.0, 0.0], [-5.0, 3.0]]  # shifts disagree
    cls = np.zeros((n, 3), dtype=int)
    cls[2] = [0, 1, 2]  # classes disagree
    cls[3] = [1, 1, 0]  # majority class 2 (index 1)
    kw = dict(symmetry_group=symmetry_matrices("C1"), angle_tolerance_deg=5.0,
              shift_tolerance_px=1.0)
    a = consensus(eul, shifts, cls, **kw)
    b = consensus(eul, shifts, cls, distance=rng.uniform(size=(n, 3)), **kw)
    for field in ("euler_deg", "shift_yx_px", "class_index", "keep", "reason"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert list(a.reason[:4]) == [2, 3, 1, 0] and a.keep[3:].all() and a.class_index[3] == 1
    assert not a.via_near_symmetry.any()


def test_fsc_of_map_with_itself_is_one(trpv1_map):
    f = fsc_curve(trpv1_map.data, trpv1_map.data)
    np.testing.assert_allclose(f[1:], 1.0, atol=1e-5)


def test_resolution_at_interpolates():
    fsc = np.array([1.0, 0.9, 0.5, 0.1, 0.0])
    # crossing 0.143 between shell 2 (0.5) and 3 (0.1): shell 2 + 0.357/0.4 = 2.8925
    assert resolution_at(fsc, 0.143, 64, 2.0) == pytest.approx(64 * 2.0 / 2.8925, rel=1e-4)
    assert resolution_at(np.ones(5), 0.143, 8, 2.0) == 4.0  # never crosses: Nyquist


def test_lowpass_removes_high_frequencies(trpv1_map):
    lp = lowpass(trpv1_map.data, 20.0, 4.88)
    f = np.abs(np.fft.rfftn(lp))
    n = lp.shape[0]
    k = np.fft.fftfreq(n)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2
                + np.fft.rfftfreq(n)[None, None, :] ** 2)
    assert f[r > 4.88 / 20 + 2 / n].max() < 1e-3 * f.max()


def test_reconstruction_from_true_poses(trpv1_map):
    cfg = SimulationConfig(n_particles=400, snr_db=40.0, seed=1)
    imgs, truth = simulate_particles(trpv1_map, cfg)
    e = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    s = origin_angstrom_to_shift_px(truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(), 4.88)
    ctf = CtfParams(truth.rlnDefocusU, truth.rlnDefocusV, truth.rlnDefocusAngle, 300, 2.7, 0.1)
    vol = reconstruct(imgs, e, s, ctf=ctf, pixel_size_angstrom=4.88)
    f = fsc_curve(vol, trpv1_map.data)
    assert f[1:20].min() > 0.95


def test_chiral_map_reconstructs_itself_not_its_mirror():
    hand = read_map(shared_file("cryodrgn/hand-vol.mrc"))
    data = hand.data[::2, ::2, ::2].copy()  # 32³ is enough and fast
    ref = type(hand)(data, 2.0, hand.path)
    cfg = SimulationConfig(n_particles=300, snr_db=40.0, ctf=False, shift_sigma_px=0.0, seed=4)
    imgs, truth = simulate_particles(ref, cfg)
    e = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    vol = reconstruct(imgs, e, np.zeros((len(e), 2)), ctf=None, pixel_size_angstrom=2.0)

    def cc(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    assert cc(vol, data) > 0.9
    assert cc(vol, data[::-1].copy()) < 0.7


def test_gold_standard_fsc_on_independent_halves(trpv1_map, rng):
    noise = lambda: rng.normal(0, 0.3 * trpv1_map.data.std(), trpv1_map.data.shape)  # noqa: E731
    h1 = trpv1_map.data + noise().astype(np.float32)
    h2 = trpv1_map.data + noise().astype(np.float32)
    mask = auto_solvent_mask((h1 + h2) / 2, 4.88)
    res = gold_standard_fsc(h1, h2, mask, 4.88)
    assert res.masked[1:5].min() > 0.9
    assert 9.76 <= res.resolution_angstrom < 40
    assert res.resolution_05_angstrom >= res.resolution_angstrom


@pytest.fixture(scope="module")
def refine_data(tmp_path_factory, trpv1_map):
    out = tmp_path_factory.mktemp("refine")
    cfg = SimulationConfig(n_particles=400, snr_db=-10.0, symmetry="C4", seed=21)
    imgs, truth = simulate_particles(trpv1_map, cfg)
    star = write_dataset(out / "data", imgs, truth, pixel_size_angstrom=4.88, config=cfg)
    write_map(out / "init30.mrc", lowpass(trpv1_map.data, 30.0, 4.88), 4.88)
    # reconstruction with the true poses, same half sets
    e = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    s = origin_angstrom_to_shift_px(truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(), 4.88)
    ctf = CtfParams(truth.rlnDefocusU, truth.rlnDefocusV, truth.rlnDefocusAngle, 300, 2.7, 0.1)
    half = np.arange(len(e)) % 2
    g = symmetry_matrices("C4")
    maps = [reconstruct(imgs[half == k], e[half == k], s[half == k], ctf=ctf.subset(half == k),
                        pixel_size_angstrom=4.88, symmetry_group=g) for k in (0, 1)]
    gt = gold_standard_fsc(maps[0], maps[1], auto_solvent_mask(sum(maps) / 2, 4.88), 4.88)
    return out, star, gt.resolution_angstrom


def _refine(star, init, out, *extra):
    return runner.invoke(app, ["refine", str(star), "--reference", str(init),
                               "--initial-resolution", "30", "--symmetry", "C4",
                               "--repetitions", "2", "-q", *extra, *(["-o", str(out)] if out else [])])


def test_refinement_reaches_ground_truth_resolution_and_resumes(refine_data):
    out, star, gt_res = refine_data
    full = out / "full"
    r = _refine(star, out / "init30.mrc", full, "--iterations", "2")
    assert r.exit_code == 0, r.output
    state = json.loads((full / "state.json").read_text())
    assert state["resolution_angstrom"] <= 1.2 * gt_res
    for name in ("half1.mrc", "half2.mrc", "map.mrc", "map_unfiltered.mrc", "fsc.star",
                 "fsc.png", "particles.star", "run.json", "mask.mrc",
                 "postprocess/postprocess.mrc", "postprocess/postprocess.star"):
        assert (full / "final" / name).exists(), name
    with mrcfile.open(full / "final" / "map.mrc") as m:
        assert float(m.voxel_size.x) == pytest.approx(4.88, abs=1e-3)
    fsc = starfile.read(full / "final" / "fsc.star", always_dict=True)
    assert {"general", "fsc"} <= set(fsc)
    assert "rlnFourierShellCorrelationCorrected" in fsc["fsc"]
    p = starfile.read(full / "final" / "particles.star", always_dict=True)["particles"]
    assert set(p["rlnRandomSubset"]) == {1, 2}
    assert (p["rlnClassNumber"] == 1).all()

    # interrupted after one iteration, then continued: same result
    part = out / "part"
    assert _refine(star, out / "init30.mrc", part, "--iterations", "1").exit_code == 0
    r = _refine(star, out / "init30.mrc", None, "--iterations", "2", "--continue", str(part))
    assert r.exit_code == 0, r.output
    a = starfile.read(full / "final" / "particles.star", always_dict=True)["particles"]
    b = starfile.read(part / "final" / "particles.star", always_dict=True)["particles"]
    np.testing.assert_allclose(a["rlnAngleRot"], b["rlnAngleRot"], atol=1e-4)
    np.testing.assert_allclose(mrcfile.read(full / "final" / "half1.mrc"),
                               mrcfile.read(part / "final" / "half1.mrc"), atol=1e-5)


@pytest.mark.slow
def test_c1_refinement_of_c4_particles_keeps_symmetry_mates(refine_data):
    """Issue 13.5: --symmetry C1 on C4 particles; repetitions on C4 mates are kept (3–7 min)."""
    out, star, _ = refine_data
    run = out / "c1"
    r = runner.invoke(app, ["refine", str(star), "--reference", str(out / "init30.mrc"),
                            "--initial-resolution", "30", "--symmetry", "C1", "--repetitions",
                            "3", "--iterations", "1", "--index", "Flat", "-q", "-o", str(run)])
    assert r.exit_code == 0, r.output
    h = json.loads((run / "state.json").read_text())["history"][0]
    n = h["kept"] + h["rejected"]
    assert h["near_symmetry"].startswith("near-symmetry C4 about axis (")
    # measured: 93.5 % kept (C4 run: 90.7 %), 31.5 % without the near-symmetry
    assert h["kept_fraction"] > 0.85
    assert (h["kept"] - h["kept_by_near_symmetry"]) / n < 0.5
    assert sum(h["rejected_by"].values()) == h["rejected"]
    p = starfile.read(run / "final" / "particles.star", always_dict=True)["particles"]
    truth = starfile.read(star, always_dict=True)["particles"]
    index = p["rlnImageName"].str.split("@").str[0].astype(int).to_numpy() - 1
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    err = symmetric_angular_error_deg(p[cols].to_numpy(), truth[cols].to_numpy()[index], "C4")
    assert np.median(err) < 8.0  # measured 5.5° (C4 run 5.4°)


def test_resume_after_a_kill_between_state_and_final(refine_data):
    """Reliability case 17 (fast variant; the real SIGKILL test is slow, in
    test_reliability.py): a run killed after saving its last state but while
    replacing final/ (stale final, half-made .final.tmp, temporaries) is repaired
    by --continue without recomputing."""
    from tests.test_reliability import assert_same_final, check_outputs_complete

    out, star, _ = refine_data
    full = out / "full"
    if not (full / "state.json").exists():
        pytest.skip("needs the refinement test's output")
    crash = out / "crash"
    shutil.copytree(full, crash)
    shutil.rmtree(crash / "final")
    shutil.copytree(crash / "it001", crash / "final")  # the previous iteration's final
    shutil.copytree(crash / "it002", crash / ".final.tmp", ignore=shutil.ignore_patterns("*.mrc"))
    (crash / "it002" / ".half1.mrc.x1y2.tmp").write_bytes(b"MRC" * 10)  # a truncated temporary
    r = _refine(star, out / "init30.mrc", None, "--iterations", "2", "--continue", str(crash))
    assert r.exit_code == 0, r.output
    assert check_outputs_complete(crash, 400) > 20
    assert not list(crash.rglob(".*.tmp")) and not (crash / ".final.tmp").exists()
    assert_same_final(full, crash)
    state = json.loads((crash / "state.json").read_text())
    assert state["iteration"] == 2 and len(state["history"]) == 2


@pytest.mark.slow  # one more iteration on the fixture's run: 200 s wall at load 12 on 2 cores
def test_refine_switches_to_local_search_once_poses_are_stable(refine_data):
    """Issue 13 item 3: after two global iterations whose poses moved less than the angular
    step, the third searches locally (reason recorded in the history and run.json), aligns
    at Nyquist (no 8 Å cap) and ends no worse than the global iteration before it."""
    from swiftalign.evaluate import symmetric_angular_error_deg

    out, star, _ = refine_data
    full = out / "full"
    if not (full / "state.json").exists():  # run alone (-m slow): make the two global iterations
        assert _refine(star, out / "init30.mrc", full, "--iterations", "2").exit_code == 0
    auto = out / "auto"
    shutil.copytree(full, auto)
    r = _refine(star, out / "init30.mrc", None, "--iterations", "3", "--continue", str(auto))
    assert r.exit_code == 0, r.output
    hist = json.loads((auto / "state.json").read_text())["history"]
    assert [h["search"] for h in hist] == ["global", "global", "local"]
    assert hist[0]["search_reason"] == "first iteration: no poses yet"
    step = hist[2]["angular_step_deg"]
    assert hist[1]["pose_change_deg"] < step
    assert hist[2]["search_reason"] == (f"poses moved {hist[1]['pose_change_deg']:.2f}° "
                                        f"(< step {step:.2f}°): local")
    assert json.loads((auto / "it003" / "run.json").read_text())["iteration"]["search"] == "local"
    assert hist[2]["alignment_resolution_angstrom"] == pytest.approx(2 * 4.88)  # Nyquist
    assert hist[2]["local_range_deg"] >= step
    # not worse: resolution within a shell, ≥ 90 % kept, poses at least as close to the truth
    assert 48 * 4.88 / hist[2]["resolution_angstrom"] >= 48 * 4.88 / hist[1]["resolution_angstrom"] - 1
    assert hist[2]["kept"] >= 0.9 * 400
    truth = starfile.read(star, always_dict=True)["particles"]
    columns = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    err = [np.median(symmetric_angular_error_deg(np.load(auto / f"it00{i}" / "poses.npy"),
                                                 truth[columns].to_numpy(), "C4"))
           for i in (2, 3)]
    assert err[1] <= err[0] + 0.1, err


@pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="RELION not installed")
def test_relion_reconstruct_agrees_with_our_map(refine_data):
    out, star, _ = refine_data
    full = out / "full"
    if not (full / "state.json").exists():
        pytest.skip("needs the refinement test's output")
    state = json.loads((full / "state.json").read_text())
    # particles.star lists exactly the particles in our maps: RELION runs on it as written,
    # from the project folder (image names are relative to it, as RELION writes them)
    subprocess.run(["relion_reconstruct", "--i", str(full / "final" / "particles.star"),
                    "--o", str(full / "final" / "relion.mrc"), "--ctf", "--sym", "C4"],
                   cwd=Path.cwd(), check=True, capture_output=True)
    ours = mrcfile.read(full / "final" / "map_unfiltered.mrc")
    theirs = mrcfile.read(full / "final" / "relion.mrc")
    with mrcfile.open(full / "final" / "relion.mrc") as m:
        assert float(m.voxel_size.x) == pytest.approx(4.88, abs=1e-3)
    f = fsc_curve(ours, theirs)
    shell = int(np.floor(48 * 4.88 / state["resolution_angstrom"] + 1e-6))
    assert f[1 : shell + 1].min() >= 0.9  # the check
    # map_unfiltered is all kept particles reconstructed together, as relion_reconstruct
    # does: measured ≥ 0.979 at every shell up to Nyquist (0.60 at Nyquist for the mean of
    # the half maps)
    assert f[1:].min() >= 0.95


def test_two_class_classification(tmp_path, trpv1_map):
    big = trpv1_map.data
    small = big.copy()
    small[:, :, 24:] *= 0.0  # the same map with a domain removed
    data = []
    for i, m in enumerate((big, small)):
        ref = type(trpv1_map)(m, 4.88, trpv1_map.path)
        imgs, truth = simulate_particles(ref, SimulationConfig(n_particles=150, snr_db=-5.0,
                                                               seed=40 + i))
        data.append((imgs, truth))
    imgs = np.concatenate([d[0] for d in data])
    truth = __import__("pandas").concat([d[1] for d in data], ignore_index=True)
    star = write_dataset(tmp_path / "d", imgs, truth, pixel_size_angstrom=4.88,
                         config=SimulationConfig())
    write_map(tmp_path / "a.mrc", lowpass(big, 25, 4.88), 4.88)
    write_map(tmp_path / "b.mrc", lowpass(small, 25, 4.88), 4.88)
    r = runner.invoke(app, ["refine", str(star), "-r", str(tmp_path / "a.mrc"), "-r",
                            str(tmp_path / "b.mrc"), "--initial-resolution", "25",
                            "--iterations", "1", "--repetitions", "1", "-q",
                            "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    final = tmp_path / "out" / "final"
    p = starfile.read(final / "particles.star", always_dict=True)["particles"]
    if (final / "particles_rejected.star").exists():
        rejected = starfile.read(final / "particles_rejected.star", always_dict=True)["particles"]
        p = __import__("pandas").concat([p, rejected])
    assert len(p) == 300
    index = p["rlnImageName"].str.split("@").str[0].astype(int).to_numpy() - 1
    truth_class = np.repeat([1, 2], 150)[index]
    assert np.mean(p["rlnClassNumber"].to_numpy() == truth_class) > 0.9
    assert (tmp_path / "out" / "final" / "class2_half1.mrc").exists()


def test_point_insertion_equals_torch_fourier_slice():
    """Inserting only the particle's own N×(N/2+1) samples (then completing the kx = 0 plane
    with Friedel mates) gives torch-fourier-slice's insertion of the zero-filled 2N slice."""
    import torch
    from torch_fourier_slice import insert_central_slices_rfft_3d_multichannel

    from swiftalign.conventions import centred_rfft2, euler_to_matrix
    from swiftalign.reconstruction import backproject, complete_friedel, new_grid

    box, padded, b = 16, 32, 12
    rng = np.random.default_rng(0)
    euler = np.c_[rng.uniform(-180, 180, b), rng.uniform(0, 180, b), rng.uniform(-180, 180, b)]
    euler[:3] = [[0, 0, 0], [0, 90, 0], [90, 90, 90]]  # slices through the kx = 0 plane
    mats = euler_to_matrix(euler)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn((b, box, box), generator=gen)
    spec = centred_rfft2(images - images.mean(dim=(-2, -1), keepdim=True))  # DC 0, as inserted
    ctf = torch.randn((b, box, box // 2 + 1), generator=gen)
    rows_2n = (2 * torch.fft.fftfreq(box, d=1.0 / box).long()) % padded
    cols_2n = 2 * torch.arange(box // 2 + 1)
    chans = torch.zeros((b, 2, padded, padded // 2 + 1), dtype=torch.complex64)
    chans[:, 0, rows_2n[:, None], cols_2n[None, :]] = spec * ctf
    chans[:, 1, rows_2n[:, None], cols_2n[None, :]] = (ctf * ctf).to(torch.complex64)
    want, _ = insert_central_slices_rfft_3d_multichannel(
        torch.fft.fftshift(chans, dim=(-2,)), (padded,) * 3,
        torch.as_tensor(mats.transpose(0, 2, 1), dtype=torch.float32), fftfreq_max=0.5 + 1e-6)
    grid = new_grid(box)
    backproject(grid, images, torch.as_tensor(mats, dtype=torch.float32), torch.zeros(b, 2), ctf)
    got = complete_friedel(grid)
    got = torch.stack([torch.complex(got[0], got[1]), got[2].to(torch.complex64)])
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


def test_continue_refuses_other_options(tmp_path):
    """``--continue`` with options other than the run's (e.g. --weighting none on a weighted
    run, another symmetry) is refused naming them; --iterations may change."""
    import json

    from swiftalign.errors import InputError
    from swiftalign.refinement import RefineConfig, _check_same_parameters

    def _cfg(**kw):
        return RefineConfig(initial_resolution_angstrom=30.0, **kw)

    before = _cfg(symmetry="C4", iterations=2)
    run_json = tmp_path / "out" / "it002" / "run.json"
    run_json.parent.mkdir(parents=True)
    run_json.write_text(json.dumps({"parameters": before.model_dump()}))
    _check_same_parameters(run_json, _cfg(symmetry="C4", iterations=5))
    with pytest.raises(InputError, match=r"weighting = 'noise' \(now 'none'\)") as err:
        _check_same_parameters(run_json, _cfg(symmetry="C4", iterations=3,
                                                      weighting="none"))
    assert "symmetry" not in str(err.value)
    with pytest.raises(InputError, match="symmetry = 'C4'"):
        _check_same_parameters(run_json, _cfg(symmetry="C1"))
