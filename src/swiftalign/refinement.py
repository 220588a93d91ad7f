"""Iterative gold-standard 3D refinement and classification ("swiftres", thesis ch. 4–5).

Each iteration, at the current resolution ``T``:

1. for each half set and each of ``R`` repetitions, every particle of that half
   is aligned (:func:`swiftalign.alignment.align_particles`) against every
   class reference of its own half, each repetition with its own gallery
   perturbation (seeded by iteration and repetition); the class with the
   smallest distance wins the repetition. A FAISS index is trained once per
   iteration, half and class, on augmented references pooled from all
   repetitions' galleries (:func:`swiftalign.search.train_index`), then
   populated with and queried against each repetition's gallery;
2. the ``R`` alignments are combined (:mod:`swiftalign.consensus`); particles
   without agreement are left out of this iteration's reconstruction;
3. each half map of each class is reconstructed (:mod:`swiftalign.reconstruction`)
   with symmetry expansion;
4. half maps are compared (:mod:`swiftalign.fsc`, masked and
   phase-randomisation corrected); the resolution at ``fsc_threshold`` is
   the next ``T``;
5. each half's next reference is its own half map low-passed to ``T``
   (gold standard: half sets fixed for the whole run, never mixed above
   ``low_resolution_join_angstrom``).

Alignment uses frequencies up to ``T`` (down to Nyquist; ``max_resolution_angstrom``
caps it when given). The global search is sampled at ``T_g = max(T, global_resolution_angstrom)``
and each repetition's local search refines to ``T_r = max(T, T_g ×
repetition_resolution_factor)``, the resolution at which the consensus is judged; each
kept particle is then searched once more around its consensus pose, to the steps of
``T`` with the full disc (the polish), so the cost of the global search and of the
repetitions stays bounded as ``T`` improves.
After the first iteration the shift search is centred on each particle's
previous shift with range ``max_shift_later_px``. Once the consensus poses stop
moving, step 1 becomes one local search per half around each particle's pose and
shift (:mod:`swiftalign.autolocal` decides and records why; ``auto_local``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field

from swiftalign.alignment import (
    AlignConfig,
    align_particles,
    build_reference_set,
    check_inputs,
    ctf_params_from_table,
    index_settings,
    progress_counter,
    resolve_ctf_mode,
    resolve_device,
)
from swiftalign.autolocal import (
    SearchPlan,
    choose_search,
    converged,
    local_ranges,
    pose_changes,
    spread_summary,
)
from swiftalign.configs import ComputeConfig, NoiseConfig, section
from swiftalign.consensus import (
    Consensus,
    consensus,
    consensus_summary,
    near_symmetry_of_references,
)
from swiftalign.conventions import shift_px_to_origin_angstrom
from swiftalign.ctf import CtfParams
from swiftalign.ctf_groups import reference_ctf_pool
from swiftalign.errors import InputError
from swiftalign.evaluate import symmetric_angular_error_deg
from swiftalign.fsc import (
    FscResult,
    auto_solvent_mask,
    gold_standard_fsc,
    lowpass,
    require_signal,
    write_fsc_star,
)
from swiftalign.io.mrc import MapData, read_map, write_map
from swiftalign.io.particles import ParticleImages
from swiftalign.io.star import write_particles
from swiftalign.io.table import ParticleTable
from swiftalign.local_search import prepare_local, refine_local
from swiftalign.memory import check_refine_resources
from swiftalign.noise import NoiseSpectrum
from swiftalign.plots import (
    angular_distribution_figure,
    fsc_figure_from_result,
    refinement_summary_figure,
    save_figure,
)
from swiftalign.projection import VolumeSpectrum
from swiftalign.queries import noise_spectrum_for
from swiftalign.reconstruction import HalfMapAccumulator
from swiftalign.run_folder import RunFolder, load_noise, save_noise, save_npy
from swiftalign.sampling import DEFAULT_MAX_SHIFT_PX, angular_step_deg, shift_step_px
from swiftalign.search import train_index
from swiftalign.symmetry import check_reference_symmetry, symmetry_matrices

__all__ = ["RefineConfig", "RefineSetup", "RefineState", "IterationResult", "RefinementResult",
           "refine_iteration", "run_refinement", "write_iteration"]

log = logging.getLogger(__name__)

#: A class and a half set: ``(class index from 0, half 1 or 2)``.
ClassHalf = tuple[int, int]


class RefineConfig(NoiseConfig, ComputeConfig):
    """Validated refinement parameters (units in the names).

    Built on the noise and compute sections of :mod:`swiftalign.configs`; the
    compute fields and ``iterations`` are what ``--continue`` may change.
    """

    model_config = ConfigDict(extra="forbid")

    initial_resolution_angstrom: float = Field(gt=0)
    max_resolution_angstrom: float | None = Field(default=None, gt=0)  # None: Nyquist
    global_resolution_angstrom: float = Field(default=20.0, gt=0)
    #: the repetitions of a global iteration refine locally to
    #: ``max(T, global resolution × this)``; one polish per particle then reaches ``T``
    repetition_resolution_factor: float = Field(default=0.5, gt=0, le=1)
    symmetry: str = "C1"
    force_symmetry: bool = False  # refine even if a reference disagrees with the symmetry
    near_symmetry: bool = True  # consensus up to rotations the map almost has (consensus.py)
    repetitions: int = Field(default=3, ge=1)
    iterations: int = Field(default=8, ge=1)
    fsc_threshold: float = Field(default=0.143, gt=0, lt=1)
    low_resolution_join_angstrom: float = Field(default=40.0, ge=0)
    auto_local: bool = True  # switch to local searches once poses are stable (choose_search)
    local_passes: int = Field(default=0, ge=0)
    local_angle_deg: float = Field(default=5.0, gt=0)
    local_shift_px: float = Field(default=2.0, gt=0)
    max_shift_px: float = Field(default=DEFAULT_MAX_SHIFT_PX, ge=0)
    max_shift_later_px: float = Field(default=3.0, ge=0)
    ctf_mode: Literal["auto", "wiener", "reference", "none"] = "wiener"
    weighting: Literal["none", "noise", "ssnr"] = "noise"
    index: str = "auto"
    metric: Literal["l2", "cosine", "pearson"] = "cosine"
    reconstruction: Literal["gridding", "wiener"] = "gridding"
    regularisation: float = Field(default=0.01, gt=0)
    seed: int = 0
    mask_path: str | None = None
    solvent_mask_path: str | None = None


#: Parameters ``--continue`` may change (they do not change the result): the compute section
#: and the number of iterations.
_CONTINUE_MAY_CHANGE = ("iterations", *ComputeConfig.model_fields)


def _check_same_parameters(run_json: Path, config: RefineConfig) -> None:
    """Refuse to continue a run with parameters other than the ones it was run with."""
    try:
        before = json.loads(run_json.read_text())["parameters"]
    except (OSError, ValueError, KeyError):
        return  # nothing recorded (older runs): nothing to compare
    now = config.model_dump()
    differ = [f"{name} = {before[name]!r} (now {now[name]!r})" for name in now
              if name in before and name not in _CONTINUE_MAY_CHANGE
              and before[name] != now[name]]
    if differ:
        raise InputError(
            f"{run_json.parent.parent}: --continue with other options than the run was made "
            f"with: {'; '.join(differ)}. Give the same options (only --iterations, --device and "
            "--max-memory may change), or start a new output folder")


@dataclass(frozen=True)
class RefineSetup:
    """Everything fixed for the whole run, checked before any long work.

    Attributes
    ----------
    table : ParticleTable
        Particles.
    images : ParticleImages
        Their images.
    config : RefineConfig
        Parameters.
    references : list of MapData
        One `(N, N, N)` map per class at the particles' pixel size.
    pixel_size_angstrom : float
        Particle pixel size (Å/px).
    symmetry : str
        Point group (upper case).
    symmetry_group : np.ndarray
        `(G, 3, 3)` its matrices.
    ctf : CtfParams or None
        Per-particle CTF (None for ``ctf_mode`` ``none``).
    halves : np.ndarray
        `(n,)` half set (1 or 2) of every particle, fixed for the run.
    mask : np.ndarray or None
        `(N, N, N)` reference mask.
    solvent_mask : np.ndarray or None
        `(N, N, N)` FSC mask (default: automatic per map).
    """

    table: ParticleTable
    images: ParticleImages
    config: RefineConfig
    references: list[MapData]
    pixel_size_angstrom: float
    symmetry: str
    symmetry_group: np.ndarray
    ctf: CtfParams | None
    halves: np.ndarray
    mask: np.ndarray | None
    solvent_mask: np.ndarray | None

    @property
    def n_classes(self) -> int:
        """Classes refined."""
        return len(self.references)

    @property
    def box_size(self) -> int:
        """``N`` (px)."""
        return self.images.box_size

    @property
    def nyquist_angstrom(self) -> float:
        """``2·Ts`` (Å)."""
        return 2.0 * self.pixel_size_angstrom

    def keys(self) -> list[ClassHalf]:
        """Every (class, half), classes outer."""
        return [(c, h) for c in range(self.n_classes) for h in (1, 2)]


@dataclass
class RefineState:
    """What one iteration hands to the next.

    Attributes
    ----------
    iteration : int
        Last completed iteration (0: none).
    resolution_angstrom : float
        Its resolution (Å).
    references : dict
        ``(class, half)`` → `(N, N, N)` next reference.
    euler_deg : np.ndarray
        `(n, 3)` consensus poses (RELION rot, tilt, psi).
    shift_yx_px : np.ndarray
        `(n, 2)` consensus shifts (px).
    class_index : np.ndarray
        `(n,)` classes (from 0).
    noise : NoiseSpectrum or None
        Spectra of the weighting (None: unweighted).
    history : list of dict
        One record per completed iteration.
    stalled : int
        Consecutive iterations without a gain of a Fourier shell.
    """

    iteration: int
    resolution_angstrom: float
    references: dict[ClassHalf, np.ndarray]
    euler_deg: np.ndarray
    shift_yx_px: np.ndarray
    class_index: np.ndarray
    noise: NoiseSpectrum | None
    history: list[dict] = field(default_factory=list)
    stalled: int = 0


@dataclass
class ClassMaps:
    """One class's maps of an iteration.

    Attributes
    ----------
    half1, half2, unfiltered : np.ndarray
        `(N, N, N)` half maps and the map of all kept particles.
    fsc : FscResult
        Gold-standard FSC.
    solvent_mask : np.ndarray
        `(N, N, N)` the FSC mask.
    resolution_angstrom : float
        Resolution, at least Nyquist (Å).
    """

    half1: np.ndarray
    half2: np.ndarray
    unfiltered: np.ndarray
    fsc: FscResult
    solvent_mask: np.ndarray
    resolution_angstrom: float


@dataclass
class IterationResult:
    """The outcome of one iteration (:func:`refine_iteration`), before anything is written.

    Attributes
    ----------
    iteration : int
        Its number.
    consensus : Consensus
        Consensus poses, classes and kept particles.
    classes : list of ClassMaps
        Maps and FSC per class.
    references : dict
        ``(class, half)`` → next reference.
    noise : NoiseSpectrum or None
        Residual noise spectra for the next iteration (weighting only).
    entry : dict
        The history record (no ``seconds`` yet).
    """

    iteration: int
    consensus: Consensus
    classes: list[ClassMaps]
    references: dict[ClassHalf, np.ndarray]
    noise: NoiseSpectrum | None
    entry: dict


@dataclass(frozen=True)
class RefinementResult:
    """What :func:`run_refinement` returns.

    Attributes
    ----------
    history : list of dict
        Per-iteration records (resolution, kept particles, class populations, timings).
    resolution_angstrom : float
        Resolution of the last iteration (Å).
    """

    history: list[dict]
    resolution_angstrom: float


def _half_sets(table: ParticleTable, seed: int) -> np.ndarray:
    """Half set (1 or 2) of every particle: rlnRandomSubset, else seeded random halves."""
    if "rlnRandomSubset" in table.particles:
        h = table.particles["rlnRandomSubset"].to_numpy().astype(int)
        if set(np.unique(h)) <= {1, 2} and len(np.unique(h)) == 2:
            return h
        log.warning("rlnRandomSubset is not 1/2 for both halves: assigning halves at random")
    rng = np.random.default_rng(seed)
    h = np.ones(len(table), dtype=int)
    h[rng.permutation(len(table))[: len(table) // 2]] = 2
    return h


def _join_low_resolution(a: np.ndarray, b: np.ndarray, resolution_angstrom: float,
                         pixel_size_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    """Replace both halves' Fourier components below ``resolution_angstrom`` by their average."""
    if resolution_angstrom <= 0:
        return a, b
    n = a.shape[0]
    k = np.fft.fftfreq(n)
    kr = np.fft.rfftfreq(n)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2)
    low = r < pixel_size_angstrom / resolution_angstrom
    fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
    avg = (fa + fb) / 2
    fa[low], fb[low] = avg[low], avg[low]
    return (np.fft.irfftn(fa, s=a.shape, axes=(0, 1, 2)).astype(np.float32),
            np.fft.irfftn(fb, s=b.shape, axes=(0, 1, 2)).astype(np.float32))


