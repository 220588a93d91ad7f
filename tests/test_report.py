"""Plots, progress bars, run.json, the HTML report and RELION round trips (fsc.star, relion_refine)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html import escape as html_escape
from importlib.resources import files
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from rich.console import Console
from tests.conftest import shared_file
from typer.testing import CliRunner

from swiftalign.cli.main import app

MAP = Path(str(files("swiftalign") / "data" / "trpv1_volume.mrc"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    r = runner.invoke(app, ["simulate", str(MAP), "-o", str(out), "-n", "48", "--symmetry", "C4",
                            "--snr-db", "0", "--seed", "5", "-q"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def align_dir(sim, tmp_path_factory):
    out = tmp_path_factory.mktemp("align")
    r = runner.invoke(app, ["align", str(sim / "particles.star"), "-r", str(MAP), "--resolution",
                            "30", "--symmetry", "C4", "--index", "Flat", "-o",
                            str(out / "aligned.star"), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", str(out / "aligned.star"), "--truth",
                            str(sim / "particles.star"), "--symmetry", "C4", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def refine_dir(sim, tmp_path_factory):
    """One coarse refinement iteration, run through the library with a progress recorder."""
    from swiftalign.cli._common import run_record
    from swiftalign.fsc import lowpass
    from swiftalign.io import read_map, read_particles
    from swiftalign.io.particles import open_usable_particles
    from swiftalign.refinement import RefineConfig, run_refinement

    out = tmp_path_factory.mktemp("refine")
    ref = read_map(MAP)
    ref = type(ref)(lowpass(ref.data, 40.0, 4.88), 4.88, ref.path)
    table, images = open_usable_particles(read_particles(sim / "particles.star"),
                                          max_bad_fraction=0.01)
    steps: list[tuple[str, int, int]] = []
    cfg = RefineConfig(initial_resolution_angstrom=40, max_resolution_angstrom=40, symmetry="C4",
                       repetitions=1, iterations=1, max_shift_px=4, index="Flat")
    run_refinement(table, images, [ref], out, cfg, progress=lambda *a: steps.append(a),
                   record=run_record(command="refine", device="cpu"))
    images.close()
    return out, steps


def _pngs_in(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


# --- progress bars and run.json ------------------------------------------------------------

def test_progress_bars_show_rates_on_a_terminal_only(monkeypatch):
    from swiftalign.cli import _common

    buf = io.StringIO()
    monkeypatch.setattr(_common, "console", Console(file=buf, force_terminal=True, width=140))
    with _common.progress_bars(quiet=False) as progress:
        assert progress is not None
        progress("reconstruction", 50, 100)
        progress("reconstruction", 100, 100)
        progress("populate index", 10, 20)
        progress("populate index", 5, 20)  # restarts (next half set): no error, fresh rate
    text = buf.getvalue()
    assert "particles/s" in text and "poses/s" in text
    with _common.progress_bars(quiet=True) as progress:
        assert progress is None
    monkeypatch.setattr(_common, "console", Console(file=io.StringIO()))  # not a TTY
    with _common.progress_bars(quiet=False) as progress:
        assert progress is None


def test_run_record_has_machine_section():
    from swiftalign.cli._common import run_record

    rec = run_record(device="cpu", command="x", parameters={"seed": 3})
    m = rec["machine"]
    for key in ("hostname", "platform", "cpu_count", "torch", "faiss", "device"):
        assert m[key] not in (None, ""), key
    assert m["device"] == "cpu" and rec["parameters"]["seed"] == 3 and rec["command_line"]


def test_refinement_reports_reconstruction_progress(refine_dir):
    _, steps = refine_dir
    recon = [s for s in steps if s[0] == "reconstruction"]
    assert recon and recon[-1][1] == recon[-1][2] > 0  # reaches its total (kept particles)
    assert ("iterations", 1, 1) in steps
    assert {"particles", "projections"} <= {s[0] for s in steps}


# --- plots ---------------------------------------------------------------------------------

def test_fsc_plot_of_relion_postprocess_marks_thresholds_and_resolution():
    from swiftalign.plots import fsc_figure_from_star, png_bytes

    path = shared_file("starfile/postprocess.star")
    fig = fsc_figure_from_star(path)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    for label in ("unmasked", "masked", "phase-randomised (masked)", "corrected"):
        assert label in labels
    hlines = {round(float(line.get_ydata()[0]), 3) for line in ax.get_lines()
              if len(set(line.get_ydata())) == 1 and line.get_label() not in labels[:4]}
    assert {0.143, 0.5} <= hlines
    texts = [t.get_text() for t in ax.texts]
    at_0143 = [float(t.split()[0]) for t in texts if t.endswith("Å")]
    final = starfile.read(path, always_dict=True)["general"]["rlnFinalResolution"]
    assert min(abs(r - final) for r in at_0143) < 0.5  # RELION's 16.36 Å, to one shell
    assert png_bytes(fig).startswith(PNG_MAGIC)


def test_angular_distribution_counts_every_particle(rng):
    from swiftalign.plots import angular_distribution_figure

    rot = rng.uniform(-180, 180, 1000)
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, 1000)))
    fig = angular_distribution_figure(rot, tilt)
    counts = fig.axes[0].collections[0].get_array()
    assert counts.sum() == 1000
    # equal-area bins: a uniform sphere gives no strong pole-to-equator trend
    assert counts.filled(0).std() / counts.filled(0).mean() < 0.6


def test_pose_error_histograms_mark_medians():
    from swiftalign.plots import pose_error_figure

    fig = pose_error_figure(np.array([1.0, 2.0, 3.0, 50.0]), np.array([0.5, 1.0, 1.5, 2.0]),
                            angular_step_deg=4.0)
    legends = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert "median 2.50" in legends and "median 1.25" in legends and "ΔΦ 4.00" in legends


# --- outputs of the commands ---------------------------------------------------------------

def test_align_and_evaluate_write_plots_and_run_json(align_dir):
    for name in ("aligned_angdist.png", "aligned_errors.png"):
        assert (align_dir / name).read_bytes().startswith(PNG_MAGIC), name
    run = json.loads((align_dir / "aligned_run.json").read_text())
    assert run["machine"]["device"] == "cpu" and run["parameters"]["seed"] == 0
    assert Path(run["outputs"]["particles"]) == (align_dir / "aligned.star").resolve()
    ev = json.loads((align_dir / "aligned_evaluate_run.json").read_text())
    assert ev["command"] == "evaluate" and "machine" in ev and ev["summary"]["n_particles"] == 48
    errors = json.loads((align_dir / "aligned_evaluate.json").read_text())
    assert len(errors["angular_error_deg"]) == 48


def test_simulate_writes_run_json_and_log(sim):
    run = json.loads((sim / "run.json").read_text())
    assert run["command"] == "simulate" and run["parameters"]["seed"] == 5
    assert run["timings_s"]["wall"] > 0 and "hostname" in run["machine"]
    assert (sim / "simulate.log").exists()


def test_refinement_writes_plots_and_timings(refine_dir):
    out, _ = refine_dir
    for name in ("summary.png", "it001/angdist.png", "it001/fsc.png", "final/angdist.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    entry = json.loads((out / "it001" / "run.json").read_text())["iteration"]
    assert {"alignment", "reconstruction", "fsc_and_output"} <= set(entry["timings_s"])
    # the finer split of each iteration's steps outside the alignment
    t = entry["timings_s"]
    assert {"reconstruct_insert", "reconstruct_maps", "auto_mask", "fsc", "noise",
            "write"} <= set(t)
    assert t["reconstruct_insert"] + t["reconstruct_maps"] <= t["reconstruction"] + 1e-6
    assert t["auto_mask"] + t["fsc"] <= t["fsc_and_maps"] + 1e-6


# --- the report ----------------------------------------------------------------------------

def _report(run_dir: Path) -> str:
    r = runner.invoke(app, ["report", str(run_dir), "-q"])
    assert r.exit_code == 0, r.output
    html = (run_dir / "report.html").read_text()
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r'(src|href)="(?!data:)', html)
    assert "http://" not in html and "https://" not in html
    assert json.loads((run_dir / "report_run.json").read_text())["command"] == "report"
    return html


def test_report_of_align_folder(align_dir):
    html = _report(align_dir)
    pngs = _pngs_in(html)
    assert len(pngs) == 2 and all(p.startswith(PNG_MAGIC) for p in pngs)  # angdist + errors
    assert "Alignment: aligned.star" in html and "resolution_angstrom" in html
    assert "hostname" in html and "angular error (°)" in html


def test_report_of_refine_outdir(refine_dir):
    out, _ = refine_dir
    html = _report(out)
    pngs = _pngs_in(html)
    # summary, final map slices, FSC, angdist
    assert len(pngs) == 4 and all(p.startswith(PNG_MAGIC) for p in pngs)
    assert "Central slices of the sharpened, masked map" in html
    assert ">None<" not in html and ">nan<" not in html
    state = json.loads((out / "state.json").read_text())
    h = state["history"][0]
    row = re.search(r"<tr><td>1</td>(.*?)</tr>", html).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[0] == "global: first iteration: no poses yet"  # which search ran and why
    assert cells[2] == f"{h['resolution_angstrom']:.2f}"
    total = h["kept"] + h["rejected"]
    assert cells[4:6] == [f"{h['kept']} ({100 * h['kept'] / total:.1f} %)", str(h["rejected"])]
    by = h["rejected_by"]
    assert sum(by.values()) == h["rejected"] and h["kept_fraction"] == h["kept"] / total
    assert cells[6] == f"{by['classes']} / {by['poses']} / {by['shifts']}"
    near = h["near_symmetry"]  # at 40 Å the C4 TRPV1 map is C8-like (CC 0.92)
    assert cells[7] == ("none" if near is None else
                        html_escape(f"{near}; kept thanks to it: {h['kept_by_near_symmetry']}"))
    assert "initial_resolution_angstrom" in html  # parameters from run.json


def test_report_refuses_a_folder_without_a_run(tmp_path):
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "no swiftalign run found" in text and "Traceback" not in text
    assert not (tmp_path / "report.html").exists()
    r = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "not a folder" in " ".join(r.output.split())


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_CHECK = ("<script>window.addEventListener('load',function(){var im=document.images,ok=0;"
          "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}"
          "document.body.setAttribute('data-images-ok',ok+'/'+im.length);});</script>")


def _rendered_images(html_path: Path, tmp_path: Path) -> tuple[int, int]:
    """Open a copy of the page, with a checking script, in headless Chromium."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    check = tmp_path / "check.html"
    check.write_text(html_path.read_text().replace("</body>", _CHECK + "</body>"))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", check.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    m = re.search(r'data-images-ok="(\d+)/(\d+)"', dom)
    assert m, "the checking script did not run"
    return int(m.group(1)), int(m.group(2))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_reports_render_in_chromium(align_dir, refine_dir, tmp_path):
    out, _ = refine_dir
    for i, run_dir in enumerate((align_dir, out)):
        _report(run_dir)
        ok, total = _rendered_images(run_dir / "report.html", tmp_path / str(i))
        assert total >= 2 and ok == total
    # control: a broken image is detected
    broken = tmp_path / "broken.html"
    broken.write_text('<html><body><img src="data:image/png;base64,AAAA"></body></html>')
    assert _rendered_images(broken, tmp_path / "b") == (0, 1)


