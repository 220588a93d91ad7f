"""B8: peak RSS of ``align`` and ``refine`` against the particle count (``--max-memory`` default).

Data (:mod:`benchmarks.realistic`, the package's projector): GroEL (1MNF, D7) density,
``SWIFTALIGN_B8_BOX`` (128) px at 1.6 Å/px, −15 dB, EMPIAR-10028 defocus; one set of
the largest size, the smaller counts are its first rows (same stack file). Each run is a
child process (``python -m swiftalign.cli.main``, this checkout's ``src``); its peak RSS
is ``ru_maxrss`` from ``os.wait4`` (:func:`benchmarks.b5_realsize.measured_run`).

- ``align --resolution 15 --symmetry D7`` (defaults otherwise: exact search, reference
  CTFs, noise weighting, local refinement);
- ``refine --initial-resolution 30 --symmetry D7 --iterations 1`` from the truth
  low-passed to 30 Å.

Environment: ``SWIFTALIGN_B8_COUNTS`` (``1000,4000``), ``SWIFTALIGN_B8_BOX`` (128),
``SWIFTALIGN_B8_REFINE`` (1; 0 skips refine), ``SWIFTALIGN_B8_SRC`` (the ``src`` folder
to run, default this checkout's: another for a before/after comparison),
``SWIFTALIGN_B8_TAG`` (suffix of the result files), ``SWIFTALIGN_B8_WORK``.
Results: ``results/b8_memory_<box><tag>.{json,md}``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import starfile

from benchmarks.b5_realsize import measured_run
from benchmarks.common import write_results
from benchmarks.realistic import DatasetSpec, build_dataset

COUNTS = [int(c) for c in os.environ.get("SWIFTALIGN_B8_COUNTS", "1000,4000").split(",")]
BOX = int(os.environ.get("SWIFTALIGN_B8_BOX", "128"))
REFINE = os.environ.get("SWIFTALIGN_B8_REFINE", "1") == "1"
PIXEL_SIZE = 1.6
SRC = Path(os.environ.get("SWIFTALIGN_B8_SRC", Path(__file__).resolve().parents[1] / "src"))


def _subset(star: Path, n: int, out: Path) -> Path:
    """The first ``n`` particles of ``star`` (images named absolutely)."""
    blocks = starfile.read(star, always_dict=True)
    particles = blocks["particles"].iloc[:n].copy()
    particles["rlnImageName"] = [f"{name.split('@')[0]}@{star.parent / name.split('@')[1]}"
                                 for name in particles["rlnImageName"]]
    starfile.write({"optics": blocks["optics"], "particles": particles}, out, overwrite=True)
    return out


def _lowpass_truth(truth: Path, out: Path) -> Path:
    from swiftalign.fsc import lowpass
    from swiftalign.io import read_map, write_map

    m = read_map(truth)
    write_map(out, lowpass(m.data, 30.0, m.voxel_size_angstrom), m.voxel_size_angstrom)
    return out


def _run(args: list[str], log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "swiftalign.cli.main", *args, "--quiet"]
    res = measured_run(cmd, log=log, env=env)
    if res["returncode"] != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed: {log.read_text()[-2000:]}")
    return res


def main() -> str:
    work = Path(os.environ.get("SWIFTALIGN_B8_WORK", Path(tempfile.gettempdir()) / "swiftalign_b8"))
    spec = DatasetSpec(model="1MNF", n_particles=max(COUNTS), box=BOX,
                       pixel_size_angstrom=PIXEL_SIZE, snr_db=-15.0, projector="package")
    ds = build_dataset(work / "data", spec)
    ref = _lowpass_truth(ds.truth_map, work / f"ref30_{BOX}.mrc")
    rows = []
    for n in COUNTS:
        star = _subset(ds.star, n, work / f"p{n}_{BOX}.star")
        out = work / f"aligned{n}_{BOX}.star"
        out.unlink(missing_ok=True)
        res = _run(["align", str(star), "--reference", str(ds.truth_map), "--resolution", "15",
                    "--symmetry", "D7", "-o", str(out)], work / f"align{n}.log")
        rows.append({"command": "align", "box": BOX, "particles": n, "wall_s": res["wall_s"],
                     "peak_rss_mb": res["peak_rss_mb"]})
        print(rows[-1], flush=True)
        if REFINE:
            outdir = work / f"refine{n}_{BOX}"
            res = _run(["refine", str(star), "--reference", str(ref), "--initial-resolution",
                        "30", "--symmetry", "D7", "--iterations", "1", "-o", str(outdir),
                        "--overwrite"], work / f"refine{n}.log")
            rows.append({"command": "refine (1 it.)", "box": BOX, "particles": n,
                         "wall_s": res["wall_s"], "peak_rss_mb": res["peak_rss_mb"]})
            print(rows[-1], flush=True)
    columns = [("command", "command", "s"), ("box", "box (px)", "d"),
               ("particles", "particles", "d"), ("wall_s", "wall (s)", ".1f"),
               ("peak_rss_mb", "peak RSS (MB)", ".0f")]
    tag = os.environ.get("SWIFTALIGN_B8_TAG", "")
    return write_results(f"b8_memory_{BOX}{tag}", rows, columns)


if __name__ == "__main__":
    print(main())