def prepare_refinement(table: ParticleTable, images: ParticleImages, references: list[MapData],
                       config: RefineConfig) -> RefineSetup:
    """Checks and fixed inputs of a run (:class:`RefineSetup`).

    Raises
    ------
    InputError
        Non-cubic or mismatched references or mask, missing CTF columns, bad symmetry.
    """
    sym = config.symmetry.upper()
    group = symmetry_matrices(sym)
    checked = [check_inputs(table, images, ref) for ref in references]
    pixel_size = checked[0][0]
    references = [ref for _, ref in checked]
    for ref in references:  # refuse a reference inconsistent with the symmetry (issue 14)
        check_reference_symmetry(ref.data, sym, pixel_size_angstrom=pixel_size, name=str(ref.path),
                                 resolution_angstrom=config.initial_resolution_angstrom,
                                 force=config.force_symmetry)
    ctf = ctf_params_from_table(table) if config.ctf_mode != "none" else None
    mask = None
    if config.mask_path:
        mask = read_map(config.mask_path).data
        if mask.shape != references[0].data.shape:
            raise InputError(f"{config.mask_path}: mask shape {mask.shape} differs from the "
                             f"reference {references[0].data.shape}")
    solvent = read_map(config.solvent_mask_path).data if config.solvent_mask_path else None
    return RefineSetup(table, images, config, references, pixel_size, sym, group, ctf,
                       _half_sets(table, config.seed), mask, solvent)


