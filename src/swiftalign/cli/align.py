"""Align particles against a reference map: (rot, tilt, psi) and shift for each particle.

Sampling follows the resolution limit (thesis eq. 4.20–4.21) unless the steps
are given. Writes a RELION 3.1 STAR file keeping every input column, with
rlnAngleRot/Tilt/Psi (°), rlnOriginXAngst/YAngst (Å) and rlnSwiftalignScore;
next to it OUTPUT.log, OUTPUT_run.json (parameters, versions, machine, timings)
and OUTPUT_angdist.png (viewing directions). `swiftalign report FOLDER` makes an
HTML report of the folder. With --index-file (from `swiftalign index build`) the
index is only queried; then --watch DIR aligns STAR files as they appear, and
--scheduler/--workers spread the particles over a Dask cluster.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from swiftalign.cli._common import (
    USER_ERRORS,
    AngpixOption,
    DeviceOption,
    MaxBadFractionOption,
    MaxMemoryOption,
    ParticleDiameterOption,
    QuietOption,
    ReferenceAngpixOption,
    VerboseOption,
    WeightingOption,
    console,
    fail,
    progress_bars,
    run_record,
    setup_logging,
    write_json,
)
from swiftalign.cli._guard import describe_job, hold_lock
from swiftalign.sampling import DEFAULT_MAX_SHIFT_PX

#: unit suffixes of AlignConfig fields that their command-line options leave out
_UNIT_SUFFIXES = ("_angstrom", "_deg", "_px")


def _option_name(field_name: str) -> str:
    """The ``align`` option of an AlignConfig field (``max_shift_px`` → ``max_shift``)."""
    for suffix in _UNIT_SUFFIXES:
        if field_name.endswith(suffix):
            return field_name[: -len(suffix)]
    return field_name


def _check_index_options(ctx: typer.Context, index_file: Path, base: dict) -> None:
    """Refuse options given on the command line that differ from what the index was built with.

    The index fixes the search and noise sections (:mod:`swiftalign.configs`).
    """
    from swiftalign.configs import NoiseConfig, SearchConfig

    for name in (*SearchConfig.model_fields, *NoiseConfig.model_fields):
        option = _option_name(name)
        if option not in ctx.params:
            continue
        source = ctx.get_parameter_source(option)
        if getattr(source, "name", "") == "COMMANDLINE" and ctx.params[option] != base.get(name):
            raise ValueError(
                f"{index_file}: built with {name} = {base.get(name)!r}; --"
                f"{option.replace('_', '-')} {ctx.params[option]!r} differs (leave it out or "
                "rebuild the index)")


def _check_modes(particles: Path | None, watch: Path | None, index_file: Path | None,
                 scheduler: str | None, workers: int | None, k: int) -> None:
    """Refuse combinations of the four execution modes (map, index, watch, cluster)."""
    if (particles is None) == (watch is None):
        raise ValueError("give either a PARTICLES.star file or --watch DIR")
    if (watch is not None or scheduler is not None or workers is not None) and not index_file:
        flag = "--watch" if watch is not None else "--scheduler/--workers"
        raise ValueError(f"{flag} needs --index-file (build one with `swiftalign index build`)")
    if watch is not None and (scheduler is not None or workers is not None):
        raise ValueError("--watch aligns in this process; leave out --scheduler/--workers")
    if watch is not None and k > 1:
        raise ValueError("-k > 1 is not supported with --watch")


def _align_config(ctx: typer.Context, index_file: Path | None, reference: Path | None,
                  per_run: dict):
    """The AlignConfig of the command line: from the index manifest, or from the options."""
    from swiftalign.alignment import AlignConfig
    from swiftalign.configs import NoiseConfig, SearchConfig

    p = ctx.params
    if index_file is not None:
        from swiftalign.index_file import manifest_config, read_manifest

        if reference is not None:
            raise ValueError(f"--reference and --index-file are exclusive: {index_file} "
                             "holds its reference map")
        base = manifest_config(read_manifest(index_file))
        _check_index_options(ctx, index_file, base)
        config = AlignConfig(**{**base, **per_run})
    else:
        if reference is None or p["resolution"] is None:
            raise ValueError("give --reference and --resolution (or --index-file)")
        fields = {name: p[_option_name(name)] for name in
                  (*SearchConfig.model_fields, *NoiseConfig.model_fields)
                  if _option_name(name) in p}
        config = AlignConfig(**fields, **per_run)
    config.symmetry_checked()
    return config


def align_command(
    ctx: typer.Context,
    particles: Annotated[Path | None, typer.Argument(
        help="Particle STAR file (RELION 3.0 or 3.1+) or cryoSPARC .cs file; not with --watch.")] = None,
    reference: Annotated[Path | None, typer.Option(
        "--reference", "-r", help="Reference map (.mrc), same box and pixel size as the "
        "particles (or give --index-file).")] = None,
    resolution: Annotated[float | None, typer.Option(
        help="Resolution limit Tmax (Å): sets the comparison disc and the sampling "
        "(stored in an --index-file).")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output STAR file.")] = ...,
    index_file: Annotated[Path | None, typer.Option(
        help="Persisted index (`swiftalign index build`): no projection, no training; "
        "resolution, sampling, symmetry, CTF mode and metric come from it.")] = None,
    watch: Annotated[Path | None, typer.Option(
        help="Align STAR files appearing in this folder (once complete) against --index-file, "
        "appending to -o; processed files are recorded in OUTPUT_batches.json, so a restart "
        "never re-aligns a batch. Stops after --watch-timeout idle seconds or when "
        "DIR/swiftalign.stop exists.")] = None,
    watch_timeout: Annotated[float | None, typer.Option(
        help="Stop watching after this many seconds without a new batch (default: only "
        "DIR/swiftalign.stop stops).")] = None,
    watch_interval: Annotated[float, typer.Option(
        help="Seconds between folder scans (a file is complete when its size and its "
        "stacks' sizes are unchanged over one interval).")] = 2.0,
    scheduler: Annotated[str | None, typer.Option(
        help="Dask scheduler address (tcp://host:8786): chunks of particles are aligned on "
        "its workers against --index-file.")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Without --scheduler: a local Dask cluster of this many worker processes.")] = None,
    chunk_size: Annotated[int, typer.Option(
        help="Particles per Dask task.")] = 1000,
    symmetry: Annotated[str, typer.Option(
        help="Point group as RELION names it: C1, Cn, Ci, Cs, Cnv, Cnh, Sn, Dn, Dnv, Dnh, T, Td, "
        "Th, O, Oh, I (=I2), I1, I3, I4, Ih … (RELION's operators and axes).")] = "C1",
    force_symmetry: Annotated[bool, typer.Option(
        "--force-symmetry", help="Align even when the reference disagrees with its own "
        "symmetry (agreement below 0.9, see swiftalign.symmetry).")] = False,
    angular_step: Annotated[float | None, typer.Option(
        help="Angular step ΔΦ (°); default asin(Tmax/(N·Ts)).")] = None,
    psi_step: Annotated[float | None, typer.Option(help="In-plane step (°); default ΔΦ.")] = None,
    shift_step: Annotated[float | None, typer.Option(
        help="Shift step (px); default Tmax/(2·Ts).")] = None,
    max_shift: Annotated[float, typer.Option(help="Largest shift searched (px).")]
    = DEFAULT_MAX_SHIFT_PX,
    ctf_mode: Annotated[str, typer.Option(
        help="wiener: Wiener-corrected particles vs clean references; reference: CTF "
        "groups applied to references; auto: reference below 22 Å, else wiener (measured, "
        "README); none: no CTF.")] = "auto",
    weighting: WeightingOption = "noise",
    transform: Annotated[str, typer.Option(
        help="Search features: dft (Fourier disc) or dct (orthonormal 2D DCT quarter disc; "
        "shifts applied on the full image, slower).")] = "dft",
    particle_diameter: ParticleDiameterOption = None,
    index: Annotated[str, typer.Option(
        help="FAISS factory string (Flat, PCA128,Flat, IVF1024,PQ32, "
        "OPQ32_128,IVF1024,PQ32 …), auto (exact up to 200k poses, else IVF-PQ) or "
        "ivfpq (IVF-PQ sized for the reference set).")] = "auto",
    nprobe: Annotated[int | None, typer.Option(
        help="IVF lists visited per particle; default tuned to --target-recall.")] = None,
    target_recall: Annotated[float, typer.Option(
        help="Recall (fraction, 0–1) of the exact nearest neighbour the tuned nprobe must "
        "reach.")] = 0.95,
    rerank: Annotated[int, typer.Option(
        help="Index candidates re-scored exactly (compressed indexes).")] = 100,
    ctf_candidates: Annotated[int, typer.Option(
        help="Candidates re-scored with each particle's own CTF.")] = 20,
    metric: Annotated[str, typer.Option(
        help="Distance between particle and reference vectors: l2, cosine or pearson.")] = "cosine",
    k: Annotated[int, typer.Option("-k", help="Best matches per particle (k > 1 also writes "
                                   "OUTPUT_topK.star).")] = 1,
    local_rounds: Annotated[int, typer.Option(
        help="Rounds of local refinement around the best match (0: off).")] = 2,
    local_resolution_factor: Annotated[float, typer.Option(
        help="The local refinement compares frequencies up to resolution × this factor "
        "(0–1, Nyquist-capped; 1: the global disc).")] = 0.5,
    device: DeviceOption = "cpu",
    gpu_fp16: Annotated[bool, typer.Option(
        help="FAISS on the GPU stores codes/lookup tables in float16 (large indexes).")] = False,
    max_memory: MaxMemoryOption = 2.0,
    angpix: AngpixOption = None,
    reference_angpix: ReferenceAngpixOption = None,
    seed: Annotated[int, typer.Option(help="Random seed (gallery perturbation, training).")] = 0,
    max_bad_fraction: MaxBadFractionOption = 0.01,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """``swiftalign align`` (help: the module docstring)."""
    from pydantic import ValidationError

    output = Path(output)
    try:
        hold_lock(output, f"swiftalign align → {output}")
    except USER_ERRORS as exc:
        fail(exc)
    describe_job(f"align → {output}")
    setup_logging(verbose, quiet, output.with_name(output.stem + ".log"))
    t_start = time.perf_counter()
    per_run = {"nprobe": nprobe, "rerank": rerank, "ctf_candidates": ctf_candidates, "k": k,
               "local_rounds": local_rounds, "local_resolution_factor": local_resolution_factor,
               "device": device, "gpu_float16": gpu_fp16, "max_memory_gb": max_memory,
               "force_symmetry": force_symmetry}
    try:
        _check_modes(particles, watch, index_file, scheduler, workers, k)
        config = _align_config(ctx, index_file, reference, per_run)
    except (ValidationError, *USER_ERRORS) as exc:
        fail(exc)
    if watch is not None:
        _watch(watch, index_file, config, output, angpix=angpix,
               max_bad_fraction=max_bad_fraction, timeout_s=watch_timeout,
               interval_s=watch_interval, quiet=quiet)
        return
    try:
        table, images = _open_particles(particles, output, index_file, config, angpix=angpix,
                                        max_bad_fraction=max_bad_fraction)
        if scheduler is not None or workers is not None:
            from swiftalign.cluster import align_on_cluster

            images.close()
            with progress_bars(quiet) as progress:
                result = align_on_cluster(table, index_file, config, scheduler=scheduler,
                                          n_workers=workers or 1, chunk_size=chunk_size,
                                          progress=progress)
        else:
            result = _align_here(table, images, config, index_file, reference,
                                 reference_angpix=reference_angpix, quiet=quiet)
    except (ImportError, *USER_ERRORS) as exc:
        fail(exc)
    try:
        _write_outputs(output, table, result, k=k, config=config, device=device, t_start=t_start,
                       inputs={"particles": str(particles), "reference": str(reference),
                               "index_file": str(index_file) if index_file else None,
                               "scheduler": scheduler, "workers": workers})
    except USER_ERRORS as exc:
        fail(exc)
    s = result.sampling
    wall = time.perf_counter() - t_start
    if not quiet:
        console.print(
            f"aligned {len(table)} particles against {s.n_poses:,} poses "
            f"(ΔΦ {s.angular_step_deg:.2f}°, Δs {s.shift_step_px:.2f} px) in {wall:.1f} s "
            f"→ {output}"
        )


def _write_outputs(output: Path, table, result, *, k: int, config, device: str, t_start: float,
                   inputs: dict) -> None:
    """The STAR file(s), the angular-distribution plot and run.json, published together."""
    import numpy as np

    from swiftalign.io.atomic import publish_together
    from swiftalign.io.star import write_particles
    from swiftalign.plots import angular_distribution_figure, save_figure

    angdist = output.with_name(output.stem + "_angdist.png")
    with publish_together(output.parent, output.name) as stage:
        write_particles(stage.path(output), table, box_size=result.box_size,
                        updates=result.star_columns())
        if k > 1:
            kk = result.euler_deg.shape[1]
            expanded = table.subset(np.repeat(np.arange(len(table)), kk))
            write_particles(stage.path(output.with_name(f"{output.stem}_top{kk}.star")), expanded,
                            box_size=result.box_size, updates=result.topk_columns())
        save_figure(angular_distribution_figure(
            result.euler_deg[:, 0, 0], result.euler_deg[:, 0, 1],
            title=f"{output.name}: assigned orientations"), stage.path(angdist))
        s = result.sampling
        record = run_record(
            command="align", device=device, parameters=config.model_dump(), inputs=inputs,
            outputs={"particles": str(output.resolve()), "angular_distribution": str(angdist),
                     "log": str(output.with_name(output.stem + ".log"))},
            sampling=vars(s),
            index={"factory": result.search.factory, "nprobe": result.search.nprobe,
                   "recall": result.search.recall,
                   "bytes_per_pose": result.search.bytes_per_pose},
            timings_s={**result.timings, "wall": time.perf_counter() - t_start},
            n_particles=len(table),
        )
        write_json(stage.path(output.with_name(output.stem + "_run.json")), record)


def _open_particles(particles: Path, output: Path, index_file: Path | None, config, *,
                    angpix: float | None, max_bad_fraction: float):
    """Read and check the particles (and that an index file fits them) before any long work."""
    from swiftalign.io.particles import open_usable_particles
    from swiftalign.io.star import read_particles

    if output.is_dir():
        raise ValueError(f"-o {output} is a folder; give a STAR file name")
    if output.resolve() == Path(particles).resolve():
        raise ValueError(f"-o {output} is the input STAR file; give another name")
    table = read_particles(particles, angpix=angpix)
    table, images = open_usable_particles(table, max_bad_fraction=max_bad_fraction)
    if index_file is not None:
        from swiftalign.alignment import check_reference_set
        from swiftalign.index_file import read_header

        check_reference_set(table, images, read_header(index_file), config)
    return table, images


def _align_here(table, images, config, index_file: Path | None, reference: Path | None, *,
                reference_angpix: float | None, quiet: bool):
    """Align in this process against the index file or the reference map."""
    from swiftalign.alignment import align_particles, resolve_device
    from swiftalign.index_file import load_reference_index
    from swiftalign.io.mrc import read_map

    t_load = 0.0
    if index_file is not None:
        t0 = time.perf_counter()
        ref = load_reference_index(index_file, device=resolve_device(config.device))
        t_load = time.perf_counter() - t0
    else:
        ref = read_map(reference, voxel_size_angstrom=reference_angpix, box_px=images.box_size,
                       pixel_size_angstrom=float(table.pixel_size_angstrom[0]))
    with progress_bars(quiet) as progress:
        result = align_particles(table, images, ref, config, progress=progress)
    if index_file is not None:
        result.timings["index_load"] = t_load
    images.close()
    return result


def _watch(folder: Path, index_file: Path, config, output: Path, *, angpix, max_bad_fraction,
           timeout_s, interval_s, quiet) -> None:
    """``--watch``: align STAR files as they appear, with a running summary."""
    from swiftalign.watch import FolderWatcher, align_stream

    def report(b) -> None:
        if not quiet:
            console.print(b.describe())

    try:
        if not Path(folder).is_dir():
            raise ValueError(f"--watch {folder}: no such folder")
        if output.is_dir():
            raise ValueError(f"-o {output} is a folder; give a STAR file name")
        watcher = FolderWatcher(folder, interval_s=interval_s, idle_timeout_s=timeout_s,
                                exclude=[output], angpix=angpix)
        summary = align_stream(watcher, index_file, config, output, angpix=angpix,
                               max_bad_fraction=max_bad_fraction, on_batch=report)
    except USER_ERRORS as exc:
        fail(exc)
    if not quiet:
        console.print(summary.describe())