# --- RELION round trips --------------------------------------------------------------------

def _relion_blocks(path: Path) -> dict:
    return starfile.read(path, always_dict=True)


def test_fsc_star_has_relion_postprocess_blocks_and_columns(tmp_path, trpv1_map, rng):
    from swiftalign.fsc import auto_solvent_mask, gold_standard_fsc, write_fsc_star

    m = trpv1_map.data
    h1 = (m + rng.normal(0, m.std(), m.shape)).astype(np.float32)
    h2 = (m + rng.normal(0, m.std(), m.shape)).astype(np.float32)
    mask = auto_solvent_mask((h1 + h2) / 2, 4.88)
    write_fsc_star(tmp_path / "fsc.star", gold_standard_fsc(h1, h2, mask, 4.88), 4.88,
                   average_map=(h1 + h2) / 2, mask=mask)
    ours = _relion_blocks(tmp_path / "fsc.star")
    relion308 = _relion_blocks(shared_file("starfile/postprocess.star"))
    assert list(ours) == ["general", "fsc", "guinier"] == list(relion308)
    for block in ("fsc", "guinier"):
        assert set(relion308[block].columns) <= set(ours[block].columns), block
        for col in relion308[block].columns:
            assert ours[block][col].dtype == relion308[block][col].dtype, col
    assert set(relion308["general"]) - {"rlnMaskName"} <= set(ours["general"])

    if shutil.which("relion_postprocess") is None:
        pytest.skip("relion_postprocess not installed: compared with RELION 3.0.8's file only")
    for name, data in (("half1.mrc", h1), ("half2.mrc", h2), ("mask.mrc", mask)):
        with mrcfile.new(tmp_path / name, overwrite=True) as f:
            f.set_data(data.astype(np.float32))
            f.voxel_size = 4.88
    (tmp_path / "pp").mkdir()
    subprocess.run(["relion_postprocess", "--i", "half1.mrc", "--mask", "mask.mrc", "--angpix",
                    "4.88", "--o", "pp/post"], cwd=tmp_path, check=True, capture_output=True)
    theirs = _relion_blocks(tmp_path / "pp" / "post.star")
    assert list(ours) == list(theirs)
    # RELION's labels in RELION's order; our own flags (swiftalign…, skipped by RELION's
    # reader) only where set, e.g. a resolution that is only a bound
    assert [c for c in ours["general"] if not c.startswith("swiftalign")] == list(theirs["general"])
    for block in ("fsc", "guinier"):
        assert list(ours[block].columns) == list(theirs[block].columns), block
        assert (ours[block].dtypes == theirs[block].dtypes).all(), block
        assert len(ours[block]) == len(theirs[block]), block
    assert ours["general"]["rlnParticleBoxFractionSolventMask"] == pytest.approx(
        theirs["general"]["rlnParticleBoxFractionSolventMask"], rel=1e-5)
    np.testing.assert_allclose(ours["guinier"]["rlnLogAmplitudesOriginal"],
                               theirs["guinier"]["rlnLogAmplitudesOriginal"], atol=1e-4)
    np.testing.assert_allclose(ours["fsc"]["rlnAngstromResolution"],
                               theirs["fsc"]["rlnAngstromResolution"], rtol=1e-5)
    # FSC of the same maps: shell binning differs slightly between implementations
    assert np.abs(ours["fsc"]["rlnFourierShellCorrelationUnmaskedMaps"]
                  - theirs["fsc"]["rlnFourierShellCorrelationUnmaskedMaps"]).max() < 0.1