def initial_state(setup: RefineSetup) -> RefineState:
    """Iteration 0: the references low-passed to the initial resolution, poses unknown.

    The noise spectra of the weighting are measured outside the particle mask.
    """
    config = setup.config
    n = len(setup.table)
    refs = {(c, h): lowpass(setup.references[c].data, config.initial_resolution_angstrom,
                            setup.pixel_size_angstrom) for c, h in setup.keys()}
    return RefineState(0, config.initial_resolution_angstrom, refs, np.zeros((n, 3)),
                       np.zeros((n, 2)), np.zeros(n, dtype=int), _initial_noise(setup))


def _initial_noise(setup: RefineSetup) -> NoiseSpectrum | None:
    """Noise spectra for the weighting: the background outside the particle mask."""
    config = setup.config
    if config.weighting == "none":
        return None
    return noise_spectrum_for(
        setup.table, setup.images, np.arange(len(setup.images)),
        pixel_size_angstrom=setup.pixel_size_angstrom,
        particle_diameter_angstrom=config.particle_diameter_angstrom, seed=config.seed,
        device=resolve_device(config.device))


def resume_state(setup: RefineSetup, folder: RunFolder) -> RefineState | None:
    """The state after the last completed iteration in ``folder`` (None: nothing completed).

    Temporaries of a killed run are removed and ``final/`` is republished (a run
    killed after its state was saved but before ``final/`` was replaced).

    Raises
    ------
    InputError
        The run was made with other parameters than ``setup.config``.
    """
    saved = folder.read_state()
    if saved is None:
        return None
    folder.remove_stale_temporaries()
    it = saved["iteration"]
    last = folder.iteration_dir(it)
    _check_same_parameters(last / "run.json", setup.config)
    refs = {(c, h): read_map(last / f"reference_class{c + 1}_half{h}.mrc").data
            for c, h in setup.keys()}
    shifts, poses = np.load(last / "shifts.npy"), np.load(last / "poses.npy")
    classes = np.load(last / "classes.npy")
    folder.publish_final(it)
    log.info("continuing after iteration %d (%.2f Å)", it, saved["resolution_angstrom"])
    noise_path = last / "noise.npz"
    noise: NoiseSpectrum | None
    if setup.config.weighting != "none" and noise_path.exists():
        noise = load_noise(noise_path)  # the last iteration's residual spectra
    else:
        noise = _initial_noise(setup)
    history = saved["history"]
    stalled = sum(1 for h in history[-2:] if h.get("stalled")) if len(history) >= 2 else 0
    return RefineState(it, saved["resolution_angstrom"], refs, poses, shifts, classes, noise,
                       history, stalled)


@dataclass
class _Assignments:
    """`(n, R, ·)` poses, shifts, classes and distances (smaller is better) of every repetition."""

    euler_deg: np.ndarray
    shift_yx_px: np.ndarray
    class_index: np.ndarray
    distance: np.ndarray

    @classmethod
    def empty(cls, n: int, repetitions: int) -> _Assignments:
        return cls(np.zeros((n, repetitions, 3)), np.zeros((n, repetitions, 2)),
                   np.zeros((n, repetitions), dtype=int), np.zeros((n, repetitions)))


def _masked_references(setup: RefineSetup, state: RefineState) -> dict[ClassHalf, np.ndarray]:
    """The references multiplied by the reference mask (if any)."""
    if setup.mask is None:
        return state.references
    return {k: v * setup.mask for k, v in state.references.items()}


