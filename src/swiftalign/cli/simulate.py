"""Simulate a particle dataset with ground truth from a map.

Writes OUTPUT/particles.mrcs, OUTPUT/particles.star (true poses, CTF),
OUTPUT/simulate.log and OUTPUT/run.json (parameters, seed, versions, machine, timings).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from swiftalign.cli._common import (
    USER_ERRORS,
    QuietOption,
    VerboseOption,
    console,
    fail,
    setup_logging,
    write_run_json,
)
from swiftalign.sampling import DEFAULT_MAX_SHIFT_PX


def simulate_command(
    map_path: Annotated[Path, typer.Argument(help="Reference map (.mrc), cubic.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    n_particles: Annotated[int, typer.Option("-n", "--n-particles", min=1,
                                             help="Number of particles.")] = 2000,
    snr_db: Annotated[float, typer.Option(help="SNR in dB: variance of the clean "
                                          "CTF-modulated projection / noise variance.")] = -10.0,
    shift_sigma: Annotated[float, typer.Option(help="Std of in-plane shifts (px).")] = 3.0,
    max_shift: Annotated[float, typer.Option(
        help="Largest shift (px): Gaussian shifts beyond it are redrawn; default = align's "
        "default --max-shift, so every true shift is inside its search.")] = DEFAULT_MAX_SHIFT_PX,
    symmetry: Annotated[str, typer.Option(help="Point group; true poses are put in its "
                                          "asymmetric unit.")] = "C1",
    defocus_min: Annotated[float, typer.Option(help="Minimum mean defocus (Å).")] = 5000.0,
    defocus_max: Annotated[float, typer.Option(help="Maximum mean defocus (Å).")] = 25000.0,
    astigmatism_max: Annotated[float, typer.Option(help="Maximum defocus U−V (Å).")] = 500.0,
    voltage: Annotated[float, typer.Option(help="Voltage (kV).")] = 300.0,
    cs: Annotated[float, typer.Option(help="Spherical aberration (mm).")] = 2.7,
    amplitude_contrast: Annotated[float, typer.Option(help="Amplitude contrast (fraction).")] = 0.1,
    noise_color: Annotated[float, typer.Option(
        help="Exponent a of the noise power spectrum 1/|k|^a (0 white, 1 for 1/f-like ice "
        "background); the pixel variance, hence --snr-db, is unchanged.")] = 0.0,
    no_ctf: Annotated[bool, typer.Option("--no-ctf", help="Do not apply a CTF.")] = False,
    angpix: Annotated[float | None, typer.Option(help="Map voxel size (Å) when the header "
                                                 "says 0; also the particles' pixel size.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (poses, shifts, defocus, noise).")] = 0,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """``swiftalign simulate`` (help: the module docstring)."""
    from swiftalign.api import simulate
    from swiftalign.io.mrc import read_map

    t0 = time.perf_counter()
    setup_logging(verbose, quiet, Path(output) / "simulate.log")
    try:
        import math

        if not math.isfinite(snr_db):
            raise ValueError(f"--snr-db {snr_db}: must be a finite number of dB")
        if not 0 < defocus_min <= defocus_max:
            raise ValueError(f"--defocus-min {defocus_min} / --defocus-max {defocus_max}: need "
                             "0 < min <= max (Å)")
        if not noise_color >= 0:
            raise ValueError(f"--noise-color {noise_color}: must be >= 0 (0 white, 1 for 1/f)")
        if astigmatism_max < 0 or shift_sigma < 0 or max_shift < 0:
            raise ValueError("--astigmatism-max, --shift-sigma and --max-shift must not be "
                             "negative")
        ref = read_map(map_path, voxel_size_angstrom=angpix)
        parameters = dict(
            n_particles=n_particles, snr_db=snr_db, shift_sigma_px=shift_sigma,
            max_shift_px=max_shift,
            defocus_min_angstrom=defocus_min, defocus_max_angstrom=defocus_max,
            astigmatism_max_angstrom=astigmatism_max, voltage_kv=voltage, cs_mm=cs,
            amplitude_contrast=amplitude_contrast, symmetry=symmetry, ctf=not no_ctf, seed=seed,
            noise_psd_exponent=noise_color,
        )
        if ref.voxel_size_angstrom <= 0:
            raise ValueError(f"{map_path}: voxel size is 0 in the header; pass --angpix")
        sim = simulate(ref, output_dir=output, **parameters)
    except USER_ERRORS as exc:
        fail(exc)
    write_run_json(Path(output) / "run.json", started=t0,
        command="simulate", parameters=parameters, inputs={"map": str(map_path)},
        outputs={"particles": str(sim.star_path)})
    if not quiet:
        console.print(f"wrote {len(sim.truth)} particles to {sim.star_path}")
