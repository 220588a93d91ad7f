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

The global search is sampled at ``max(T, global_resolution_angstrom)``;
the local search that follows refines to the steps of ``T`` with its full disc,
so the cost of the global search stays bounded as ``T`` improves.
After the first iteration the shift search is centred on each particle's
previous shift with range ``max_shift_later_px``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from swiftalign.alignment import (
    AlignConfig,
    align_particles,
    build_reference_set,
    check_inputs,
    ctf_params_from_table,
    index_settings,
    noise_spectrum_for,
    reference_ctf_pool,
    resolve_ctf_mode,
    resolve_device,
)
from swiftalign.consensus import consensus
from swiftalign.conventions import shift_px_to_origin_angstrom
from swiftalign.errors import InputError
from swiftalign.fsc import (
    auto_solvent_mask,
    gold_standard_fsc,
    lowpass,
    require_signal,
    write_fsc_star,
)
from swiftalign.io.atomic import StagedOutputs, atomic_write
from swiftalign.io.mrc import MapData, read_map, write_map
from swiftalign.io.particles import ParticleImages
from swiftalign.io.star import ParticleTable, write_particles
from swiftalign.plots import (
    angular_distribution_figure,
    fsc_figure_from_result,
    refinement_summary_figure,
    save_figure,
)
from swiftalign.reconstruction import HalfMapAccumulator
from swiftalign.sampling import DEFAULT_MAX_SHIFT_PX, angular_step_deg, shift_step_px
from swiftalign.search import train_index
from swiftalign.symmetry import check_reference_symmetry, symmetry_matrices

__all__ = ["RefineConfig", "run_refinement"]

log = logging.getLogger(__name__)


class RefineConfig(BaseModel):
    """Validated refinement parameters (units in the names)."""

    model_config = ConfigDict(extra="forbid")

    initial_resolution_angstrom: float = Field(gt=0)
    max_resolution_angstrom: float = Field(default=8.0, gt=0)
    global_resolution_angstrom: float = Field(default=20.0, gt=0)
    symmetry: str = "C1"
    force_symmetry: bool = False  # refine even if a reference disagrees with the symmetry
    repetitions: int = Field(default=3, ge=1)
    iterations: int = Field(default=8, ge=1)
    fsc_threshold: float = Field(default=0.143, gt=0, lt=1)
    low_resolution_join_angstrom: float = Field(default=40.0, ge=0)
    local_passes: int = Field(default=0, ge=0)
    local_angle_deg: float = Field(default=5.0, gt=0)
    local_shift_px: float = Field(default=2.0, gt=0)
    max_shift_px: float = Field(default=DEFAULT_MAX_SHIFT_PX, ge=0)
    max_shift_later_px: float = Field(default=3.0, ge=0)
    ctf_mode: Literal["auto", "wiener", "reference", "none"] = "wiener"
    weighting: Literal["none", "noise", "ssnr"] = "noise"
    particle_diameter_angstrom: float | None = Field(default=None, gt=0)
    index: str = "auto"
    metric: str = "cosine"
    device: str = "cpu"
    max_memory_gb: float = 2.0
    reconstruction: Literal["gridding", "wiener"] = "gridding"
    regularisation: float = Field(default=0.01, gt=0)
    seed: int = 0
    mask_path: str | None = None
    solvent_mask_path: str | None = None