def _local_pass(setup: RefineSetup, state: RefineState, refs: dict[ClassHalf, np.ndarray],
                half: int, rows: np.ndarray, t_align: float,
                ranges: tuple[float, float], *, own_class: bool = False
                ) -> tuple[np.ndarray, ...]:
    """Local search only, around the current poses and shifts of one half.

    ±``ranges`` (°, px), down to half the angular step of ``t_align`` (the parabola
    vertices of the local search go finer) on
    the disc up to ``t_align``; every class is tried and the best distance wins
    (``own_class``: each particle only against its own class).
    """
    config = setup.config
    device = resolve_device(config.device)
    pixel_size = setup.pixel_size_angstrom
    angle_range, shift_range = ranges
    local = prepare_local(
        setup.images, rows, resolution_angstrom=t_align, pixel_size_angstrom=pixel_size,
        metric=config.metric, device=device, noise=state.noise, weighting=config.weighting,
        optics_group=setup.table.optics_group[rows],
        recentre_shift_yx_px=state.shift_yx_px[rows])
    fine = angular_step_deg(t_align, pixel_size, setup.box_size) / 2  # vertices go finer
    rounds = max(1, int(math.ceil(math.log2(max(angle_range / fine, 1.0)))) + 1)
    best_d = np.full(len(rows), np.inf)
    out_e, out_s = state.euler_deg[rows].copy(), state.shift_yx_px[rows].copy()
    out_c = state.class_index[rows].copy()
    for c in range(setup.n_classes):
        mine = state.class_index[rows] == c if own_class else np.ones(len(rows), dtype=bool)
        if not mine.any():
            continue
        spectrum = VolumeSpectrum(torch.as_tensor(refs[(c, half)], device=device))
        e, s, d = np.zeros((len(rows), 3)), np.zeros((len(rows), 2)), np.full(len(rows), np.inf)
        e[mine], s[mine], d[mine] = refine_local(
            spectrum, local.queries[torch.as_tensor(np.nonzero(mine)[0])],
            state.euler_deg[rows[mine]], np.zeros((int(mine.sum()), 2)),
            disc=local.disc, metric=config.metric, angle_step_deg=angle_range,
            shift_step_px=shift_range, rounds=rounds,
            ctf=setup.ctf.subset(rows[mine]) if setup.ctf is not None else None,
            pixel_size_angstrom=pixel_size,
            coefficient_weights=local.weights if local.weights is None or local.weights.ndim == 1
            else local.weights[torch.as_tensor(np.nonzero(mine)[0])],
        )
        better = d < best_d
        best_d[better] = d[better]
        out_e[better] = e[better]
        out_s[better] = s[better] + state.shift_yx_px[rows][better]
        out_c[better] = c
    return out_e, out_s, out_c


def _align_local(setup: RefineSetup, state: RefineState, t_align: float,
                 ranges: tuple[float, float]) -> _Assignments:
    """A local pass: one deterministic search per half stands for every repetition."""
    found = _Assignments.empty(len(setup.table), setup.config.repetitions)
    refs = _masked_references(setup, state)
    for h in (1, 2):
        rows = np.nonzero(setup.halves == h)[0]
        e, sft, cl = _local_pass(setup, state, refs, h, rows, t_align, ranges)
        found.euler_deg[rows] = e[:, None]
        found.shift_yx_px[rows] = sft[:, None]
        found.class_index[rows] = cl[:, None]
    return found


def _local_moves(setup: RefineSetup, state: RefineState,
                 cons: Consensus) -> tuple[np.ndarray, np.ndarray]:
    """`(n,)` angle (°, symmetry-aware) and shift (px) each particle moved in a local search."""
    moved = symmetric_angular_error_deg(cons.euler_deg, state.euler_deg, setup.symmetry)
    return moved, np.linalg.norm(cons.shift_yx_px - state.shift_yx_px, axis=1)


def _local_converged(moved_deg: np.ndarray, moved_px: np.ndarray,
                     ranges: tuple[float, float]) -> np.ndarray:
    """`(n,)` bool: the local search ended inside its first-round grid.

    A particle whose pose moved more than √3 × the angular range (the corner of
    the 3×3×3 grid) or whose shift moved more than √2 × the shift range would
    have gone on beyond the searched region: not converged, left out of this
    iteration's maps (it returns in the next).
    """
    return ((moved_deg <= math.sqrt(3.0) * ranges[0] + 1e-6)
            & (moved_px <= math.sqrt(2.0) * ranges[1] + 1e-6))


def _repetition_configs(setup: RefineSetup, iteration: int, half: int,
                        t_global: float) -> list[AlignConfig]:
    """One alignment config per repetition, each with its own gallery perturbation seed."""
    config = setup.config
    return [AlignConfig(
        **section(config, ComputeConfig).model_dump(),
        resolution_angstrom=t_global,
        symmetry=setup.symmetry,
        max_shift_px=config.max_shift_px if iteration == 1 else config.max_shift_later_px,
        ctf_mode=config.ctf_mode,
        weighting=config.weighting,
        index=config.index,
        metric=config.metric,
        seed=config.seed * 1_000_003 + iteration * 1009 + r * 17 + half,
    ) for r in range(config.repetitions)]


def _align_global(setup: RefineSetup, state: RefineState, iteration: int, t_align: float,
                  t_global: float, progress: Callable[[str, int, int], None] | None,
                  timings: dict[str, float]) -> _Assignments:
    """Every particle against every class of its half, once per repetition; best class wins.

    A FAISS index is trained once per half and class on the pooled galleries of
    all repetitions, then populated with and queried against each repetition's.
    """
    config, pixel_size, ctf = setup.config, setup.pixel_size_angstrom, setup.ctf
    found = _Assignments.empty(len(setup.table), config.repetitions)
    refs = _masked_references(setup, state)
    for h in (1, 2):
        rows = np.nonzero(setup.halves == h)[0]
        best_d = np.full((config.repetitions, len(rows)), np.inf)
        acfgs = _repetition_configs(setup, iteration, h, t_global)
        for c in range(setup.n_classes):
            ref_c = MapData(refs[(c, h)], pixel_size, setup.references[c].path)
            # one oversampled transform per half and class: every repetition slices it
            spectrum = VolumeSpectrum(torch.as_tensor(refs[(c, h)],
                                                      device=resolve_device(config.device)))
            refsets = [build_reference_set(ref_c, acfg, pixel_size_angstrom=pixel_size,
                                           noise=state.noise, progress=progress,
                                           spectrum=spectrum)
                       for acfg in acfgs]
            pool = None
            if ctf is not None and resolve_ctf_mode(config.ctf_mode, t_global) == "reference":
                pool = reference_ctf_pool(
                    ctf.subset(rows), refsets[0].disc, pixel_size_angstrom=pixel_size,
                    max_phase_rad=acfgs[0].ctf_group_phase_rad,
                    device=resolve_device(config.device))
            trained = train_index([rs.gallery for rs in refsets], index_settings(acfgs[0]),
                                  n_particles=len(rows), device=resolve_device(config.device),
                                  ctf_disc_pool=pool)
            gallery_bytes = [rs.gallery.coeffs.numel() * rs.gallery.coeffs.element_size()
                             for rs in refsets]
            for r, (refset, acfg) in enumerate(zip(refsets, acfgs, strict=True)):
                res = align_particles(
                    setup.table, setup.images, refset, acfg, rows=rows,
                    initial_shift_yx_px=None if iteration == 1 else state.shift_yx_px[rows],
                    local_resolution_angstrom=t_align, trained_index=trained,
                    progress=progress, noise=state.noise, spectrum=spectrum,
                    extra_resident_bytes=sum(gallery_bytes) - gallery_bytes[r])  # other reps
                for step, sec in res.timings.items():
                    timings[f"align_{step}"] = timings.get(f"align_{step}", 0.0) + sec
                d = res.distance[:, 0]
                better = d < best_d[r]
                best_d[r, better] = d[better]
                found.euler_deg[rows[better], r] = res.euler_deg[better, 0]
                found.shift_yx_px[rows[better], r] = res.shift_yx_px[better, 0]
                found.class_index[rows[better], r] = c
            del refsets, trained, spectrum
        found.distance[rows] = best_d.T
    return found


