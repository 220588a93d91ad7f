"""The Python API for notebooks and scripts: ``swiftalign.align``, ``refine``, ``simulate``.

Thin wrappers: each validates and converts its inputs, builds the same
configuration the command line builds (:class:`~swiftalign.alignment.AlignConfig`,
:class:`~swiftalign.refinement.RefineConfig`,
:class:`~swiftalign.simulate.SimulationConfig`; every further keyword argument
is one of their fields, e.g. ``index="Flat"``, ``repetitions=2``), calls the
library (:func:`~swiftalign.alignment.align_particles`,
:func:`~swiftalign.refinement.run_refinement`,
:func:`~swiftalign.simulate.simulate_particles`) and wraps the result in a
typed object: poses as a pandas DataFrame in RELION columns (degrees, Å), maps
as :class:`~swiftalign.io.mrc.MapData` (a `(d, h, w)` float32 array with its
voxel size in Å).

Inputs
------
``particles``: a RELION STAR or cryoSPARC ``.cs`` path, or a
:class:`~swiftalign.io.star.ParticleTable` (:func:`read_particles`). Images are
read from the stacks the table names (checked before any work; unusable
particles are left out with a warning, as on the command line).
``reference``: an MRC path, a :class:`~swiftalign.io.mrc.MapData`, or a `(N, N, N)`
array with ``voxel_size_angstrom`` (default: the first particle's pixel size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from swiftalign.errors import InputError
from swiftalign.io.mrc import MapData, read_map
from swiftalign.io.star import ParticleTable, read_particles

if TYPE_CHECKING:
    from swiftalign.alignment import AlignmentResult

__all__ = [
    "AlignResult",
    "MapData",
    "ParticleTable",
    "RefineResult",
    "SimulatedDataset",
    "align",
    "demo_map_path",
    "read_map",
    "read_particles",
    "read_refinement",
    "refine",
    "simulate",
]

ParticlesLike = str | Path | ParticleTable
MapLike = str | Path | MapData | np.ndarray
Progress = Callable[[str, int, int], None]


def demo_map_path() -> Path:
    """The bundled TRPV1 map (C4, 48³ voxels of 4.88 Å; EMDB, see ``data/SOURCES.md``)."""
    return Path(str(files("swiftalign") / "data" / "trpv1_volume.mrc"))


def _as_table(particles: ParticlesLike, angpix: float | None) -> ParticleTable:
    if isinstance(particles, ParticleTable):
        return particles
    if isinstance(particles, str | Path):
        return read_particles(particles, angpix=angpix)
    raise InputError(f"particles: give a STAR/.cs path or a ParticleTable, not "
                     f"{type(particles).__name__}")


def _as_map(reference: MapLike, voxel_size_angstrom: float | None) -> MapData:
    """A reference as :class:`MapData`; a voxel size of 0 is later taken as the particles'."""
    if isinstance(reference, MapData):
        return reference
    if isinstance(reference, str | Path):
        return read_map(reference, voxel_size_angstrom=voxel_size_angstrom)
    if isinstance(reference, np.ndarray):
        if reference.ndim != 3 or len(set(reference.shape)) != 1:
            raise InputError(f"reference: a cubic (N, N, N) array is needed, not shape "
                             f"{reference.shape}")
        if not np.isfinite(reference).all():
            raise InputError("reference: the array has non-finite values")
        return MapData(np.ascontiguousarray(reference, dtype=np.float32),
                       float(voxel_size_angstrom or 0.0), Path("<array>"))
    raise InputError(f"reference: give an MRC path, a MapData or a (N, N, N) array, not "
                     f"{type(reference).__name__}")


def _array_voxel(reference: MapLike, voxel_size_angstrom: float | None,
                 table: ParticleTable) -> float | None:
    """The voxel size for :func:`_as_map`: an array without one takes the particles' pixel size."""
    if voxel_size_angstrom is None and isinstance(reference, np.ndarray):
        return float(table.pixel_size_angstrom[0])
    return voxel_size_angstrom