def _counter(progress: Callable[[str, int, int], None] | None, step: str,
             total: int) -> Callable[[int], None]:
    """An increment callback feeding ``progress(step, done, total)``."""
    done = [0]

    def add(m: int) -> None:
        done[0] += m
        if progress is not None:
            progress(step, done[0], total)

    return add


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


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name, then rename (a kill never leaves a truncated file)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _save_noise(path: Path, noise) -> None:
    """Noise spectra to ``.npz`` under a temporary name, then renamed."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, groups=noise.groups, noise_power=noise.noise_power,
                 total_power=noise.total_power, counts=noise.counts)


def _load_noise(path: Path):
    from swiftalign.noise import NoiseSpectrum

    with np.load(path) as z:
        return NoiseSpectrum(z["groups"], z["noise_power"], z["total_power"], z["counts"])


def _residual_noise(images, table, half_maps, sel_of, cons, ctf, *, pixel_size, config):
    """Noise spectra of the residuals of the kept particles against their own half maps."""
    import torch

    from swiftalign.noise import estimate_residual_noise_power, merge_spectra

    device = resolve_device(config.device)
    og_all = (table.particles["rlnOpticsGroup"].to_numpy()
              if "rlnOpticsGroup" in table.particles else np.ones(len(table), int))
    parts = []
    for key, sel in sel_of.items():
        parts.append(estimate_residual_noise_power(
            images, sel, og_all[sel], torch.as_tensor(half_maps[key], device=device),
            cons.euler_deg[sel], cons.shift_yx_px[sel], ctf=ctf,
            pixel_size_angstrom=pixel_size, seed=config.seed))
    return merge_spectra(parts)


#: Parameters ``--continue`` may change (they do not change the result).
_CONTINUE_MAY_CHANGE = ("iterations", "device", "max_memory_gb")


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


def _publish_final(out: Path, it_dir: Path) -> None:
    """Make ``out/final`` a copy of ``it_dir``; at every moment ``final`` is complete or absent.

    The copy is made under a temporary name, the old ``final`` is renamed away,
    the copy renamed into place, and only then the old one deleted.
    """
    final, tmp_final, old_final = out / "final", out / ".final.tmp", out / ".final.old"
    for stale in (tmp_final, old_final):
        if stale.exists():
            shutil.rmtree(stale)
    shutil.copytree(it_dir, tmp_final)
    if final.exists():
        os.replace(final, old_final)
    os.replace(tmp_final, final)
    if old_final.exists():
        shutil.rmtree(old_final)


def _postprocess_final(out: Path, n_classes: int, pixel_size: float, *, seed: int) -> None:
    """``swiftalign postprocess`` of ``final/``'s half maps with its mask → ``final/postprocess/``.

    For several classes, ``final/postprocess_classN/``.
    """
    from swiftalign.postprocess import postprocess_half_maps, write_postprocess

    final = out / "final"
    for c in range(n_classes):
        prefix = "" if n_classes == 1 else f"class{c + 1}_"
        names = [final / f"{prefix}{name}.mrc" for name in ("half1", "half2", "mask")]
        if not all(p.exists() for p in names):
            continue
        h1, h2, mask = (read_map(p).data for p in names)
        result = postprocess_half_maps(h1, h2, mask, pixel_size, seed=seed)
        folder = final / ("postprocess" if n_classes == 1 else f"postprocess_class{c + 1}")
        write_postprocess(folder, result, half_map_names=(names[0].name, names[1].name),
                          mask_name=names[2].name)
        log.info("postprocess of final/%shalf*.mrc: %.2f Å, B-factor %.0f Å² → %s", prefix,
                 result.fsc.resolution_angstrom, result.bfactor_angstrom2, folder)


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporary files (``.NAME.XXXX.tmp``) a killed run left in ``out`` and ``out/it*``."""
    for pattern in (".*.tmp", "it[0-9][0-9][0-9]/.*.tmp"):
        for tmp in out.glob(pattern):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def _local_pass(images, refs, half, rows, poses, shifts, classes, *, config, t_align,
                pixel_size, ctf, n_classes, table, noise):
    """Local search only: ±local_angle_deg and ±local_shift_px around the current poses,
    down to half the steps of ``t_align`` (thesis §7.3)."""
    import torch

    from swiftalign.alignment import particle_vectors, resolve_device
    from swiftalign.fourier import make_disc
    from swiftalign.local_search import refine_local
    from swiftalign.projection import VolumeSpectrum

    device = resolve_device(config.device)
    box = images.box_size
    disc = make_disc(box, min(pixel_size / t_align, 0.5))
    weights = group_of = None
    if noise is not None:
        from swiftalign.noise import coefficient_weights

        weights = coefficient_weights(noise, disc.to(device), config.weighting)
        og = (table.particles["rlnOpticsGroup"].to_numpy()[rows]
              if "rlnOpticsGroup" in table.particles else np.ones(len(rows), int))
        group_of = np.searchsorted(noise.groups, og)
    _, queries = particle_vectors(images, disc, ctf=None, pixel_size_angstrom=pixel_size,
                                  metric=config.metric, device=device, rows=rows,
                                  recentre_shift_yx_px=shifts[rows],
                                  coefficient_weights=weights, weight_group=group_of)
    per_particle_w = None if weights is None else weights[torch.as_tensor(group_of)]
    fine = angular_step_deg(t_align, pixel_size, box) / 2
    rounds = max(1, int(math.ceil(math.log2(max(config.local_angle_deg / fine, 1.0)))) + 1)
    best_d = np.full(len(rows), np.inf)
    out_e = poses[rows].copy()
    out_s = shifts[rows].copy()
    out_c = classes[rows].copy()
    for c in range(n_classes):
        spectrum = VolumeSpectrum(torch.as_tensor(refs[(c, half)], device=device))
        e, s, d = refine_local(
            spectrum, queries, poses[rows], np.zeros((len(rows), 2)), disc=disc,
            metric=config.metric, angle_step_deg=config.local_angle_deg,
            shift_step_px=config.local_shift_px, rounds=rounds,
            ctf=ctf.subset(rows) if ctf is not None else None, pixel_size_angstrom=pixel_size,
            coefficient_weights=per_particle_w,
        )
        better = d < best_d
        best_d[better] = d[better]
        out_e[better] = e[better]
        out_s[better] = s[better] + shifts[rows][better]
        out_c[better] = c
    return out_e, out_s, out_c


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
) -> dict:
    """Run the refinement and write ``OUT_DIR/itNNN/`` and ``OUT_DIR/final/``.

    Parameters
    ----------
    table : ParticleTable
        Particles.
    images : ParticleImages
        Their images.
    references : list of MapData
        One map per class, `(N, N, N)`, at the particles' pixel size.
    out_dir : str or Path
        Output folder.
    config : RefineConfig
    resume : bool
        Continue from the last completed iteration in ``out_dir``.
    progress : callable, optional
        ``progress(step, done, total)``.
    record : dict, optional
        Provenance (version, command line …) stored in each ``run.json``.

    Returns
    -------
    dict
        Per-iteration history (resolution, kept particles, class populations).

    Raises
    ------
    InputError
        Non-cubic or mismatched references, missing CTF columns, bad symmetry.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sym = config.symmetry.upper()
    group = symmetry_matrices(sym)
    checked = [check_inputs(table, images, ref) for ref in references]
    pixel_size = checked[0][0]
    references = [ref for _, ref in checked]
    for ref in references:  # refuse a reference inconsistent with the symmetry (issue 14)
        check_reference_symmetry(ref.data, sym, pixel_size_angstrom=pixel_size, name=str(ref.path),
                                 resolution_angstrom=config.initial_resolution_angstrom,
                                 force=config.force_symmetry)
    box = images.box_size
    ctf = ctf_params_from_table(table) if config.ctf_mode != "none" else None
    halves = _half_sets(table, config.seed)
    n_classes = len(references)
    nyquist = 2.0 * pixel_size
    floor = max(config.max_resolution_angstrom, nyquist)
    mask = None
    if config.mask_path:
        mask = read_map(config.mask_path).data
        if mask.shape != references[0].data.shape:
            raise InputError(f"{config.mask_path}: mask shape {mask.shape} differs from the "
                             f"reference {references[0].data.shape}")
    solvent = read_map(config.solvent_mask_path).data if config.solvent_mask_path else None

    # state: per class, per half, the next reference
    refs = {(c, h): lowpass(references[c].data, config.initial_resolution_angstrom, pixel_size)
            for c in range(n_classes) for h in (1, 2)}
    resolution = config.initial_resolution_angstrom
    history: list[dict] = []
    shifts_prev = np.zeros((len(table), 2))
    poses_prev = np.zeros((len(table), 3))
    classes_prev = np.zeros(len(table), dtype=int)
    start_it = 1
    noise_path = None
    state_path = out / "state.json"
    if resume and state_path.exists():
        _remove_stale_temporaries(out)
        state = json.loads(state_path.read_text())
        history = state["history"]
        start_it = state["iteration"] + 1
        resolution = state["resolution_angstrom"]
        last = out / f"it{state['iteration']:03d}"
        _check_same_parameters(last / "run.json", config)
        for c in range(n_classes):
            for h in (1, 2):
                refs[(c, h)] = read_map(last / f"reference_class{c + 1}_half{h}.mrc").data
        shifts_prev = np.load(last / "shifts.npy")
        poses_prev = np.load(last / "poses.npy")
        classes_prev = np.load(last / "classes.npy")
        noise_path = last / "noise.npz"
        # a run killed after its state was saved but before final/ was replaced
        _publish_final(out, last)
        log.info("continuing after iteration %d (%.2f Å)", state["iteration"], resolution)

    # noise spectra for --weighting: the background outside the particle mask
    noise = None
    if config.weighting != "none" and noise_path is not None and noise_path.exists():
        noise = _load_noise(noise_path)  # the last iteration's residual spectra
    elif config.weighting != "none":
        noise = noise_spectrum_for(
            table, images, np.arange(len(images)), pixel_size_angstrom=pixel_size,
            particle_diameter_angstrom=config.particle_diameter_angstrom, seed=config.seed,
            device=resolve_device(config.device))
    stalled = 0
    if len(history) >= 2:
        stalled = sum(1 for h in history[-2:] if h.get("stalled"))
    for it in range(start_it, config.iterations + 1):
        if stalled >= 2:
            break
        t_it = time.perf_counter()
        t_align = max(resolution, floor)
        t_global = max(t_align, config.global_resolution_angstrom)
        dphi = angular_step_deg(t_align, pixel_size, box)
        ds = shift_step_px(t_align, pixel_size)
        reps = config.repetitions
        n = len(table)
        euler_all = np.zeros((n, reps, 3))
        shift_all = np.zeros((n, reps, 2))
        class_all = np.zeros((n, reps), dtype=int)
        local_pass = it > config.iterations - config.local_passes and it > 1
        timings: dict[str, float] = {}
        t_step = time.perf_counter()
        if local_pass:
            # deterministic: one search per half stands for every repetition
            masked = {k: v * mask if mask is not None else v for k, v in refs.items()}
            for h in (1, 2):
                rows = np.nonzero(halves == h)[0]
                e, sft, cl = _local_pass(
                    images, masked, h, rows, poses_prev, shifts_prev, classes_prev,
                    config=config, t_align=t_align, pixel_size=pixel_size, ctf=ctf,
                    n_classes=n_classes, table=table, noise=noise,
                )
                euler_all[rows] = e[:, None]
                shift_all[rows] = sft[:, None]
                class_all[rows] = cl[:, None]
        for h in (1, 2) if not local_pass else ():
            rows = np.nonzero(halves == h)[0]
            best_d = np.full((reps, len(rows)), np.inf)
            for c in range(n_classes):
                ref_map = refs[(c, h)]
                if mask is not None:
                    ref_map = ref_map * mask
                ref_c = MapData(ref_map, pixel_size, references[c].path)
                acfgs = [AlignConfig(
                    resolution_angstrom=t_global,
                    symmetry=sym,
                    max_shift_px=config.max_shift_px if it == 1 else config.max_shift_later_px,
                    ctf_mode=config.ctf_mode,
                    weighting=config.weighting,
                    index=config.index,
                    metric=config.metric,
                    device=config.device,
                    max_memory_gb=config.max_memory_gb,
                    seed=config.seed * 1_000_003 + it * 1009 + r * 17 + h,
                ) for r in range(reps)]
                # each repetition's own perturbed reference set; one index trained on all
                # of them (per half and class: halves stay independent)
                refsets = [build_reference_set(ref_c, acfg, pixel_size_angstrom=pixel_size,
                                               noise=noise, progress=progress)
                           for acfg in acfgs]
                trained = train_index(
                    [rs.gallery for rs in refsets], index_settings(acfgs[0]),
                    n_particles=len(rows), device=resolve_device(config.device),
                    ctf_disc_pool=None if ctf is None or
                    resolve_ctf_mode(config.ctf_mode, t_global) != "reference" else
                    reference_ctf_pool(ctf.subset(rows), refsets[0].disc, acfgs[0],
                                       pixel_size_angstrom=pixel_size),
                )
                for r in range(reps):
                    res = align_particles(
                        table, images, refsets[r], acfgs[r],
                        rows=rows,
                        initial_shift_yx_px=None if it == 1 else shifts_prev[rows],
                        local_resolution_angstrom=t_align,
                        trained_index=trained,
                        progress=progress,
                        noise=noise,
                    )
                    for step, sec in res.timings.items():
                        timings[f"align_{step}"] = timings.get(f"align_{step}", 0.0) + sec
                    d = res.distance[:, 0]
                    better = d < best_d[r]
                    best_d[r, better] = d[better]
                    euler_all[rows[better], r] = res.euler_deg[better, 0]
                    shift_all[rows[better], r] = res.shift_yx_px[better, 0]
                    class_all[rows[better], r] = c
                del refsets, trained
        timings["align"] = time.perf_counter() - t_step
        t_step = time.perf_counter()
        cons = consensus(euler_all, shift_all, class_all, symmetry_group=group,
                         angle_tolerance_deg=dphi, shift_tolerance_px=ds)
        timings["consensus"] = time.perf_counter() - t_step
        keep = cons.keep
        shifts_prev = cons.shift_yx_px
        poses_prev = cons.euler_deg
        classes_prev = cons.class_index

        # every output of the iteration is written into a hidden staging folder, published
        # as itNNN/ in one rename once complete
        stage = StagedOutputs(out, f"it{it:03d}")
        it_dir = stage.path(out / f"it{it:03d}")
        it_dir.mkdir()
        class_stats = []
        half_maps = {}
        t_step = time.perf_counter()
        inserted = _counter(progress, "reconstruction", int(keep.sum()))
        sel_of: dict[tuple[int, int], np.ndarray] = {}
        full_maps = {}
        for c in range(n_classes):
            # each kept particle inserted once, into its half; the full map (all kept
            # particles together, RELION's final map) from the sum of the halves' data
            acc = HalfMapAccumulator(box, device=resolve_device(config.device))
            for h in (1, 2):
                sel = sel_of[(c, h)] = np.nonzero(keep & (halves == h) & (cons.class_index == c))[0]
                if len(sel) < 2:
                    raise InputError(
                        f"iteration {it}: class {c + 1} half {h} kept only {len(sel)} particles"
                    )
                acc.insert(h, images, sel, cons.euler_deg[sel], cons.shift_yx_px[sel],
                           ctf=ctf.subset(sel) if ctf is not None else None,
                           pixel_size_angstrom=pixel_size, progress=inserted)
            half_maps[(c, 1)], half_maps[(c, 2)], full_maps[c] = acc.maps(
                symmetry_group=group, method=config.reconstruction,
                regularisation=config.regularisation)
            del acc
        timings["reconstruct"] = time.perf_counter() - t_step
        if config.weighting != "none":
            # next iteration's weights: residuals against the maps just made (RELION's σ²)
            t_step = time.perf_counter()
            noise = _residual_noise(images, table, half_maps, sel_of, cons, ctf,
                                    pixel_size=pixel_size, config=config)
            _save_noise(it_dir / "noise.npz", noise)
            timings["noise"] = time.perf_counter() - t_step
        t_step = time.perf_counter()
        resolutions = []
        for c in range(n_classes):
            h1, h2 = half_maps[(c, 1)], half_maps[(c, 2)]
            # the map of all kept particles reconstructed together (RELION's final map; what
            # relion_reconstruct gives from particles.star), not the mean of the half maps
            avg = full_maps[c]
            smask = solvent if solvent is not None else auto_solvent_mask(avg, pixel_size)
            fsc = gold_standard_fsc(h1, h2, smask, pixel_size, threshold=config.fsc_threshold,
                                    seed=config.seed + it)
            require_signal(fsc, f"iteration {it}, class {c + 1}")
            res_c = max(fsc.resolution_angstrom, nyquist)
            resolutions.append(res_c)
            prefix = "" if n_classes == 1 else f"class{c + 1}_"
            write_map(it_dir / f"{prefix}half1.mrc", h1, pixel_size)
            write_map(it_dir / f"{prefix}half2.mrc", h2, pixel_size)
            write_map(it_dir / f"{prefix}map_unfiltered.mrc", avg, pixel_size)
            write_map(it_dir / f"{prefix}mask.mrc", smask, pixel_size)  # the FSC's mask
            write_map(it_dir / f"{prefix}map.mrc", lowpass(avg, res_c, pixel_size), pixel_size)
            write_fsc_star(it_dir / f"{prefix}fsc.star", fsc, pixel_size, average_map=avg, mask=smask,
                           half_map_names=(f"{prefix}half1.mrc", f"{prefix}half2.mrc"),
                           mask_name=config.solvent_mask_path or "auto")
            save_figure(fsc_figure_from_result(
                fsc, pixel_size, f"iteration {it}, class {c + 1}: {fsc.resolution_text()}"),
                it_dir / f"{prefix}fsc.png")
            n1 = half_maps[(c, 1)]
            n2 = half_maps[(c, 2)]
            if config.low_resolution_join_angstrom > 0:
                n1, n2 = _join_low_resolution(n1, n2, config.low_resolution_join_angstrom,
                                              pixel_size)
            for h, m in ((1, n1), (2, n2)):
                refs[(c, h)] = lowpass(m, res_c, pixel_size)
                write_map(it_dir / f"reference_class{c + 1}_half{h}.mrc", refs[(c, h)],
                          pixel_size)
            class_stats.append({
                "class": c + 1,
                "particles": int(((cons.class_index == c) & keep).sum()),
                "resolution_angstrom": float(fsc.resolution_angstrom),
                "resolution_05_angstrom": float(fsc.resolution_05_angstrom),
                "resolution_unmasked_angstrom": float(fsc.resolution_unmasked_angstrom),
                "resolution_is_bound": bool(fsc.resolution_is_bound),
            })
        timings["fsc_and_maps"] = time.perf_counter() - t_step
        new_res = float(min(resolutions))
        shell_old = box * pixel_size / resolution
        shell_new = box * pixel_size / new_res
        is_stalled = shell_new - shell_old < 1.0
        stalled = stalled + 1 if is_stalled else 0
        resolution = new_res

        origin = shift_px_to_origin_angstrom(cons.shift_yx_px, pixel_size)
        updates = {
            "rlnAngleRot": cons.euler_deg[:, 0],
            "rlnAngleTilt": cons.euler_deg[:, 1],
            "rlnAnglePsi": cons.euler_deg[:, 2],
            "rlnOriginXAngst": origin[:, 0],
            "rlnOriginYAngst": origin[:, 1],
            "rlnRandomSubset": halves,
            "rlnClassNumber": cons.class_index + 1,
            "rlnSwiftalignAngularSpread": cons.angular_spread_deg,
            "rlnSwiftalignShiftSpread": cons.shift_spread_px,
            "rlnSwiftalignKept": keep.astype(int),
        }
        # particles.star holds exactly the particles in this iteration's maps, so that
        # relion_reconstruct on it reproduces them; the rejected ones (back in the next
        # iteration) keep their consensus poses and spreads in particles_rejected.star.
        write_particles(it_dir / "particles.star", table, box_size=box, updates=updates,
                        keep=keep)
        if (~keep).any():
            write_particles(it_dir / "particles_rejected.star", table, box_size=box,
                            updates=updates, keep=~keep)
        else:  # none rejected: no stale list from an interrupted attempt
            (it_dir / "particles_rejected.star").unlink(missing_ok=True)
        save_figure(angular_distribution_figure(
            cons.euler_deg[keep, 0], cons.euler_deg[keep, 1],
            title=f"iteration {it}: kept particles"), it_dir / "angdist.png")
        _save_npy(it_dir / "shifts.npy", shifts_prev)
        _save_npy(it_dir / "poses.npy", poses_prev)
        _save_npy(it_dir / "classes.npy", classes_prev)
        entry = {
            "iteration": it,
            "alignment_resolution_angstrom": t_align,
            "global_resolution_angstrom": t_global,
            "angular_step_deg": dphi,
            "shift_step_px": ds,
            "resolution_angstrom": new_res,
            "resolution_is_bound": any(c["resolution_is_bound"] for c in class_stats),
            "kept": int(keep.sum()),
            "rejected": int((~keep).sum()),
            "classes": class_stats,
            "stalled": bool(is_stalled),
            "local_pass": bool(local_pass),
            "seconds": time.perf_counter() - t_it,
            "timings_s": {"alignment": timings["align"] + timings["consensus"],
                          "reconstruction": timings["reconstruct"],
                          "fsc_and_output": time.perf_counter() - t_step, **timings},
        }
        history.append(entry)
        save_figure(refinement_summary_figure(history), out / "summary.png")
        if progress is not None:
            progress("iterations", it, config.iterations)
        log.info("iteration %d: %.2f Å (FSC %.3f), %d kept, %d rejected, %.0f s", it, new_res,
                 config.fsc_threshold, entry["kept"], entry["rejected"], entry["seconds"])
        run = {**(record or {}), "parameters": config.model_dump(), "iteration": entry,
               "history": history}
        from swiftalign.cli._common import write_json

        write_json(it_dir / "run.json", run)
        stage.publish()
        it_dir = out / f"it{it:03d}"
        write_json(state_path, {"iteration": it, "resolution_angstrom": resolution,
                                "history": history})
        _publish_final(out, it_dir)
    _postprocess_final(out, n_classes, pixel_size, seed=config.seed)
    return {"history": history, "resolution_angstrom": resolution}