def _reconstruct_halves(setup: RefineSetup, cons: Consensus, iteration: int,
                        progress: Callable[[str, int, int], None] | None,
                        timings: dict[str, float] | None = None,
                        ) -> tuple[dict[ClassHalf, np.ndarray], dict[int, np.ndarray],
                                   dict[ClassHalf, np.ndarray]]:
    """Half maps and full map of every class from its kept particles, and their rows.

    Each kept particle is inserted once, into its half; the full map (all kept
    particles together, RELION's final map) comes from the sum of the halves'
    accumulators (:class:`swiftalign.reconstruction.HalfMapAccumulator`).
    Seconds spent inserting and making the maps (symmetrisation, gridding,
    inversion) are added to ``timings`` (``reconstruct_insert``, ``reconstruct_maps``).

    Raises
    ------
    InputError
        A class half with fewer than 2 kept particles.
    """
    config, ctf = setup.config, setup.ctf
    inserted = progress_counter(progress, "reconstruction", int(cons.keep.sum()))
    half_maps: dict[ClassHalf, np.ndarray] = {}
    full_maps: dict[int, np.ndarray] = {}
    sel_of: dict[ClassHalf, np.ndarray] = {}
    spent = {"reconstruct_insert": 0.0, "reconstruct_maps": 0.0}
    for c in range(setup.n_classes):
        t_step = time.perf_counter()
        acc = HalfMapAccumulator(setup.box_size, device=resolve_device(config.device))
        for h in (1, 2):
            sel = sel_of[(c, h)] = np.nonzero(cons.keep & (setup.halves == h)
                                              & (cons.class_index == c))[0]
            if len(sel) < 2:
                raise InputError(f"iteration {iteration}: class {c + 1} half {h} kept only "
                                 f"{len(sel)} particles")
            acc.insert(h, setup.images, sel, cons.euler_deg[sel], cons.shift_yx_px[sel],
                       ctf=ctf.subset(sel) if ctf is not None else None,
                       pixel_size_angstrom=setup.pixel_size_angstrom, progress=inserted)
        t_maps = time.perf_counter()
        spent["reconstruct_insert"] += t_maps - t_step
        half_maps[(c, 1)], half_maps[(c, 2)], full_maps[c] = acc.maps(
            symmetry_group=setup.symmetry_group, method=config.reconstruction,
            regularisation=config.regularisation)
        del acc
        spent["reconstruct_maps"] += time.perf_counter() - t_maps
    if timings is not None:
        timings.update(spent)
    return half_maps, full_maps, sel_of


#: Particles per optics group, class and half whose residuals give the next noise spectra:
#: a spectrum averages every pixel of a shell over them (about 2π·r·1,000 values per
#: shell), far beyond what the weights need; more only costs time.
NOISE_PARTICLES_PER_GROUP = 1000


def _residual_noise(setup: RefineSetup, half_maps: dict[ClassHalf, np.ndarray],
                    sel_of: dict[ClassHalf, np.ndarray], cons: Consensus) -> NoiseSpectrum:
    """Noise spectra of the residuals of the kept particles against their own half maps."""
    from swiftalign.noise import estimate_residual_noise_power, merge_spectra

    device = resolve_device(setup.config.device)
    og_all = setup.table.optics_group
    parts = []
    for key, sel in sel_of.items():
        parts.append(estimate_residual_noise_power(
            setup.images, sel, og_all[sel], torch.as_tensor(half_maps[key], device=device),
            cons.euler_deg[sel], cons.shift_yx_px[sel], ctf=setup.ctf,
            pixel_size_angstrom=setup.pixel_size_angstrom, seed=setup.config.seed,
            max_particles_per_group=NOISE_PARTICLES_PER_GROUP))
    return merge_spectra(parts)


def _class_maps(setup: RefineSetup, half_maps: dict[ClassHalf, np.ndarray],
                full_maps: dict[int, np.ndarray], iteration: int,
                timings: dict[str, float] | None = None) -> list[ClassMaps]:
    """Per class: the map of all kept particles, the gold-standard FSC and the resolution.

    Seconds spent on the automatic masks and on the FSCs (with phase
    randomisation) are added to ``timings`` (``auto_mask``, ``fsc``).

    Raises
    ------
    NoSignalError
        The half maps of a class do not correlate (:func:`swiftalign.fsc.require_signal`).
    """
    config = setup.config
    out = []
    spent = {"auto_mask": 0.0, "fsc": 0.0}
    for c in range(setup.n_classes):
        h1, h2 = half_maps[(c, 1)], half_maps[(c, 2)]
        # the map of all kept particles reconstructed together (RELION's final map; what
        # relion_reconstruct gives from particles.star), not the mean of the half maps
        avg = full_maps[c]
        t_step = time.perf_counter()
        smask = setup.solvent_mask if setup.solvent_mask is not None else auto_solvent_mask(
            avg, setup.pixel_size_angstrom)
        t_fsc = time.perf_counter()
        fsc = gold_standard_fsc(h1, h2, smask, setup.pixel_size_angstrom,
                                threshold=config.fsc_threshold, seed=config.seed + iteration)
        spent["auto_mask"] += t_fsc - t_step
        spent["fsc"] += time.perf_counter() - t_fsc
        require_signal(fsc, f"iteration {iteration}, class {c + 1}")
        out.append(ClassMaps(h1, h2, avg, fsc, smask,
                             max(fsc.resolution_angstrom, setup.nyquist_angstrom)))
    if timings is not None:
        timings.update(spent)
    return out


