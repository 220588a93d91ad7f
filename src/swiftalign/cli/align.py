"""Align particles against a reference map: (rot, tilt, psi) and shift for each particle.

Sampling follows the resolution limit (thesis eq. 4.20–4.21) unless the steps
are given. Writes a RELION 3.1 STAR file keeping every input column, with
rlnAngleRot/Tilt/Psi (°), rlnOriginXAngst/YAngst (Å) and rlnSwiftalignScore;
next to it OUTPUT.log, OUTPUT_run.json (parameters, versions, machine, timings)
and OUTPUT_angdist.png (viewing directions). `swiftalign report FOLDER` makes an
HTML report of the folder.
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
    QuietOption,
    ReferenceAngpixOption,
    VerboseOption,
    console,
    fail,
    progress_bars,
    run_record,
    setup_logging,
    write_json,
)


def align_command(
    particles: Annotated[Path, typer.Argument(help="Particle STAR file (RELION 3.0 or 3.1+).")],
    reference: Annotated[Path, typer.Option("--reference", "-r", help="Reference map (.mrc), "
                                            "same box and pixel size as the particles.")],
    resolution: Annotated[float, typer.Option(help="Resolution limit Tmax (Å): sets the "
                                              "comparison disc and the sampling.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output STAR file.")],
    symmetry: Annotated[str, typer.Option(
        help="Point group: C1, Cn, Dn, T, O, I (RELION conventions).")] = "C1",
    angular_step: Annotated[float | None, typer.Option(
        help="Angular step ΔΦ (°); default asin(Tmax/(N·Ts)).")] = None,
    psi_step: Annotated[float | None, typer.Option(help="In-plane step (°); default ΔΦ.")] = None,
    shift_step: Annotated[float | None, typer.Option(
        help="Shift step (px); default Tmax/(2·Ts).")] = None,
    max_shift: Annotated[float, typer.Option(help="Largest shift searched (px).")] = 8.0,
    ctf_mode: Annotated[str, typer.Option(
        help="wiener: Wiener-corrected particles vs clean references; reference: CTF "
        "groups applied to references; auto: reference below 22 Å, else wiener (measured, "
        "README); none: no CTF.")] = "auto",
    weighting: Annotated[str, typer.Option(
        help="Fourier-coefficient weights in the distance: none; noise: 1/σ(|k|) whitening "
        "by the noise power measured outside the particle mask per optics group; ssnr: "
        "whitening × SSNR/(1+SSNR).")] = "noise",
    transform: Annotated[str, typer.Option(
        help="Search features: dft (Fourier disc) or dct (orthonormal 2D DCT quarter disc; "
        "shifts applied on the full image, slower).")] = "dft",
    particle_diameter: Annotated[float | None, typer.Option(
        help="Particle mask diameter (Å) for the noise estimate; default 0.8 × box.")] = None,
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
    max_memory: MaxMemoryOption = 2.0,
    angpix: AngpixOption = None,
    reference_angpix: ReferenceAngpixOption = None,
    seed: Annotated[int, typer.Option(help="Random seed (gallery perturbation, training).")] = 0,
    max_bad_fraction: MaxBadFractionOption = 0.01,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    import numpy as np
    from pydantic import ValidationError

    from swiftalign.alignment import AlignConfig, align_particles
    from swiftalign.conventions import shift_px_to_origin_angstrom
    from swiftalign.io.mrc import read_map
    from swiftalign.io.particles import open_usable_particles
    from swiftalign.io.star import read_particles, write_particles

    output = Path(output)
    setup_logging(verbose, quiet, output.with_name(output.stem + ".log"))
    t_start = time.perf_counter()
    try:
        config = AlignConfig(
            resolution_angstrom=resolution, symmetry=symmetry, angular_step_deg=angular_step,
            psi_step_deg=psi_step, shift_step_px=shift_step, max_shift_px=max_shift,
            ctf_mode=ctf_mode, weighting=weighting, transform=transform,
            particle_diameter_angstrom=particle_diameter, index=index, nprobe=nprobe,
            target_recall=target_recall,
            rerank=rerank, ctf_candidates=ctf_candidates, metric=metric, k=k,
            local_rounds=local_rounds, local_resolution_factor=local_resolution_factor,
            device=device, max_memory_gb=max_memory, seed=seed,
        )
        config.symmetry_checked()
    except (ValidationError, ValueError) as exc:
        fail(exc)
    try:
        if output.is_dir():
            raise ValueError(f"-o {output} is a folder; give a STAR file name")
        if output.resolve() == Path(particles).resolve():
            raise ValueError(f"-o {output} is the input STAR file; give another name")
        table = read_particles(particles, angpix=angpix)
        ref = read_map(reference, voxel_size_angstrom=reference_angpix)
        table, images = open_usable_particles(table, max_bad_fraction=max_bad_fraction)
        with progress_bars(quiet) as progress:
            result = align_particles(table, images, ref, config, progress=progress)
        images.close()
        origin = shift_px_to_origin_angstrom(result.shift_yx_px, result.pixel_size_angstrom)
        updates = {
            "rlnAngleRot": result.euler_deg[:, 0, 0],
            "rlnAngleTilt": result.euler_deg[:, 0, 1],
            "rlnAnglePsi": result.euler_deg[:, 0, 2],
            "rlnOriginXAngst": origin[:, 0, 0],
            "rlnOriginYAngst": origin[:, 0, 1],
            "rlnSwiftalignScore": result.score[:, 0],
        }
        write_particles(output, table, box_size=result.box_size, updates=updates)
        if k > 1:
            kk = result.euler_deg.shape[1]
            expanded = table.subset(np.repeat(np.arange(len(table)), kk))
            topk = {
                "rlnAngleRot": result.euler_deg[..., 0].ravel(),
                "rlnAngleTilt": result.euler_deg[..., 1].ravel(),
                "rlnAnglePsi": result.euler_deg[..., 2].ravel(),
                "rlnOriginXAngst": origin[..., 0].ravel(),
                "rlnOriginYAngst": origin[..., 1].ravel(),
                "rlnSwiftalignScore": result.score.ravel(),
                "rlnSwiftalignRank": np.tile(np.arange(1, kk + 1), len(table)),
            }
            write_particles(output.with_name(f"{output.stem}_top{kk}.star"), expanded,
                            box_size=result.box_size, updates=topk)
    except USER_ERRORS as exc:
        fail(exc)
    angdist = output.with_name(output.stem + "_angdist.png")
    try:
        from swiftalign.plots import angular_distribution_figure, save_figure

        save_figure(angular_distribution_figure(
            result.euler_deg[:, 0, 0], result.euler_deg[:, 0, 1],
            title=f"{output.name}: assigned orientations"), angdist)
    except OSError as exc:
        fail(exc)
    wall = time.perf_counter() - t_start
    s = result.sampling
    record = run_record(
        command="align",
        device=device,
        parameters=config.model_dump(),
        inputs={"particles": str(particles), "reference": str(reference)},
        outputs={"particles": str(output.resolve()), "angular_distribution": str(angdist),
                 "log": str(output.with_name(output.stem + ".log"))},
        sampling=vars(s),
        index={"nprobe": result.search.nprobe, "recall": result.search.recall,
               "bytes_per_pose": result.search.bytes_per_pose},
        timings_s={**result.timings, "wall": wall},
        n_particles=len(table),
    )
    write_json(output.with_name(output.stem + "_run.json"), record)
    if not quiet:
        console.print(
            f"aligned {len(table)} particles against {s.n_poses:,} poses "
            f"(ΔΦ {s.angular_step_deg:.2f}°, Δs {s.shift_step_px:.2f} px) in {wall:.1f} s "
            f"→ {output}"
        )
