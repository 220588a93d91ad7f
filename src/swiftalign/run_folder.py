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

from swiftalign.io.atomic import StagedOutputs, atomic_write
from swiftalign.io.json_file import write_json
from swiftalign.noise import NoiseSpectrum

__all__ = ["RunFolder", "load_noise", "save_noise", "save_npy"]


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name, then rename (a kill never leaves a truncated file)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def save_noise(path: Path, noise: NoiseSpectrum) -> None:
    """Noise spectra to ``.npz`` under a temporary name, then renamed."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, groups=noise.groups, noise_power=noise.noise_power,
                 total_power=noise.total_power, counts=noise.counts)


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
    def final_path(self) -> Path:
        """``OUT/final``."""
        return self.path / "final"

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
        """Delete what a killed run left: temporary files and staging folders.

        Temporary files are ``.NAME.XXXX.tmp`` in ``OUT`` and ``OUT/it*``; staging
        folders ``.itNNN.XXXX.staging`` in ``OUT``. A half-made ``.final.tmp`` is
        replaced by :meth:`publish_final`.
        """
        for pattern in (".*.tmp", ".*.staging", "it[0-9][0-9][0-9]/.*.tmp"):
            for tmp in self.path.glob(pattern):
                if tmp.is_dir() and not tmp.is_symlink():
                    if tmp.name != ".final.tmp":
                        shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)

    def stage_iteration(self, iteration: int) -> tuple[StagedOutputs, Path]:
        """A hidden staging folder for ``itNNN``, published in one rename by :meth:`commit`.

        Returns
        -------
        stage : StagedOutputs
            The staging (passed to :meth:`commit`).
        staged_dir : Path
            Where the iteration's outputs are written (created).
        """
        stage = StagedOutputs(self.path, self.iteration_dir(iteration).name)
        staged_dir = stage.path(self.iteration_dir(iteration))
        staged_dir.mkdir()
        return stage, staged_dir

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
               run: dict, *, stage: StagedOutputs | None = None) -> None:
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
        stage : StagedOutputs, optional
            The iteration's staging (:meth:`stage_iteration`): ``run.json`` is
            written into it, then ``itNNN/`` published in one rename.
        """
        it_dir = self.iteration_dir(iteration)
        if stage is None:
            write_json(it_dir / "run.json", run)
        else:
            write_json(stage.path(it_dir) / "run.json", run)
            stage.publish()
        write_json(self.state_path, {"iteration": iteration,
                                     "resolution_angstrom": resolution_angstrom,
                                     "history": history})
        self.publish_final(iteration)