def _next_references(setup: RefineSetup, classes: list[ClassMaps]) -> dict[ClassHalf, np.ndarray]:
    """Each half's next reference.

    Its own half map (joined below the join resolution) low-passed to its class's
    resolution.
    """
    refs = {}
    for c, maps in enumerate(classes):
        n1, n2 = maps.half1, maps.half2
        if setup.config.low_resolution_join_angstrom > 0:
            n1, n2 = _join_low_resolution(n1, n2, setup.config.low_resolution_join_angstrom,
                                          setup.pixel_size_angstrom)
        for h, m in ((1, n1), (2, n2)):
            refs[(c, h)] = lowpass(m, maps.resolution_angstrom, setup.pixel_size_angstrom)
    return refs


def _class_stats(classes: list[ClassMaps], cons: Consensus) -> list[dict]:
    """Particles and resolutions of every class (history record)."""
    return [{
        "class": c + 1,
        "particles": int(((cons.class_index == c) & cons.keep).sum()),
        "resolution_angstrom": float(m.fsc.resolution_angstrom),
        "resolution_05_angstrom": float(m.fsc.resolution_05_angstrom),
        "resolution_unmasked_angstrom": float(m.fsc.resolution_unmasked_angstrom),
        "resolution_is_bound": bool(m.fsc.resolution_is_bound),
    } for c, m in enumerate(classes)]


def _search(setup: RefineSetup, state: RefineState, iteration: int, t_align: float,
            t_global: float, progress: Callable[[str, int, int], None] | None,
            timings: dict[str, float]) -> tuple[Consensus, dict]:
    """Plan, run and combine this iteration's search (:mod:`swiftalign.autolocal`).

    Returns the consensus and the history fields of the search: ``search``,
    ``search_reason``, the local ranges (local) or the consensus spreads (global),
    and the changes against the previous iteration's poses and classes.
    """
    config, pixel_size = setup.config, setup.pixel_size_angstrom
    dphi = angular_step_deg(t_align, pixel_size, setup.box_size)
    ds = shift_step_px(t_align, pixel_size)
    # switch to local once the poses move less than the step the consensus is judged at
    t_rep = max(t_align, t_global * config.repetition_resolution_factor)
    plan: SearchPlan = choose_search(
        state.history, iteration=iteration, iterations=config.iterations,
        local_passes=config.local_passes, auto_local=config.auto_local,
        angular_step_deg=angular_step_deg(t_rep, pixel_size, setup.box_size),
        box_angstrom=setup.box_size * pixel_size)
    fields: dict = {"search": plan.search, "search_reason": plan.reason}
    t_step = time.perf_counter()
    if plan.search == "local":
        if iteration > config.iterations - config.local_passes:
            ranges = (config.local_angle_deg, config.local_shift_px)
        else:
            ranges = local_ranges(state.history, angular_step_deg=dphi, shift_step_px=ds,
                                  max_angle_deg=config.local_angle_deg,
                                  max_shift_px=config.local_shift_px)
        fields["local_range_deg"], fields["local_range_px"] = ranges
        found = _align_local(setup, state, t_align, ranges)
    else:  # the repetitions refine to t_rep; one polish per particle goes on to t_align
        dphi, ds = angular_step_deg(t_rep, pixel_size, setup.box_size), shift_step_px(t_rep,
                                                                                       pixel_size)
        fields["repetition_resolution_angstrom"] = t_rep
        found = _align_global(setup, state, iteration, t_rep, t_global, progress, timings)
    timings["align"] = time.perf_counter() - t_step
    t_step = time.perf_counter()
    # repetitions that agree up to a near-symmetry of the references are kept (global only)
    near = None if plan.search == "local" or not config.near_symmetry else \
        near_symmetry_of_references(state.references, setup.symmetry_group,
                                    pixel_size_angstrom=pixel_size, resolution_angstrom=t_global)
    fields["near_symmetry"] = None if near is None else near.describe()
    cons = consensus(found.euler_deg, found.shift_yx_px, found.class_index,
                     symmetry_group=setup.symmetry_group, angle_tolerance_deg=dphi,
                     shift_tolerance_px=ds, distance=found.distance,
                     near_symmetry_group=None if near is None else near.group)
    timings["consensus"] = time.perf_counter() - t_step
    if plan.search == "global" and t_align < fields["repetition_resolution_angstrom"]:
        t_polish = time.perf_counter()
        _polish(setup, state, cons, t_align, (dphi / 2.0, ds / 2.0))
        timings["polish"] = time.perf_counter() - t_polish
        timings["align"] += timings["polish"]
    t_step = time.perf_counter()
    if plan.search == "local":  # one search: kept when it converged inside its range
        moved_deg, moved_px = _local_moves(setup, state, cons)
        cons.keep &= _local_converged(moved_deg, moved_px, ranges)
        # the next local range: how far the particles moved (shrinks as they settle)
        fields["spread_deg"], fields["spread_px"] = spread_summary(moved_deg, moved_px,
                                                                   cons.keep)
    else:  # the next local range: how far the repetitions scattered
        fields["spread_deg"], fields["spread_px"] = spread_summary(
            cons.angular_spread_deg, cons.shift_spread_px, cons.keep)
    fields["pose_change_deg"] = fields["class_change_fraction"] = None
    if iteration > 1:
        fields["pose_change_deg"], fields["class_change_fraction"] = pose_changes(
            cons.euler_deg, state.euler_deg, cons.class_index, state.class_index, cons.keep,
            setup.symmetry)
    timings["consensus"] += time.perf_counter() - t_step
    return cons, fields


def _polish(setup: RefineSetup, state: RefineState, cons: Consensus, t_align: float,
            ranges: tuple[float, float]) -> None:
    """Refine the kept consensus poses and shifts to ``t_align`` in place: one local search.

    The repetitions of a global iteration only refine to the coarser resolution their
    consensus is judged at; each kept particle is then searched once (not once per
    repetition) within ±``ranges`` (half the steps of that resolution) around its
    consensus pose, against its own class.
    """
    refs = _masked_references(setup, state)
    now = dataclasses.replace(state, euler_deg=cons.euler_deg, shift_yx_px=cons.shift_yx_px,
                              class_index=cons.class_index)
    for h in (1, 2):
        rows = np.nonzero((setup.halves == h) & cons.keep)[0]
        if len(rows):
            cons.euler_deg[rows], cons.shift_yx_px[rows], _ = _local_pass(
                setup, now, refs, h, rows, t_align, ranges, own_class=True)