@dataclass
class AlignResult:
    """Poses from :func:`align`.

    Attributes
    ----------
    poses : pd.DataFrame
        One row per aligned particle: every input column, with
        ``rlnAngleRot/Tilt/Psi`` (°), ``rlnOriginXAngst/YAngst`` (Å) and
        ``rlnSwiftalignScore`` (cosine similarity) of the best match.
    particles : ParticleTable
        The same rows as a table (optics kept), for :meth:`write_star` or
        another :func:`align`/:func:`refine`.
    pixel_size_angstrom : float
    box_size : int
        Particle box (px).
    sampling : dict
        Steps used: ``angular_step_deg``, ``psi_step_deg``, ``shift_step_px``,
        ``max_shift_px``, ``n_poses`` …
    timings_s : dict
        Seconds per step.
    details : AlignmentResult
        The library's result (k best matches, distances, search statistics).
    """

    poses: pd.DataFrame
    particles: ParticleTable
    pixel_size_angstrom: float
    box_size: int
    sampling: dict
    timings_s: dict
    details: AlignmentResult

    def write_star(self, path: str | Path) -> Path:
        """Write the poses as RELION 3.1 STAR (atomically; image paths rebased to its folder)."""
        from swiftalign.io.star import write_particles

        write_particles(path, self.particles, box_size=self.box_size)
        return Path(path)


def align(
    particles: ParticlesLike,
    reference: MapLike,
    *,
    resolution_angstrom: float,
    symmetry: str = "C1",
    voxel_size_angstrom: float | None = None,
    angpix: float | None = None,
    max_bad_fraction: float = 0.01,
    progress: Progress | None = None,
    **options: Any,
) -> AlignResult:
    """Align particles against a reference map (``swiftalign align``).

    Parameters
    ----------
    particles : str, Path or ParticleTable
        STAR / ``.cs`` file or a table already read.
    reference : str, Path, MapData or np.ndarray
        Reference map, `(N, N, N)`, same box as the particles.
    resolution_angstrom : float
        Resolution limit Tmax (Å): comparison disc and sampling (thesis eq. 4.20–4.21).
    symmetry : str
        Point group (C1, Cn, Dn, T, O, I; RELION conventions).
    voxel_size_angstrom : float, optional
        Voxel size (Å) of an array reference, or of a map whose header says 0.
    angpix : float, optional
        Particle pixel size (Å) when the file has none.
    max_bad_fraction : float
        Unusable particles (NaN/Inf, constant) are left out; error above this fraction.
    progress : callable, optional
        ``progress(step, done, total)``.
    **options
        Further :class:`~swiftalign.alignment.AlignConfig` fields, e.g.
        ``index="Flat"``, ``max_shift_px=6``, ``ctf_mode="wiener"``, ``seed=1``.

    Returns
    -------
    AlignResult

    Raises
    ------
    InputError, pydantic.ValidationError
        Invalid option or input (names the file, field and value), before any long work.
    """
    from swiftalign.alignment import AlignConfig, align_particles
    from swiftalign.io.particles import open_usable_particles

    config = AlignConfig(resolution_angstrom=resolution_angstrom, symmetry=symmetry, **options)
    config.symmetry_checked()
    table = _as_table(particles, angpix)
    ref = _as_map(reference, _array_voxel(reference, voxel_size_angstrom, table))
    table, images = open_usable_particles(table, max_bad_fraction=max_bad_fraction)
    with images:
        result = align_particles(table, images, ref, config, progress=progress)
    frame = table.particles.copy()
    for name, values in result.star_columns().items():
        frame[name] = values
    frame = frame.drop(columns=["rlnOriginX", "rlnOriginY"], errors="ignore")
    aligned = ParticleTable(
        particles=frame, optics=table.optics, path=table.path,
        pixel_size_angstrom=table.pixel_size_angstrom, voltage_kv=table.voltage_kv,
        cs_mm=table.cs_mm, amplitude_contrast=table.amplitude_contrast,
        other_blocks=table.other_blocks, particle_block_name=table.particle_block_name)
    sampling = {**vars(result.sampling), "n_poses": result.sampling.n_poses}
    return AlignResult(poses=frame, particles=aligned,
                       pixel_size_angstrom=result.pixel_size_angstrom, box_size=result.box_size,
                       sampling=sampling, timings_s=dict(result.timings), details=result)