@pytest.fixture(scope="module")
def relion_refine_star(sim):
    """A data.star written by relion_refine_mpi (1 iteration, gold standard, 15° sampling)."""
    if shutil.which("relion_refine_mpi") is None or shutil.which("mpirun") is None:
        pytest.skip("relion_refine_mpi / mpirun not installed")
    shutil.copy(MAP, sim / "map.mrc")
    (sim / "rr").mkdir(exist_ok=True)
    subprocess.run(
        ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi",
         "--i", "particles.star", "--o", "rr/run", "--ref", "map.mrc", "--ini_high", "30",
         "--iter", "1", "--K", "1", "--sym", "C1", "--particle_diameter", "200", "--ctf",
         "--firstiter_cc", "--flatten_solvent", "--zero_mask", "--oversampling", "1",
         "--healpix_order", "1", "--offset_range", "4", "--offset_step", "2", "--j", "1",
         "--split_random_halves", "--pad", "1", "--dont_combine_weights_via_disc", "--pool", "10"],
        cwd=sim, check=True, capture_output=True, timeout=300,
    )
    return sim / "rr" / "run_it001_data.star"


def test_relion_refine_poses_read_in_our_conventions(relion_refine_star, sim):
    r = runner.invoke(app, ["evaluate", str(relion_refine_star), "--truth",
                            str(sim / "particles.star"), "--symmetry", "C4", "--json",
                            str(sim / "relion_vs_truth.json"), "-q"])
    assert r.exit_code == 0, r.output
    s = json.loads((sim / "relion_vs_truth.json").read_text())["summary"]
    # RELION's 15° grid after one iteration (measured 11–17°); a convention mismatch gives
    # tens of degrees and pixels off
    assert s["angular_error_deg"]["median"] < 25.0
    assert s["shift_error_px"]["median"] < 1.0