def alignment_resolution(setup: RefineSetup, resolution_angstrom: float) -> float:
    """Resolution (Å) the alignment uses: the current one, the user cap, at least Nyquist."""
    cap = setup.config.max_resolution_angstrom
    return max(resolution_angstrom, cap or 0.0, setup.nyquist_angstrom)


def refine_iteration(setup: RefineSetup, state: RefineState, iteration: int,
                     progress: Callable[[str, int, int], None] | None = None) -> IterationResult:
    """One iteration: search → consensus → reconstruct → noise → FSC → next references.

    Touches no files. The search is global or local (:mod:`swiftalign.autolocal`).

    Parameters
    ----------
    setup : RefineSetup
        The run's fixed inputs.
    state : RefineState
        After the previous iteration.
    iteration : int
        Number of this iteration (from 1).
    progress : callable, optional
        ``progress(step, done, total)``.

    Returns
    -------
    IterationResult

    Raises
    ------
    InputError
        A class half keeps fewer than 2 particles.
    """
    config, pixel_size = setup.config, setup.pixel_size_angstrom
    t_align = alignment_resolution(setup, state.resolution_angstrom)
    t_global = max(t_align, config.global_resolution_angstrom)
    timings: dict[str, float] = {}
    cons, search = _search(setup, state, iteration, t_align, t_global, progress, timings)
    t_step = time.perf_counter()
    half_maps, full_maps, sel_of = _reconstruct_halves(setup, cons, iteration, progress, timings)
    timings["reconstruct"] = time.perf_counter() - t_step
    noise = state.noise
    if config.weighting != "none":
        # next iteration's weights: residuals against the maps just made (RELION's σ²)
        t_step = time.perf_counter()
        noise = _residual_noise(setup, half_maps, sel_of, cons)
        timings["noise"] = time.perf_counter() - t_step
    t_step = time.perf_counter()
    classes = _class_maps(setup, half_maps, full_maps, iteration, timings)
    references = _next_references(setup, classes)
    timings["fsc_and_maps"] = time.perf_counter() - t_step
    new_res = float(min(m.resolution_angstrom for m in classes))
    shells = setup.box_size * pixel_size
    class_stats = _class_stats(classes, cons)
    entry = {
        "iteration": iteration, "alignment_resolution_angstrom": t_align,
        "global_resolution_angstrom": t_global,
        "angular_step_deg": angular_step_deg(t_align, pixel_size, setup.box_size),
        "shift_step_px": shift_step_px(t_align, pixel_size),
        "resolution_angstrom": new_res, "kept": int(cons.keep.sum()),
        "rejected": int((~cons.keep).sum()), **consensus_summary(cons), "classes": class_stats,
        "resolution_is_bound": any(c["resolution_is_bound"] for c in class_stats),
        "stalled": bool(shells / new_res - shells / state.resolution_angstrom < 1.0),
        **search, "timings_s": timings,
    }
    entry["converged"] = converged(entry)
    return IterationResult(iteration, cons, classes, references, noise, entry)


def _write_class_maps(it_dir: Path, setup: RefineSetup, result: IterationResult) -> None:
    """Half maps, full maps, FSC (STAR and figure) and next references of every class."""
    ps = setup.pixel_size_angstrom
    for c, maps in enumerate(result.classes):
        prefix = "" if setup.n_classes == 1 else f"class{c + 1}_"
        write_map(it_dir / f"{prefix}half1.mrc", maps.half1, ps)
        write_map(it_dir / f"{prefix}half2.mrc", maps.half2, ps)
        write_map(it_dir / f"{prefix}map_unfiltered.mrc", maps.unfiltered, ps)
        write_map(it_dir / f"{prefix}mask.mrc", maps.solvent_mask, ps)  # the FSC's mask
        write_map(it_dir / f"{prefix}map.mrc", lowpass(maps.unfiltered, maps.resolution_angstrom,
                                                       ps), ps)
        write_fsc_star(it_dir / f"{prefix}fsc.star", maps.fsc, ps, average_map=maps.unfiltered,
                       mask=maps.solvent_mask,
                       half_map_names=(f"{prefix}half1.mrc", f"{prefix}half2.mrc"),
                       mask_name=setup.config.solvent_mask_path or "auto")
        save_figure(fsc_figure_from_result(
            maps.fsc, ps, f"iteration {result.iteration}, class {c + 1}: "
            f"{maps.fsc.resolution_text()}"), it_dir / f"{prefix}fsc.png")
        for h in (1, 2):
            write_map(it_dir / f"reference_class{c + 1}_half{h}.mrc", result.references[(c, h)],
                      ps)


def _write_particles(it_dir: Path, setup: RefineSetup, cons: Consensus) -> None:
    """``particles.star`` (the particles in this iteration's maps) and the rejected ones.

    ``relion_reconstruct`` on ``particles.star`` reproduces the maps; the rejected
    particles (back in the next iteration) keep their consensus poses and spreads
    in ``particles_rejected.star``.
    """
    keep = cons.keep
    origin = shift_px_to_origin_angstrom(cons.shift_yx_px, setup.pixel_size_angstrom)
    updates = {
        "rlnAngleRot": cons.euler_deg[:, 0],
        "rlnAngleTilt": cons.euler_deg[:, 1],
        "rlnAnglePsi": cons.euler_deg[:, 2],
        "rlnOriginXAngst": origin[:, 0],
        "rlnOriginYAngst": origin[:, 1],
        "rlnRandomSubset": setup.halves,
        "rlnClassNumber": cons.class_index + 1,
        "rlnSwiftalignAngularSpread": cons.angular_spread_deg,
        "rlnSwiftalignShiftSpread": cons.shift_spread_px,
        "rlnSwiftalignKept": keep.astype(int),
    }
    box = setup.box_size
    write_particles(it_dir / "particles.star", setup.table, box_size=box, updates=updates,
                    keep=keep)
    if (~keep).any():
        write_particles(it_dir / "particles_rejected.star", setup.table, box_size=box,
                        updates=updates, keep=~keep)
    else:  # none rejected: no stale list from an interrupted attempt
        (it_dir / "particles_rejected.star").unlink(missing_ok=True)


