"""Job folders that cannot be corrupted and clean failures (issue 14, items 5–13).

Each test is a real command run (typer's CliRunner, or a subprocess where a
signal is sent) on 40 simulated 48-px particles, asserting the exit code, the
one-line message and that nothing partial is left at the output path.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from importlib.resources import files
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import swiftalign
from swiftalign.cli.main import app
from swiftalign.errors import InputError, MrcFileError
from swiftalign.jobs import JobLock

MAP = Path(str(files("swiftalign") / "data" / "trpv1_volume.mrc"))
runner = CliRunner()
ALIGN_FAST = ["--resolution", "30", "--angular-step", "15", "--max-shift", "2",
              "--local-rounds", "0", "--weighting", "none", "--symmetry", "C4", "-q"]
REFINE_FAST = ["-r", str(MAP), "--initial-resolution", "40", "--max-resolution", "40",
               "--global-resolution", "40", "--symmetry", "C4", "--repetitions", "1", "-q"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder (the working directory of every command) with ``sim/``: 40 particles."""
    root = tmp_path_factory.mktemp("project")
    cwd = os.getcwd()
    os.chdir(root)  # simulate names its stack from the project folder: sim/particles.mrcs
    try:
        r = runner.invoke(app, ["simulate", str(MAP), "-o", "sim", "-n", "40",
                                "--symmetry", "C4", "--snr-db", "0", "--seed", "3", "-q"])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture
def in_project(project, monkeypatch):
    monkeypatch.chdir(project)
    return project


