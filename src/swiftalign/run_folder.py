"""The output folder of a refinement: its layout, its state and its outputs.

Layout::

    OUT/state.json            last completed iteration, resolution, history
    OUT/itNNN/                everything of iteration NNN (maps, FSC, STAR, poses, run.json)
    OUT/final/                a complete copy of the last completed iteration
    OUT/summary.png           resolution and particles per iteration
    OUT/run.log               the log of every run in the folder

``state.json`` is written last in an iteration, so a run killed at any moment
resumes (``--continue``) from the last iteration it names; ``final/`` is
replaced by renames so that it is always complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from swiftalign.io.json_file import write_json
from swiftalign.io.mrc import atomic_path
from swiftalign.noise import NoiseSpectrum

__all__ = ["RunFolder", "load_noise", "save_noise", "save_npy"]


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name, then rename (a kill never leaves a truncated file)."""
    tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_noise(path: Path, noise: NoiseSpectrum) -> None:
    """Noise spectra to ``.npz`` under a temporary name, then renamed."""
    tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, groups=noise.groups, noise_power=noise.noise_power,
                     total_power=noise.total_power, counts=noise.counts)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_noise(path: Path) -> NoiseSpectrum:
    """Noise spectra written by :func:`save_noise`."""
    with np.load(path) as z:
        return NoiseSpectrum(z["groups"], z["noise_power"], z["total_power"], z["counts"])


class RunFolder:
    """A refinement's output folder (layout in the module docstring).

    Parameters
    ----------
    path : str or Path
        The folder (created by :meth:`create`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def state_path(self) -> Path:
        """``OUT/state.json``."""
        return self.path / "state.json"

    @property
    def summary_path(self) -> Path:
        """``OUT/summary.png``."""
        return self.path / "summary.png"

    @property
    def log_path(self) -> Path:
        """``OUT/run.log``."""
        return self.path / "run.log"

    def started(self) -> bool:
        """Whether a run began here (its log or its first iteration folder exists)."""
        return self.log_path.exists() or self.iteration_dir(1).exists()

    def iteration_dir(self, iteration: int) -> Path:
        """``OUT/itNNN`` (not created)."""
        return self.path / f"it{iteration:03d}"

    def create(self) -> None:
        """Make the folder (and its parents) if absent."""
        self.path.mkdir(parents=True, exist_ok=True)

    def read_state(self) -> dict | None:
        """The contents of ``state.json``, or None when no iteration was completed."""
        if not self.state_path.exists():
            return None
        return json.loads(self.state_path.read_text())

    def remove_stale_temporaries(self) -> None:
        """Delete temporary files (``.NAME.XXXX.tmp``) a killed run left in ``OUT`` and ``OUT/it*``."""
        for pattern in (".*.tmp", "it[0-9][0-9][0-9]/.*.tmp"):
            for tmp in self.path.glob(pattern):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)

    def publish_final(self, iteration: int) -> None:
        """Make ``OUT/final`` a copy of ``itNNN``; at every moment ``final`` is complete or absent.

        The copy is made under a temporary name, the old ``final`` is renamed away,
        the copy renamed into place, and only then the old one deleted.
        """
        out = self.path
        final, tmp_final, old_final = out / "final", out / ".final.tmp", out / ".final.old"
        for stale in (tmp_final, old_final):
            if stale.exists():
                shutil.rmtree(stale)
        shutil.copytree(self.iteration_dir(iteration), tmp_final)
        if final.exists():
            os.replace(final, old_final)
        os.replace(tmp_final, final)
        if old_final.exists():
            shutil.rmtree(old_final)

    def commit(self, iteration: int, resolution_angstrom: float, history: list[dict],
               run: dict) -> None:
        """Close an iteration whose outputs are written: ``run.json``, ``state.json``, ``final/``.

        Parameters
        ----------
        iteration : int
            The iteration completed.
        resolution_angstrom : float
            Its resolution (Å).
        history : list of dict
            Every iteration's record so far.
        run : dict
            The iteration's ``run.json`` (provenance, parameters, history).
        """
        write_json(self.iteration_dir(iteration) / "run.json", run)
        write_json(self.state_path, {"iteration": iteration,
                                     "resolution_angstrom": resolution_angstrom,
                                     "history": history})
        self.publish_final(iteration)