def write_iteration(it_dir: Path, setup: RefineSetup, result: IterationResult) -> None:
    """Write an iteration's outputs into ``it_dir`` (everything but ``run.json``).

    Parameters
    ----------
    it_dir : Path
        ``OUT/itNNN``, or its staging folder (:meth:`RunFolder.stage_iteration`);
        created if absent.
    setup : RefineSetup
        The run's fixed inputs.
    result : IterationResult
        From :func:`refine_iteration`.
    """
    it_dir.mkdir(exist_ok=True)
    cons = result.consensus
    if setup.config.weighting != "none" and result.noise is not None:
        save_noise(it_dir / "noise.npz", result.noise)
    _write_class_maps(it_dir, setup, result)
    _write_particles(it_dir, setup, cons)
    save_figure(angular_distribution_figure(
        cons.euler_deg[cons.keep, 0], cons.euler_deg[cons.keep, 1],
        title=f"iteration {result.iteration}: kept particles"), it_dir / "angdist.png")
    save_npy(it_dir / "shifts.npy", cons.shift_yx_px)
    save_npy(it_dir / "poses.npy", cons.euler_deg)
    save_npy(it_dir / "classes.npy", cons.class_index)


def _advance(state: RefineState, result: IterationResult, entry: dict) -> RefineState:
    """The state after ``result``, with ``entry`` appended to the history."""
    cons = result.consensus
    return RefineState(result.iteration, entry["resolution_angstrom"], result.references,
                       cons.euler_deg, cons.shift_yx_px, cons.class_index, result.noise,
                       [*state.history, entry], state.stalled + 1 if entry["stalled"] else 0)


def run_refinement(
    table: ParticleTable,
    images: ParticleImages,
    references: list[MapData],
    out_dir: str | Path,
    config: RefineConfig,
    *,
    resume: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    record: dict | None = None,
) -> RefinementResult:
    """Run the refinement and write ``OUT_DIR/itNNN/`` and ``OUT_DIR/final/``.

    The loop: set up → initial or resumed state → per iteration
    :func:`refine_iteration`, :func:`write_iteration` and the folder's commit,
    until ``config.iterations`` or two iterations in a row without a gain of one
    Fourier shell.

    Parameters
    ----------
    table : ParticleTable
        Particles.
    images : ParticleImages
        Their images.
    references : list of MapData
        One map per class, `(N, N, N)`, at the particles' pixel size.
    out_dir : str or Path
        Output folder (:class:`swiftalign.run_folder.RunFolder`).
    config : RefineConfig
        Parameters.
    resume : bool
        Continue from the last completed iteration in ``out_dir``.
    progress : callable, optional
        ``progress(step, done, total)``.
    record : dict, optional
        Provenance (version, command line …) stored in each ``run.json``.

    Returns
    -------
    RefinementResult
        Per-iteration history and the final resolution.

    Raises
    ------
    InputError
        Non-cubic or mismatched references, missing CTF columns, bad symmetry, or
        ``resume`` with other parameters than the run's.
    """
    folder = RunFolder(out_dir)
    folder.create()
    setup = prepare_refinement(table, images, references, config)
    check_refine_resources(setup, folder.path, iterations=config.iterations)  # before any work
    state = (resume_state(setup, folder) if resume else None) or initial_state(setup)
    for it in range(state.iteration + 1, config.iterations + 1):
        if state.stalled >= 2 or (state.history and state.history[-1].get("converged")):
            break
        t_it = time.perf_counter()
        result = refine_iteration(setup, state, it, progress)
        t_out = time.perf_counter()
        # every output of the iteration goes into a hidden staging folder, published as
        # itNNN/ in one rename once complete (folder.commit)
        stage, staged_dir = folder.stage_iteration(it)
        write_iteration(staged_dir, setup, result)
        timings = result.entry["timings_s"]
        entry = {**result.entry, "seconds": time.perf_counter() - t_it, "timings_s": {
            "alignment": timings["align"] + timings["consensus"],
            "reconstruction": timings["reconstruct"],
            "fsc_and_output": timings["fsc_and_maps"] + time.perf_counter() - t_out,
            "write": time.perf_counter() - t_out, **timings}}
        state = _advance(state, result, entry)
        save_figure(refinement_summary_figure(state.history), folder.summary_path)
        if progress is not None:
            progress("iterations", it, config.iterations)
        log.info("iteration %d: %.2f Å (FSC %.3f), %d kept, %d rejected, %.0f s", it,
                 state.resolution_angstrom, config.fsc_threshold, entry["kept"],
                 entry["rejected"], entry["seconds"])
        folder.commit(it, state.resolution_angstrom, state.history,
                      {**(record or {}), "parameters": config.model_dump(), "iteration": entry,
                       "history": state.history}, stage=stage)
    postprocess_final(folder, setup.n_classes, setup.pixel_size_angstrom, seed=config.seed)
    return RefinementResult(state.history, state.resolution_angstrom)


def postprocess_final(folder: RunFolder, n_classes: int, pixel_size_angstrom: float, *,
                      seed: int) -> None:
    """``swiftalign postprocess`` of ``final/``'s half maps with its mask → ``final/postprocess/``.

    For several classes, ``final/postprocess_classN/``.
    """
    from swiftalign.postprocess import postprocess_half_maps, write_postprocess

    final = folder.final_path
    for c in range(n_classes):
        prefix = "" if n_classes == 1 else f"class{c + 1}_"
        names = [final / f"{prefix}{name}.mrc" for name in ("half1", "half2", "mask")]
        if not all(p.exists() for p in names):
            continue
        h1, h2, mask = (read_map(p).data for p in names)
        result = postprocess_half_maps(h1, h2, mask, pixel_size_angstrom, seed=seed)
        target = final / ("postprocess" if n_classes == 1 else f"postprocess_class{c + 1}")
        write_postprocess(target, result, half_map_names=(names[0].name, names[1].name),
                          mask_name=names[2].name)
        log.info("postprocess of final/%shalf*.mrc: %.2f Å, B-factor %.0f Å² → %s", prefix,
                 result.fsc.resolution_angstrom, result.bfactor_angstrom2, target)