def _one_line_error(r, *needles):
    """Exit 2, one line starting with ``error:`` holding every needle, no traceback."""
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert "Traceback" not in r.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    """Temporary files, staging folders and lock files under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*")
                  if p.name.endswith((".tmp", ".staging", ".lock")))


def _align(out, *extra, star="sim/particles.star", reference=MAP):
    return runner.invoke(app, ["align", str(star), "-r", str(reference), "-o", str(out),
                               *ALIGN_FAST, *extra])


# 5. locks -------------------------------------------------------------------------------------
def test_second_run_is_refused_naming_the_holder(in_project):
    out = in_project / "locked"
    with JobLock(out, "swiftalign refine other-run", folder=True):
        r = runner.invoke(app, ["refine", "sim/particles.star", *REFINE_FAST, "-o", str(out)])
        line = _one_line_error(r, "locked: in use by `swiftalign refine other-run`",
                               f"pid {os.getpid()}")
        assert "since" in line
        r = _align(out / "a.star")  # a file output has its own lock, the folder's is not taken
        assert r.exit_code == 0, r.output
        with JobLock(out / "b.star", "swiftalign align other"):
            _one_line_error(_align(out / "b.star"), "in use by `swiftalign align other`")
        assert not (out / "b.star").exists() and not (out / "b.log").exists()
    assert sorted(p.name for p in out.iterdir()) == ["a.log", "a.star", "a_angdist.png",
                                                     "a_run.json"]


def test_stale_lock_of_a_dead_process_is_taken_over(in_project):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = in_project / "stale" / "aligned.star"
    out.parent.mkdir()
    lock = out.parent / ".aligned.star.lock"
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid,
                                "started": "yesterday", "command": "swiftalign align crashed"}))
    r = runner.invoke(app, ["align", "sim/particles.star", "-r", str(MAP), "-o", str(out),
                            *[a for a in ALIGN_FAST if a != "-q"]])  # -q: errors only
    assert r.exit_code == 0, r.output
    assert "stale lock" in r.output and "crashed" in r.output
    assert out.exists() and not lock.exists()


def test_new_refine_into_a_non_empty_folder_is_refused(in_project):
    out = in_project / "used"
    (out / "it001").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["refine", "sim/particles.star", *REFINE_FAST, "-o", str(out)])
    _one_line_error(r, "folder is not empty (it001, notes.txt)", f"--continue {out}",
                    "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["it001", "notes.txt"]


# 6. --continue DIR alone -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def refined(project):
    """One completed refinement iteration in ``project/ref`` (~20 s)."""
    cwd = os.getcwd()
    os.chdir(project)
    try:
        r = runner.invoke(app, ["refine", "sim/particles.star", *REFINE_FAST, "--iterations", "1",
                                "-o", "ref"])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    return project / "ref"


def test_continue_refuses_other_or_changed_data_and_options(refined, in_project, tmp_path):
    job = json.loads((refined / "job.json").read_text())
    assert job["options"]["symmetry"] == "C4" and job["options"]["iterations"] == 1
    assert job["fingerprint"]["particles"]["path"] == str(in_project / "sim/particles.star")
    before = sorted(p.name for p in refined.rglob("*"))
    # another particle file with the same particles
    other = in_project / "sim" / "copy.star"
    shutil.copy(in_project / "sim/particles.star", other)
    r = runner.invoke(app, ["refine", str(other), "--continue", str(refined)])
    _one_line_error(r, f"--continue {refined}", "differs from the run's", "particles.star")
    # an option that changes the result
    r = runner.invoke(app, ["refine", "--continue", str(refined), "--symmetry", "C1"])
    _one_line_error(r, "--symmetry C1 differs from the run's (C4)", "--iterations")
    # the stack changed under the run (same size, other header)
    stack = in_project / "sim" / "particles.mrcs"
    saved = stack.read_bytes()
    try:
        with mrcfile.open(stack, "r+") as m:
            m.voxel_size = 5.0
        r = runner.invoke(app, ["refine", "--continue", str(refined), "--iterations", "2"])
        _one_line_error(r, f"stack {stack}", "changed since the run started", "header hash differs")
    finally:
        stack.write_bytes(saved)
    # the particle file changed (one defocus edited)
    star = in_project / "sim" / "particles.star"
    text = star.read_text()
    try:
        star.write_text(text.replace("18012.163025", "18012.163026", 1))
        r = runner.invoke(app, ["refine", "--continue", str(refined), "--iterations", "2"])
        _one_line_error(r, f"particle file {star}", "changed since the run started")
    finally:
        star.write_text(text)
    assert sorted(p.name for p in refined.rglob("*")) == before


@pytest.mark.slow
def test_continue_needs_only_the_folder(refined, in_project):
    """``--continue DIR --iterations 2``: particles, references and options from job.json."""
    r = runner.invoke(app, ["refine", "--continue", str(refined), "--iterations", "2", "-q"])
    assert r.exit_code == 0, r.output
    state = json.loads((refined / "state.json").read_text())
    assert state["iteration"] == 2
    run = json.loads((refined / "it002" / "run.json").read_text())
    assert run["parameters"]["symmetry"] == "C4" and run["parameters"]["iterations"] == 2
    assert not _leftovers(refined)


# 7. image names as RELION writes them --------------------------------------------------------
def test_image_names_relative_to_the_project_folder(in_project, tmp_path):
    elsewhere = tmp_path / "scratch_job"
    elsewhere.mkdir()
    (in_project / "Align").mkdir(exist_ok=True)
    job = in_project / "Align" / "job001"
    if not job.exists():
        job.symlink_to(elsewhere, target_is_directory=True)  # a symlinked job folder
    r = _align("Align/job001/aligned.star")
    assert r.exit_code == 0, r.output
    names = starfile.read(job / "aligned.star")["particles"]["rlnImageName"]
    assert names.str.endswith("@sim/particles.mrcs").all()  # as in the input, from the project
    # absolute input names stay absolute
    blocks = starfile.read("sim/particles.star", always_dict=True)
    assert blocks["particles"]["rlnImageName"].str.endswith("@sim/particles.mrcs").all()
    blocks["particles"]["rlnImageName"] = blocks["particles"]["rlnImageName"].str.replace(
        "@sim/particles.mrcs", f"@{in_project}/sim/particles.mrcs")
    starfile.write(blocks, tmp_path / "abs.star")
    r = _align(job / "abs_aligned.star", star=tmp_path / "abs.star")
    assert r.exit_code == 0, r.output
    names = starfile.read(job / "abs_aligned.star")["particles"]["rlnImageName"]
    assert names.str.endswith(f"@{in_project}/sim/particles.mrcs").all()
    if shutil.which("relion_reconstruct") is None:
        pytest.skip("RELION not installed")
    p = subprocess.run(["relion_reconstruct", "--i", "Align/job001/aligned.star", "--o",
                        "Align/job001/rec.mrc", "--angpix", "4.88", "--sym", "C4"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert mrcfile.read(job / "rec.mrc").shape == (48, 48, 48)


def test_project_relative_through_a_symlink_with_dotdot(tmp_path, monkeypatch):
    """``sim -> data/sim``, name ``../stacks/s.mrcs`` from sim/: the kernel resolves ``..`` in
    data/, so the written name must be ``data/stacks/s.mrcs``, not ``stacks/s.mrcs``."""
    from swiftalign.io.star import project_relative

    (tmp_path / "data" / "sim").mkdir(parents=True)
    (tmp_path / "data" / "stacks").mkdir()
    (tmp_path / "data" / "stacks" / "s.mrcs").write_bytes(b"x")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "sim").symlink_to(tmp_path / "data" / "sim")
    monkeypatch.chdir(tmp_path / "proj")
    name = project_relative(Path("sim/../stacks/s.mrcs"), os.getcwd())
    assert name == "../data/stacks/s.mrcs"
    assert os.path.samefile(name, tmp_path / "data" / "stacks" / "s.mrcs")
    # without "..", the symlinked folder keeps its name (as RELION writes it)
    (tmp_path / "data" / "sim" / "a.mrcs").write_bytes(b"x")
    assert project_relative(tmp_path / "proj" / "sim" / "a.mrcs", os.getcwd()) == "sim/a.mrcs"
    assert project_relative(Path("sim/missing.mrcs"), os.getcwd()) == "sim/missing.mrcs"


# 8. read-only output, disk full: one line, nothing partial -----------------------------------
def test_disk_full_while_plotting_publishes_nothing(in_project, monkeypatch):
    """The issue's case: the plot fails (ENOSPC) after the STAR file was written."""
    from matplotlib.figure import Figure

    def full(self, fname, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(fname))

    monkeypatch.setattr(Figure, "savefig", full)
    out = in_project / "full" / "aligned.star"
    r = _align(out)
    _one_line_error(r, f"cannot write {out.parent}/aligned_angdist.png: no space left on device")
    assert not out.parent.exists()  # no STAR, run.json, log, temporaries: the new folder removed