@dataclass
class RefineResult:
    """The final state of :func:`refine` (read back from ``OUTPUT_DIR/final/``).

    Attributes
    ----------
    poses : pd.DataFrame
        ``final/particles.star``: the particles in the final maps, with
        ``rlnAngleRot/Tilt/Psi`` (°), ``rlnOriginXAngst/YAngst`` (Å),
        ``rlnRandomSubset``, ``rlnClassNumber`` and the consensus spreads.
    maps : list of MapData
        Per class: the map of all kept particles low-passed to its resolution
        (``map.mrc``); ``map_unfiltered`` and ``half_maps`` likewise.
    map_unfiltered : list of MapData
    half_maps : list of (MapData, MapData)
    fsc : list of pd.DataFrame
        Per class: the ``data_fsc`` block of ``fsc.star`` (RELION postprocess
        columns: ``rlnResolution`` 1/Å, ``rlnFourierShellCorrelationCorrected`` …).
    resolution_angstrom : float
        Final gold-standard resolution (FSC 0.143 of the corrected curve).
    history : list of dict
        Per iteration: resolution, kept/rejected, classes, timings (as ``run.json``).
    output_dir : Path
    """

    poses: pd.DataFrame
    maps: list[MapData]
    map_unfiltered: list[MapData]
    half_maps: list[tuple[MapData, MapData]]
    fsc: list[pd.DataFrame]
    resolution_angstrom: float
    history: list[dict] = field(default_factory=list)
    output_dir: Path = Path(".")

    @property
    def map(self) -> MapData:
        """The first (or only) class's filtered map."""
        return self.maps[0]


def refine(
    particles: ParticlesLike,
    reference: MapLike | Sequence[MapLike],
    *,
    initial_resolution_angstrom: float,
    output_dir: str | Path,
    symmetry: str = "C1",
    resume: bool = False,
    voxel_size_angstrom: float | None = None,
    angpix: float | None = None,
    max_bad_fraction: float = 0.01,
    progress: Progress | None = None,
    **options: Any,
) -> RefineResult:
    """Gold-standard 3D refinement (``swiftalign refine``); several references classify.

    Parameters
    ----------
    particles : str, Path or ParticleTable
    reference : map or list of maps
        Initial reference(s) (path, MapData or `(N, N, N)` array), one per class;
        each is low-passed to ``initial_resolution_angstrom`` first.
    initial_resolution_angstrom : float
        Resolution (Å) of the initial reference; the first iteration samples at it.
    output_dir : str or Path
        Written as by the command line: ``itNNN/``, ``final/``, ``summary.png`` …
    symmetry : str
    resume : bool
        Continue the run in ``output_dir`` after its last completed iteration.
    voxel_size_angstrom, angpix, max_bad_fraction, progress
        As in :func:`align`.
    **options
        Further :class:`~swiftalign.refinement.RefineConfig` fields, e.g.
        ``iterations=2``, ``repetitions=2``, ``max_resolution_angstrom=8``.

    Returns
    -------
    RefineResult

    Raises
    ------
    InputError, pydantic.ValidationError
        Invalid option or input, before any long work.
    """
    from swiftalign.io.particles import open_usable_particles
    from swiftalign.refinement import RefineConfig, run_refinement
    from swiftalign.symmetry import parse_symmetry

    parse_symmetry(symmetry)
    config = RefineConfig(initial_resolution_angstrom=initial_resolution_angstrom,
                          symmetry=symmetry, **options)
    table = _as_table(particles, angpix)
    items: list[MapLike] = (list(reference) if isinstance(reference, Sequence)
                            and not isinstance(reference, str) else [reference])
    refs = [_as_map(r, _array_voxel(r, voxel_size_angstrom, table)) for r in items]
    for r in refs:
        if r.data.ndim != 3 or len(set(r.data.shape)) != 1:
            raise InputError(f"{r.path}: map is not cubic {r.data.shape}; refinement needs a "
                             "cubic map")
    table, images = open_usable_particles(table, max_bad_fraction=max_bad_fraction)
    with images:
        outcome = run_refinement(table, images, refs, output_dir, config, resume=resume,
                                 progress=progress, record=_record("swiftalign.refine"))
    return _read_final(Path(output_dir), len(refs), {
        "resolution_angstrom": outcome.resolution_angstrom, "history": outcome.history})


def read_refinement(output_dir: str | Path) -> RefineResult:
    """The result of a finished (or interrupted) refinement, from its output folder.

    Works for runs of ``swiftalign refine`` and of :func:`refine` alike: the
    last completed iteration's ``final/`` maps, FSC tables and particles, and
    the history of ``state.json``.

    Parameters
    ----------
    output_dir : str or Path
        The refinement's ``-o`` folder.

    Returns
    -------
    RefineResult

    Raises
    ------
    InputError
        No completed iteration there (no ``state.json``).
    """
    import json

    out = Path(output_dir)
    state_path = out / "state.json"
    if not state_path.exists():
        raise InputError(f"{out}: no completed refinement iteration there (no state.json)")
    state = json.loads(state_path.read_text())
    n_classes = len(state["history"][-1]["classes"])
    return _read_final(out, n_classes, state)


