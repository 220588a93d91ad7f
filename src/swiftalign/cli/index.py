"""Build a reusable reference index (``.swidx``) once; align any number of datasets with it.

``swiftalign index build`` projects the reference, trains (unless the exact
``Flat`` search is chosen) and populates the index, tunes ``nprobe``, and writes
everything to one file: the FAISS index, the pose table, the rotated-gallery
coefficients, the reference map and every parameter (resolution, steps,
symmetry, CTF mode, pixel size, box, version). ``swiftalign align --index-file``
then only queries it. ``--ctf-mode reference`` cannot be persisted (its index
depends on the particles' defocus groups). Noise weighting (``align
--weighting``) needs the particles' noise spectrum: give ``--particles`` (a
representative set from the same detector and ice) and the spectrum is
estimated from them and stored; every dataset aligned with the file is then
whitened by it. Without ``--particles`` the index is unweighted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from swiftalign.cli._common import (
    USER_ERRORS,
    DeviceOption,
    MaxMemoryOption,
    ParticleDiameterOption,
    QuietOption,
    ReferenceAngpixOption,
    VerboseOption,
    console,
    fail,
    progress_bars,
    setup_logging,
)
from swiftalign.cli._guard import describe_job, guarded, hold_lock

index_app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False,
                        pretty_exceptions_enable=False)


@index_app.command("build", help="Build the index of a reference map and write it to one file.")
@guarded
def build_command(
    reference: Annotated[Path, typer.Option("--reference", "-r", help="Reference map (.mrc).")],
    resolution: Annotated[float, typer.Option(help="Resolution limit Tmax (Å): sets the "
                                              "comparison disc and the sampling.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Index file to write "
                                         "(.swidx).")],
    pixel_size: Annotated[float | None, typer.Option(
        help="Pixel size of the particles to align (Å/px); default the map's voxel size "
        "(a map within 5 % is resampled to it).")] = None,
    symmetry: Annotated[str, typer.Option(help="Point group: C1, Cn, Dn, T, O, I.")] = "C1",
    angular_step: Annotated[float | None, typer.Option(
        help="Angular step ΔΦ (°); default asin(Tmax/(N·Ts)).")] = None,
    psi_step: Annotated[float | None, typer.Option(help="In-plane step (°); default ΔΦ.")] = None,
    shift_step: Annotated[float | None, typer.Option(
        help="Shift step (px); default Tmax/(2·Ts).")] = None,
    max_shift: Annotated[float, typer.Option(help="Largest shift searched (px).")] = 8.0,
    particles: Annotated[Path | None, typer.Option(
        "--particles", help="Particles (STAR/.cs) whose noise spectrum whitens the index "
        "(--weighting); default: no weighting.")] = None,
    weighting: Annotated[str | None, typer.Option(
        help="none, noise or ssnr (see align); default noise with --particles, else "
        "none.")] = None,
    particle_diameter: ParticleDiameterOption = None,
    angpix: Annotated[float | None, typer.Option(
        help="Pixel size of --particles (Å/px) when their file has none.")] = None,
    ctf_mode: Annotated[str, typer.Option(
        help="wiener (particles with a CTF) or none (CTF-free particles); reference "
        "cannot be persisted.")] = "wiener",
    index: Annotated[str, typer.Option(
        help="FAISS factory string, Flat, auto (exact up to 200k poses, else IVF-PQ) or "
        "ivfpq.")] = "auto",
    target_recall: Annotated[float, typer.Option(
        help="Recall of the exact nearest neighbour the tuned nprobe must reach.")] = 0.95,
    rerank: Annotated[int, typer.Option(
        help="Index candidates re-scored exactly, used to tune nprobe.")] = 100,
    metric: Annotated[str, typer.Option(help="l2, cosine or pearson.")] = "cosine",
    seed: Annotated[int, typer.Option(help="Random seed (gallery perturbation, training).")] = 0,
    device: DeviceOption = "cpu",
    gpu_fp16: Annotated[bool, typer.Option(
        help="FAISS on the GPU stores codes/lookup tables in float16 (large indexes).")] = False,
    max_memory: MaxMemoryOption = 2.0,
    reference_angpix: ReferenceAngpixOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """``swiftalign index build``."""
    from pydantic import ValidationError

    from swiftalign.alignment import AlignConfig, build_reference_set, reference_at_pixel_size
    from swiftalign.index_file import save_reference_index
    from swiftalign.io.mrc import read_map

    output = Path(output)
    try:
        hold_lock(output, "swiftalign index build")
    except USER_ERRORS as exc:
        fail(exc)
    describe_job(f"index build → {output}")
    setup_logging(verbose, quiet, output.with_name(output.name + ".log"))
    t_start = time.perf_counter()
    if weighting is None:
        weighting = "noise" if particles is not None else "none"
    try:
        if weighting != "none" and particles is None:
            raise ValueError(f"--weighting {weighting} needs --particles to estimate the noise "
                             "spectrum from (or use --weighting none)")
        config = AlignConfig(
            resolution_angstrom=resolution, symmetry=symmetry, angular_step_deg=angular_step,
            psi_step_deg=psi_step, shift_step_px=shift_step, max_shift_px=max_shift,
            ctf_mode=ctf_mode, weighting=weighting, particle_diameter_angstrom=particle_diameter,
            index=index, target_recall=target_recall, rerank=rerank,
            metric=metric, device=device, gpu_float16=gpu_fp16, max_memory_gb=max_memory,
            seed=seed,
        )
        config.symmetry_checked()
        if pixel_size is not None and pixel_size <= 0:
            raise ValueError(f"--pixel-size {pixel_size}: must be positive")
    except (ValidationError, ValueError) as exc:
        fail(exc)
    try:
        if output.is_dir():
            raise ValueError(f"-o {output} is a folder; give an index file name")
        ref = read_map(reference, voxel_size_angstrom=reference_angpix)
        ps = pixel_size if pixel_size is not None else ref.voxel_size_angstrom
        if ps <= 0:
            raise ValueError(f"{reference}: voxel size is 0 in the header; pass --pixel-size "
                             "or --reference-angpix")
        noise = None
        if particles is not None:
            noise, particle_ps = _noise_from_particles(particles, config, angpix=angpix)
            if pixel_size is None:
                ps = particle_ps
            elif abs(particle_ps - ps) > 1e-3 * ps:
                raise ValueError(f"--pixel-size {ps} differs from the pixel size of {particles} "
                                 f"({particle_ps} Å)")
        ref = reference_at_pixel_size(ref, ps)
        with progress_bars(quiet) as progress:
            refset = build_reference_set(ref, config, pixel_size_angstrom=ps, populate=True,
                                         noise=noise, progress=progress)
        manifest = save_reference_index(output, refset)
    except USER_ERRORS as exc:
        fail(exc)
    wall = time.perf_counter() - t_start
    if not quiet:
        t = refset.timings
        console.print(
            f"index {manifest['factory']} of {manifest['n_poses']:,} poses "
            f"({refset.sampling.angular_step_deg:.2f}°, {ps} Å/px, box {refset.box_size}) built in "
            f"{wall:.1f} s (gallery {t.get('gallery', 0):.1f} s, train {t.get('train', 0):.1f} s, "
            f"populate {t.get('populate', 0):.1f} s) → {output} "
            f"({output.stat().st_size / 1024**2:.1f} MB)"
        )


def _noise_from_particles(path: Path, config, *, angpix: float | None):
    """Noise spectra of the particles in ``path`` and their pixel size (Å/px)."""
    import numpy as np

    from swiftalign.alignment import noise_spectrum_for, resolve_device
    from swiftalign.io.particles import open_usable_particles
    from swiftalign.io.star import read_particles

    table = read_particles(path, angpix=angpix)
    table, images = open_usable_particles(table)
    ps = table.pixel_size_angstrom
    if not np.allclose(ps, ps[0], rtol=1e-4):
        raise ValueError(f"{path}: optics groups have different pixel sizes")
    noise = noise_spectrum_for(table, images, np.arange(len(images)),
                               pixel_size_angstrom=float(ps[0]),
                               particle_diameter_angstrom=config.particle_diameter_angstrom,
                               seed=config.seed, device=resolve_device(config.device))
    return noise, float(ps[0])


@index_app.command("info", help="Print the parameters stored in an index file (JSON).")
@guarded
def info_command(
    index_file: Annotated[Path, typer.Argument(help="Index file (.swidx).")],
) -> None:
    """``swiftalign index info``."""
    from swiftalign.index_file import read_manifest

    try:
        manifest = read_manifest(index_file)
    except USER_ERRORS as exc:
        fail(exc)
    typer.echo(json.dumps(manifest, indent=2))