def _mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                       capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.decode().strip()})")


@pytest.mark.parametrize("options,cause", [("ro,size=1m", "read-only file system"),
                                           ("size=12k", "no space left on device")])
def test_read_only_and_full_disks(in_project, tmp_path, options, cause):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, options)
    try:
        r = _align(disk / "aligned.star")
        _one_line_error(r, f"cannot write {disk}", cause)
        assert list(disk.iterdir()) == []
        if "ro" in options.split(","):  # refused before any work
            r = runner.invoke(app, ["refine", "sim/particles.star", *REFINE_FAST, "-o",
                                    str(disk / "ref")])
            _one_line_error(r, f"cannot write {disk}/ref", cause)
            assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# 9. Ctrl-C ----------------------------------------------------------------------------------
def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(swiftalign.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}


def _interrupt_when(cmd, cwd, ready, timeout_s=300):
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not ready() and proc.poll() is None:
        assert time.monotonic() - t0 < timeout_s
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


def test_sigint_during_align_exits_130_and_leaves_nothing(project):
    out = project / "sigint" / "aligned.star"
    lock = out.parent / ".aligned.star.lock"
    rc, text = _interrupt_when(
        [sys.executable, "-m", "swiftalign", "align", "sim/particles.star", "-r", str(MAP), "-o",
         str(out), *ALIGN_FAST], project, lock.exists)
    assert rc == 130, text
    assert f"interrupted: align → {out}" in " ".join(text.split())
    assert "run it again" in text and "Traceback" not in text
    assert len([ln for ln in text.splitlines() if ln.strip()]) == 1, text  # one line
    assert not out.parent.exists()  # no log, lock, temporaries: the new folder removed