def _record(command: str) -> dict:
    """Provenance for ``run.json`` (the command line records more: machine, argv)."""
    import platform
    import time

    from swiftalign import __version__

    return {"swiftalign_version": __version__, "command": f"{command} (Python API)",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hostname": platform.node()}


def _read_final(out: Path, n_classes: int, outcome: dict) -> RefineResult:
    """The maps, FSC tables and particles of ``out/final/``."""
    import starfile

    final = out / "final"
    prefixes = [""] if n_classes == 1 else [f"class{c + 1}_" for c in range(n_classes)]
    fsc = []
    for p in prefixes:
        blocks = starfile.read(final / f"{p}fsc.star", always_dict=True)
        fsc.append(blocks["fsc"])
    return RefineResult(
        poses=read_particles(final / "particles.star").particles,
        maps=[read_map(final / f"{p}map.mrc") for p in prefixes],
        map_unfiltered=[read_map(final / f"{p}map_unfiltered.mrc") for p in prefixes],
        half_maps=[(read_map(final / f"{p}half1.mrc"), read_map(final / f"{p}half2.mrc"))
                   for p in prefixes],
        fsc=fsc,
        resolution_angstrom=float(outcome["resolution_angstrom"]),
        history=list(outcome["history"]),
        output_dir=out,
    )


@dataclass
class SimulatedDataset:
    """Particles from :func:`simulate`.

    Attributes
    ----------
    star_path : Path
        ``OUTPUT_DIR/particles.star`` (RELION 3.1; images in ``particles.mrcs``).
    particles : ParticleTable
        The particles as read from it (the true poses are in its pose columns).
    truth : pd.DataFrame
        True ``rlnAngleRot/Tilt/Psi`` (°), ``rlnOriginXAngst/YAngst`` (Å) and CTF.
    """

    star_path: Path
    particles: ParticleTable
    truth: pd.DataFrame


def simulate(
    reference: MapLike,
    *,
    output_dir: str | Path,
    n_particles: int = 1000,
    snr_db: float = -10.0,
    symmetry: str = "C1",
    seed: int = 0,
    voxel_size_angstrom: float | None = None,
    **options: Any,
) -> SimulatedDataset:
    """Simulate particles with ground truth from a map (``swiftalign simulate``).

    Parameters
    ----------
    reference : str, Path, MapData or np.ndarray
        Cubic map; an array needs ``voxel_size_angstrom``.
    output_dir : str or Path
        Receives ``particles.mrcs`` and ``particles.star``, whose image names
        are relative to the working directory (the project folder), as RELION
        writes them; absolute when ``output_dir`` is outside it.
    n_particles : int
    snr_db : float
        Variance of the clean CTF-modulated projection over the noise variance (dB).
    symmetry : str
        True poses are put in the asymmetric unit of this point group.
    seed : int
    voxel_size_angstrom : float, optional
        Voxel size (Å) of an array, or of a map whose header says 0.
    **options
        Further :class:`~swiftalign.simulate.SimulationConfig` fields, e.g.
        ``shift_sigma_px=2``, ``ctf=False``, ``noise_psd_exponent=1``.

    Returns
    -------
    SimulatedDataset

    Raises
    ------
    InputError
        Unknown option, non-cubic map, no voxel size, bad symmetry.
    """
    from swiftalign.simulate import SimulationConfig, simulate_particles, write_dataset
    from swiftalign.symmetry import parse_symmetry

    parse_symmetry(symmetry)
    try:
        config = SimulationConfig(n_particles=n_particles, snr_db=snr_db, symmetry=symmetry,
                                  seed=seed, **options)
    except TypeError as exc:
        raise InputError(f"simulate: {exc}") from None
    ref = _as_map(reference, voxel_size_angstrom)
    if not ref.voxel_size_angstrom > 0:
        raise InputError(f"{ref.path}: no voxel size; pass voxel_size_angstrom")
    images, truth = simulate_particles(ref, config)
    star = write_dataset(output_dir, images, truth, pixel_size_angstrom=ref.voxel_size_angstrom,
                         config=config)
    return SimulatedDataset(star_path=star, particles=read_particles(star), truth=truth)