def test_align_and_refine_accept_relion_refine_star(relion_refine_star, tmp_path):
    theirs = _relion_blocks(relion_refine_star)["particles"]
    out = tmp_path / "aligned.star"
    r = runner.invoke(app, ["align", str(relion_refine_star), "-r", str(MAP), "--resolution", "40",
                            "--symmetry", "C4", "--index", "Flat", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    ours = _relion_blocks(out)["particles"]
    for col in ("rlnRandomSubset", "rlnGroupNumber", "rlnNormCorrection",
                "rlnMaxValueProbDistribution"):
        np.testing.assert_array_equal(ours[col], theirs[col], err_msg=col)
    r = runner.invoke(app, ["refine", str(relion_refine_star), "-r", str(MAP),
                            "--initial-resolution", "40", "--max-resolution", "40", "--symmetry",
                            "C4", "--iterations", "1", "--repetitions", "1", "--max-shift", "4",
                            "-o", str(tmp_path / "ref"), "-q"])
    assert r.exit_code == 0, r.output
    refined = _relion_blocks(tmp_path / "ref" / "final" / "particles.star")["particles"]
    np.testing.assert_array_equal(refined["rlnRandomSubset"], theirs["rlnRandomSubset"])


def test_relion_project_relative_image_names(sim, tmp_path, monkeypatch):
    """RELION names stacks from the project folder (Refine3D/job010/run_data.star → Extract/…)."""
    from swiftalign.io import ParticleImages, read_particles

    project = tmp_path / "project"
    (project / "Extract" / "job005").mkdir(parents=True)
    (project / "Refine3D" / "job010").mkdir(parents=True)
    shutil.copy(sim / "particles.mrcs", project / "Extract" / "job005" / "particles.mrcs")
    blocks = starfile.read(sim / "particles.star", always_dict=True)
    idx = blocks["particles"]["rlnImageName"].str.split("@").str[0]
    blocks["particles"]["rlnImageName"] = idx + "@Extract/job005/particles.mrcs"
    star = project / "Refine3D" / "job010" / "run_data.star"
    starfile.write(blocks, star)
    monkeypatch.chdir(tmp_path)  # not the project folder: found from the folders above the STAR
    table = read_particles(star)
    with ParticleImages(table) as images:
        np.testing.assert_array_equal(images.read(np.array([3])),
                                      mrcfile.read(sim / "particles.mrcs")[3:4])


def test_report_shows_local_resolution_and_one_angular_scale(refine_dir, tmp_path):
    import shutil

    from swiftalign.plots import angular_distribution_figure

    out = tmp_path / "refine"
    shutil.copytree(refine_dir[0], out)
    final = out / "final"
    r = runner.invoke(app, ["local-resolution", str(final / "half1.mrc"), str(final / "half2.mrc"),
                            "--mask", str(final / "mask.mrc"), "-o", str(out / "local_resolution"),
                            "--sampling", "40", "-q"])
    assert r.exit_code == 0, r.output
    html = _report(out)
    assert len(_pngs_in(html)) == 6  # + local-resolution histogram and coloured slices
    assert "Local resolution (windowed FSC 0.143)" in html
    # one colour scale: the same max_count gives the same colour limits whatever the data
    a = angular_distribution_figure(np.zeros(10), np.full(10, 90.0), max_count=50)
    b = angular_distribution_figure(np.zeros(3), np.full(3, 90.0), max_count=50)
    lims = [f.axes[0].collections[0].norm for f in (a, b)]
    assert (lims[0].vmin, lims[0].vmax) == (lims[1].vmin, lims[1].vmax) == (1, 50)


def test_fsc_plot_has_angstrom_ticks_and_nyquist_line():
    from swiftalign.plots import fsc_figure

    freq = np.arange(25) / (48 * 1.2)
    fig = fsc_figure(freq, {"corrected": np.linspace(1, 0, 25)})
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "Nyquist (2.40 Å)" in labels
    top = fig.axes[1]
    ticks = [t.get_text() for t in top.get_xticklabels()]
    assert "10" in ticks and "2.5" in ticks and top.get_xlabel() == "resolution (Å)"
    np.testing.assert_allclose(top.get_xticks()[ticks.index("10")], 0.1)