@pytest.mark.slow
def test_sigint_during_refine_says_how_to_resume(project):
    out = project / "sigint_refine"
    rc, text = _interrupt_when(
        [sys.executable, "-m", "swiftalign", "refine", "sim/particles.star", *REFINE_FAST,
         "--iterations", "3", "-o", str(out)], project, (out / "it001").exists)
    assert rc == 130, text
    flat = " ".join(text.split())
    assert f"interrupted: refine into {out}" in flat
    assert f"swiftalign refine --continue {out}" in flat and "Traceback" not in text
    assert not _leftovers(out)
    assert (out / "it001" / "particles.star").exists() and (out / "job.json").exists()


# 10. FIFOs ----------------------------------------------------------------------------------
@pytest.fixture
def alarm():
    """Fail instead of hanging forever if something opens a FIFO."""
    def hung(*_):
        raise AssertionError("hung on a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_fifo_inputs_are_refused_at_once(in_project, tmp_path, alarm):
    fifo = tmp_path / "pipe.star"
    os.mkfifo(fifo)
    out = tmp_path / "o" / "aligned.star"
    _one_line_error(_align(out, star=fifo), f"{fifo}: is a FIFO (named pipe)", "particle file")
    _one_line_error(_align(out, reference=fifo), f"{fifo}: is a FIFO", "MRC file")
    r = runner.invoke(app, ["align", "sim/particles.star", "--index-file", str(fifo), "-o",
                            str(out), "-q"])
    _one_line_error(r, f"{fifo}: is a FIFO", "index file")
    assert not out.exists() and not out.with_suffix(".log").exists()


# 11. index members and map headers checked before reading -----------------------------------
def _bomb_index(path: Path) -> None:
    """A 2 kB index file whose gallery member claims 2 GiB in the zip directory."""
    from swiftalign.alignment import AlignConfig

    config = AlignConfig(resolution_angstrom=30, symmetry="C4", ctf_mode="wiener",
                         weighting="none").model_dump()
    manifest = {"format": "swiftalign-index", "format_version": 2, "config": config,
                "pixel_size_angstrom": 4.88, "box_size": 48, "n_poses": 1000, "n_coeff": 100,
                "sampling": {"n_directions": 10, "n_psi": 10}, "factory": "Flat"}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        zf.writestr("gallery_coeffs.npy", b"\0" * 1000)
    raw = bytearray(path.read_bytes())
    central = raw.rindex(b"PK\x01\x02", 0, raw.rindex(b"gallery_coeffs.npy") + 1)
    raw[central + 24:central + 28] = (2**31).to_bytes(4, "little")  # uncompressed size
    path.write_bytes(bytes(raw))


def test_oversized_index_member_fails_fast_with_little_memory(tmp_path):
    import tracemalloc

    from swiftalign.index_file import INDEX_FORMAT, load_reference_index

    bomb = tmp_path / "bomb.swidx"
    _bomb_index(bomb)
    manifest = json.loads(zipfile.ZipFile(bomb).read("manifest.json"))
    assert manifest["format"] == INDEX_FORMAT and bomb.stat().st_size < 4096
    assert zipfile.ZipFile(bomb).getinfo("gallery_coeffs.npy").file_size == 2**31
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"bomb\.swidx: corrupt index file \(member "
                       r"gallery_coeffs\.npy claims 2,147,483,648 bytes"):
        load_reference_index(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 5 and peak < 50 * 1024**2


def test_oversized_map_is_refused_from_its_header(in_project, tmp_path):
    """A 400³ float map (256 MB, sparse on disk) as a reference for 48-px particles."""
    import tracemalloc

    big = tmp_path / "big.mrc"
    with mrcfile.new(big) as m:
        m.set_data(np.zeros((2, 400, 400), np.float32))
        m.voxel_size = 4.88
    header = bytearray(big.read_bytes()[:1024])
    header[8:12] = np.int32(400).tobytes()  # nz
    header[36:40] = np.int32(400).tobytes()  # mz
    with open(big, "r+b") as f:
        f.write(bytes(header))
        f.truncate(1024 + 4 * 400**3)
    out = tmp_path / "o" / "aligned.star"
    tracemalloc.start()
    r = _align(out, reference=big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    _one_line_error(r, f"{big}: map box 400x400x400 differs from the particle box 48 px",
                    "data not read")
    assert peak < 100 * 1024**2
    assert not out.exists()


# 12. volume stacks and odd mz ----------------------------------------------------------------
@pytest.mark.parametrize("mz,message", [(2, "a stack of 2 volumes (ispg 401, mz 2, nz 4)"),
                                        (3, "mz 3 that does not divide nz 4")])
def test_volume_stack_headers_name_the_file(tmp_path, in_project, mz, message):
    from swiftalign.io.mrc import open_stack

    stack = tmp_path / "vol.mrcs"
    with mrcfile.new(stack) as m:
        m.set_data(np.random.default_rng(0).normal(size=(4, 48, 48)).astype(np.float32))
    with open(stack, "r+b") as f:
        f.seek(36)
        f.write(np.int32(mz).tobytes())
        f.seek(88)
        f.write(np.int32(401).tobytes())
    with pytest.raises(MrcFileError, match=re.escape(message)) as err:
        open_stack(stack)
    assert str(err.value).startswith(f"{stack}: ")
    blocks = starfile.read("sim/particles.star", always_dict=True)
    blocks["particles"] = blocks["particles"].iloc[:4].copy()
    blocks["particles"]["rlnImageName"] = [f"{i}@{stack}" for i in range(1, 5)]
    starfile.write(blocks, tmp_path / "vol.star")
    _one_line_error(_align(tmp_path / "o.star", star=tmp_path / "vol.star"), str(stack), message)


# 13. STAR headers fuzzed --------------------------------------------------------------------
_OPTICS = {  # label: value of optics group 1, 2
    "rlnOpticsGroup": (1, 2), "rlnOpticsGroupName": ("og1", "og2"),
    "rlnImagePixelSize": (1.5, 2.0), "rlnVoltage": (300.0, 200.0),
    "rlnSphericalAberration": (2.7, 2.0), "rlnAmplitudeContrast": (0.1, 0.07),
    "rlnImageSize": (16, 16), "rlnImageDimensionality": (2, 2),
}
_PARTICLE_LABELS = ["rlnImageName", "rlnOpticsGroup", "rlnDefocusU", "rlnAngleRot",
                    "rlnOriginXAngst"]
_N = 4


def _particle_value(label: str, i: int, n_groups: int):
    return {"rlnImageName": f"{i + 1}@s.mrcs", "rlnOpticsGroup": 1 + i % n_groups,
            "rlnDefocusU": 10000.0 + 500 * i, "rlnAngleRot": 10.0 * i,
            "rlnOriginXAngst": 0.5 * i, "rlnMyLabel": f"v{i}"}[label]


@st.composite
def _labels(draw, known: list[str]):
    kept = [lab for lab in known if draw(st.booleans()) or draw(st.booleans())]  # 3/4 kept
    if draw(st.booleans()):
        kept.append("rlnMyLabel")  # unknown to swiftalign (and RELION)
    kept = draw(st.permutations(kept))
    if kept and draw(st.integers(0, 5)) == 0:
        kept = [*kept, draw(st.sampled_from(kept))]  # a duplicated label
    return kept


def _block(name: str, labels: list[str], rows: list[list]) -> str:
    head = "".join(f"_{lab} #{k + 1}\n" for k, lab in enumerate(labels))
    body = "".join(" ".join(str(v) for v in row) + "\n" for row in rows)
    return f"\ndata_{name}\n\nloop_\n{head}{body}"


def _expected_error(optics: list[str], particles: list[str], n_groups: int, optics_first: bool):
    """(block, label) the reader must name, or None when the file is valid."""
    in_file_order = (("optics", optics), ("particles", particles))
    for block, labels in in_file_order if optics_first else in_file_order[::-1]:
        dup = [lab for lab in labels if labels.count(lab) > 1]
        if dup:
            return block, dup[0]
    if "rlnImageName" not in particles:
        return "particles", "rlnImageName"
    if "rlnOpticsGroup" not in optics:
        return "optics", "rlnOpticsGroup"
    if "rlnOpticsGroup" not in particles and n_groups > 1:
        return "particles", "rlnOpticsGroup"
    if "rlnImagePixelSize" not in optics:
        return "optics", "rlnImagePixelSize"
    return None


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(optics=_labels(list(_OPTICS)), particles=_labels(_PARTICLE_LABELS),
       n_groups=st.integers(1, 2), optics_first=st.booleans())
def test_star_header_fuzz(tmp_path, optics, particles, n_groups, optics_first):
    from swiftalign.errors import StarFileError
    from swiftalign.io.star import read_particles

    optics_rows = [[("x" if lab == "rlnMyLabel" else _OPTICS[lab][g]) for lab in optics]
                   for g in range(n_groups)]
    particle_rows = [[_particle_value(lab, i, n_groups) for lab in particles] for i in range(_N)]
    blocks = [_block("optics", optics, optics_rows), _block("particles", particles, particle_rows)]
    path = tmp_path / "fuzz.star"
    path.write_text("".join(blocks if optics_first else blocks[::-1]))
    expected = _expected_error(optics, particles, n_groups, optics_first)
    event(f"error {expected}")
    if expected is not None:
        with pytest.raises(StarFileError) as err:
            read_particles(path)
        message = str(err.value)
        assert str(path) in message and f"data_{expected[0]}" in message, message
        assert expected[1] in message, message
        return
    t = read_particles(path)
    group = np.arange(_N) % n_groups if "rlnOpticsGroup" in particles else np.zeros(_N, int)
    for attribute, label, default in (("pixel_size_angstrom", "rlnImagePixelSize", None),
                                      ("voltage_kv", "rlnVoltage", 300.0),
                                      ("cs_mm", "rlnSphericalAberration", 2.7),
                                      ("amplitude_contrast", "rlnAmplitudeContrast", 0.1)):
        want = (np.array(_OPTICS[label])[group] if label in optics else np.full(_N, default))
        np.testing.assert_allclose(getattr(t, attribute), want, err_msg=attribute)
    for label in particles:
        column = t.particles[label].tolist()
        assert column == [_particle_value(label, i, n_groups) for i in range(_N)], label


# 13. new-user findings (issues 14/15): failing writes, folders left behind, Ctrl-C wording ----
def test_fail_survives_a_log_that_cannot_be_removed(tmp_path, monkeypatch, capsys):
    """A read-only folder: removing the log raises too; still one line and exit 2."""
    import typer

    from swiftalign.cli import _common

    log = tmp_path / "out.log"
    log.write_text("x")

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(_common, "_new_logs", [log])
    with pytest.raises(typer.Exit) as exit_info:
        _common.fail(OSError(errno.EROFS, "Read-only file system", str(log)))
    assert exit_info.value.exit_code == 2
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        f"error: cannot write {log}: read-only file system"]
    assert _common._new_logs == []


@pytest.mark.parametrize("command", ["export", "select"])
def test_export_and_select_into_an_unwritable_place(in_project, tmp_path, command):
    extra = ["--to", "bild"] if command == "export" else ["--top-fraction", "0.5", "--column",
                                                          "rlnAngleRot"]
    name = "out.bild" if command == "export" else "out.star"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    r = runner.invoke(app, [command, "sim/particles.star", *extra, "-o",
                            str(blocker / "sub" / name), "-q"])
    _one_line_error(r, f"cannot access {blocker}/sub: a path component is not a folder")
    disk = tmp_path / "ro"
    _mount_tmpfs(disk, "ro,size=1m")
    try:
        r = runner.invoke(app, [command, "sim/particles.star", *extra, "-o", str(disk / name)])
        _one_line_error(r, f"cannot write {disk}/out.log: read-only file system")
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_refusals_leave_no_new_folders(in_project, tmp_path, alarm):
    """Every refused command removes the -o folder (and parents) it created: nothing partial."""
    fifo = tmp_path / "pipe.mrc"
    os.mkfifo(fifo)
    other = tmp_path / "other.mrc"
    with mrcfile.new(other) as m:
        m.set_data(np.zeros((48, 48, 48), np.float32))
        m.voxel_size = 2.0
    runs = {
        "f1": ["align", str(fifo), "-r", str(MAP), "--resolution", "30", "-o", "f1/a.star"],
        "f3": ["refine", str(fifo), "-r", str(MAP), "--initial-resolution", "40", "-o", "f3"],
        "pp": ["postprocess", str(fifo), str(fifo), "--mask", str(fifo), "-o", "pp"],
        "lr": ["local-resolution", str(fifo), str(fifo), "--mask", str(fifo), "-o", "lr/x"],
        "sm": ["simulate", str(fifo), "-o", "sm"],
        "ppv": ["postprocess", str(MAP), str(other), "--mask", str(MAP), "-o", "ppv"],
        "refsym_C3": ["refine", "sim/particles.star", "-r", str(MAP), "--initial-resolution",
                      "40", "--symmetry", "C3", "-o", "refsym_C3"],
    }
    for folder, args in runs.items():
        r = runner.invoke(app, [*args, "-q"])
        _one_line_error(r)
        assert not (in_project / folder).exists(), (folder, r.output)
    assert "RELION's C3: 3-fold on z" in r.output


def test_sigint_during_simulate_names_it_and_leaves_nothing(project):
    out = project / "sigint_sim" / "sim"
    rc, text = _interrupt_when(
        [sys.executable, "-m", "swiftalign", "simulate", str(MAP), "-o", str(out), "-n",
         "100000", "--no-ctf"], project, (out / "simulate.log").exists)
    assert rc == 130, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text  # no log ERROR line besides
    assert f"interrupted: simulate → {out}" in " ".join(text.split())
    assert not out.parent.exists()


def test_simulate_names_stacks_from_the_project_folder(in_project, tmp_path):
    """As RELION: relion_reconstruct --i sim2/particles.star works from the project folder."""
    r = runner.invoke(app, ["simulate", str(MAP), "-o", "sim2", "-n", "6", "-q"])
    assert r.exit_code == 0, r.output
    names = starfile.read("sim2/particles.star", always_dict=True)["particles"]["rlnImageName"]
    assert names.str.endswith("@sim2/particles.mrcs").all()
    from swiftalign.io import ParticleImages, read_particles

    os.chdir(tmp_path)  # found from another working directory too (the folders above)
    try:
        with ParticleImages(read_particles(in_project / "sim2" / "particles.star")) as images:
            assert images.read(np.array([5])).shape == (1, 48, 48)
    finally:
        os.chdir(in_project)
    if shutil.which("relion_reconstruct") is None:
        pytest.skip("RELION not installed")
    p = subprocess.run(["relion_reconstruct", "--i", "sim2/particles.star", "--o",
                        "sim2/rec.mrc"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.slow
def test_refine_started_with_sigint_ignored_is_not_interrupted(project):
    """A batch job (`cmd &` from a script) inherits SIGINT ignored: refine runs on, as align."""
    out = project / "sigint_ignored"
    proc = subprocess.Popen(
        [sys.executable, "-m", "swiftalign", "refine", "sim/particles.star", *REFINE_FAST,
         "--iterations", "2", "-o", str(out)], cwd=project, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    t0 = time.monotonic()
    while not (out / "job.json").exists() and proc.poll() is None:
        assert time.monotonic() - t0 < 300
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "interrupted" not in text, text
    assert (out / "final" / "particles.star").exists()
