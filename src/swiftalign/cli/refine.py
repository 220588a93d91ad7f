"""Gold-standard 3D refinement (several references: 3D classification).

Each iteration aligns both fixed half sets against their own half maps with
R differently perturbed galleries, keeps particles whose alignments agree,
reconstructs the half maps, measures the (masked, phase-randomisation
corrected) FSC and low-passes the next references to its resolution.
Writes OUTDIR/itNNN/ and OUTDIR/final/: particles.star, half1.mrc, half2.mrc,
map.mrc, map_unfiltered.mrc, fsc.star (as relion_postprocess), fsc.png,
angdist.png, run.json; OUTDIR/summary.png (resolution and kept fraction per
iteration), OUTDIR/run.log, OUTDIR/job.json (options and input fingerprint, for
`--continue OUTDIR`). OUTDIR is locked while the run lasts; a non-empty OUTDIR
needs --continue or --overwrite. `swiftalign report OUTDIR` makes an HTML report.
"""

from __future__ import annotations

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
)
from swiftalign.cli._guard import describe_job
from swiftalign.sampling import DEFAULT_MAX_SHIFT_PX


def refine_command(
    ctx: typer.Context,
    particles: Annotated[Path | None, typer.Argument(
        help="Particle STAR file (RELION 3.0 or 3.1+) or cryoSPARC .cs file; its half sets "
        "(rlnRandomSubset 1/2 or .cs split), when present, are kept. Not needed with "
        "--continue.")] = None,
    reference: Annotated[list[Path] | None, typer.Option(
        "--reference", "-r", help="Initial reference map(s) (.mrc); one per class.")] = None,
    initial_resolution: Annotated[float | None, typer.Option(
        help="Resolution (Å) of the initial reference: it is low-passed there and the first "
        "iteration samples at it.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output folder (new or "
                                                "empty; see --overwrite).")] = None,
    continue_dir: Annotated[Path | None, typer.Option(
        "--continue", help="Resume the run in this folder after its last completed "
        "iteration (from the start if it was stopped during the first). Inputs and options "
        "come from the folder (job.json); only --iterations, --device and --max-memory may "
        "be given. Other or changed particles or stacks are refused.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start a new run in a folder holding a previous one, deleting its "
        "results (itNNN/, final/, state …).")] = False,
    symmetry: Annotated[str, typer.Option(
        help="Point group as RELION names it: C1, Cn, Ci, Cs, Cnv, Cnh, Sn, Dn, Dnv, Dnh, T, Td, "
        "Th, O, Oh, I (=I2), I1, I3, I4, Ih … (RELION's operators and axes).")] = "C1",
    force_symmetry: Annotated[bool, typer.Option(
        "--force-symmetry", help="Refine even when the reference disagrees with its own "
        "symmetry (agreement below 0.9, see swiftalign.symmetry).")] = False,
    near_symmetry: Annotated[bool, typer.Option(
        "--near-symmetry/--no-near-symmetry", help="Keep particles whose repetitions agree up "
        "to a rotation the current map almost has (Cn/Dn, n ≤ 8, map-to-rotated-map "
        "correlation ≥ 0.9 at the global-search resolution) beyond --symmetry, with the "
        "best-scoring repetition's pose; reported per iteration.")] = True,
    iterations: Annotated[int, typer.Option(
        help="Maximum iterations (stops earlier after two iterations gaining less than one "
        "Fourier shell).")] = 8,
    repetitions: Annotated[int, typer.Option(
        help="Alignments per particle per iteration (differently perturbed galleries).")] = 3,
    max_resolution: Annotated[float | None, typer.Option(
        help="Finest resolution (Å) used for alignment (default: none, alignment follows "
        "the current FSC resolution down to Nyquist).")] = None,
    global_resolution: Annotated[float, typer.Option(
        help="Finest resolution (Å) at which the global search is sampled; the local search "
        "refines below it.")] = 20.0,
    fsc_threshold: Annotated[float, typer.Option(
        help="Corrected-FSC value (0–1) whose crossing gives the resolution (Å).")] = 0.143,
    low_resolution_join: Annotated[float, typer.Option(
        help="Average the half maps below this resolution (Å) for the next references "
        "(0: never).")] = 40.0,
    auto_local: Annotated[bool, typer.Option(
        "--auto-local/--no-auto-local", help="Search only locally around each particle's "
        "pose once the global search stops moving the poses (median change below the angular "
        "step); back to global when the resolution falls by a shell or > 5 % of the "
        "particles change class.")] = True,
    local_passes: Annotated[int, typer.Option(
        help="Final iterations that only search locally around the current poses.")] = 0,
    local_angle: Annotated[float, typer.Option(
        help="Angular range (°) of the --local-passes search; the cap of the auto-local "
        "range.")] = 5.0,
    local_shift: Annotated[float, typer.Option(
        help="Shift range (px) of the --local-passes search; the cap of the auto-local "
        "range.")] = 2.0,
    max_shift: Annotated[float, typer.Option(help="Shift range in the first iteration (px).")]
    = DEFAULT_MAX_SHIFT_PX,
    max_shift_later: Annotated[float, typer.Option(
        help="Shift range around the previous shift in later iterations (px).")] = 3.0,
    mask: Annotated[Path | None, typer.Option(
        help="Mask (.mrc, values 0–1, same box) applied to the references before projection "
        "(focused refinement).")] = None,
    solvent_mask: Annotated[Path | None, typer.Option(
        help="Solvent mask (.mrc, values 0–1, same box) for the masked FSC (default: made "
        "from each iteration's average map).")] = None,
    ctf_mode: Annotated[str, typer.Option(
        help="wiener: Wiener-corrected particles vs clean references; reference: CTF groups "
        "applied to references; auto: by resolution (see align); none: no CTF. Default "
        "wiener: every global candidate is re-scored, and the local search run, with each "
        "particle's own CTF on the reference anyway, so reference mode changes only the "
        "candidate list, at ~10× the search time.")] = "wiener",
    weighting: WeightingOption = "noise",
    particle_diameter: ParticleDiameterOption = None,
    index: Annotated[str, typer.Option(
        help="FAISS factory string (see align --index) or auto.")] = "auto",
    reconstruction: Annotated[str, typer.Option(
        help="Half-map weighting: gridding (iterative density compensation, as "
             "relion_reconstruct) or wiener (Σ CTF·F / (Σ CTF² + λ)).")] = "gridding",
    device: DeviceOption = "cpu",
    max_memory: MaxMemoryOption = 2.0,
    angpix: AngpixOption = None,
    reference_angpix: ReferenceAngpixOption = None,
    seed: Annotated[int, typer.Option(help="Random seed (half sets, galleries).")] = 0,
    max_bad_fraction: MaxBadFractionOption = 0.01,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """``swiftalign refine`` (help: the module docstring)."""
    from swiftalign.cli._refine_job import resolve_refine_params

    params = resolve_refine_params(ctx)
    result, out = _run(params)
    if not params["quiet"]:
        _print_summary(result, out)


def _run(p: dict) -> tuple:
    """Lock the folder, read and check the inputs, save the job, run the refinement."""
    from pydantic import ValidationError

    from swiftalign.cli._refine_job import discard_failed_run, prepare_folder, save_or_check_job
    from swiftalign.io.mrc import read_map
    from swiftalign.io.particles import open_usable_particles
    from swiftalign.io.star import read_particles
    from swiftalign.refinement import RefineConfig, run_refinement
    from swiftalign.run_folder import RunFolder
    from swiftalign.symmetry import parse_symmetry

    continue_dir = p["continue_dir"]
    out = Path(continue_dir or p["output"])
    try:
        restart = prepare_folder(out, resume=continue_dir is not None, overwrite=p["overwrite"])
    except USER_ERRORS as exc:
        fail(exc)
    try:
        parse_symmetry(p["symmetry"])
        config = RefineConfig(
            initial_resolution_angstrom=p["initial_resolution"],
            max_resolution_angstrom=p["max_resolution"],
            global_resolution_angstrom=p["global_resolution"], symmetry=p["symmetry"],
            force_symmetry=p["force_symmetry"], near_symmetry=p["near_symmetry"],
            repetitions=p["repetitions"], iterations=p["iterations"],
            fsc_threshold=p["fsc_threshold"],
            low_resolution_join_angstrom=p["low_resolution_join"],
            auto_local=p["auto_local"],
            local_passes=p["local_passes"], local_angle_deg=p["local_angle"],
            local_shift_px=p["local_shift"], max_shift_px=p["max_shift"],
            max_shift_later_px=p["max_shift_later"], ctf_mode=p["ctf_mode"],
            weighting=p["weighting"], particle_diameter_angstrom=p["particle_diameter"],
            index=p["index"], device=p["device"], max_memory_gb=p["max_memory"],
            seed=p["seed"], reconstruction=p["reconstruction"],
            mask_path=str(p["mask"]) if p["mask"] else None,
            solvent_mask_path=str(p["solvent_mask"]) if p["solvent_mask"] else None,
        )
    except (ValidationError, ValueError) as exc:
        fail(exc)
    try:
        table = read_particles(p["particles"], angpix=p["angpix"])
        table, images = open_usable_particles(table, max_bad_fraction=p["max_bad_fraction"])
        refs = [read_map(r, voxel_size_angstrom=p["reference_angpix"], box_px=images.box_size,
                         pixel_size_angstrom=float(table.pixel_size_angstrom[0]))
                for r in p["reference"]]
        save_or_check_job(out, p, images.stack_paths, resume=continue_dir is not None)
    except USER_ERRORS as exc:
        if continue_dir is None:
            discard_failed_run(out)
        fail(exc)
    setup_logging(p["verbose"], p["quiet"], RunFolder(out).log_path)
    describe_job(f"refine into {out}", f"swiftalign refine --continue {out}", keep_log=True)
    if restart:
        import logging

        logging.getLogger("swiftalign.refinement").warning(
            "--continue %s: no iteration was completed there; starting from iteration 1",
            continue_dir)
    try:
        record = run_record(command="refine", device=p["device"],
                            inputs={"particles": str(p["particles"]),
                                    "references": [str(r) for r in p["reference"]]})
        with progress_bars(p["quiet"]) as progress:
            result = run_refinement(table, images, refs, out, config,
                                    resume=continue_dir is not None and not restart,
                                    progress=progress, record=record)
        images.close()
    except USER_ERRORS as exc:
        if continue_dir is None:
            discard_failed_run(out)
        fail(exc)
    return result, out


def _print_summary(result, out: Path) -> None:
    """The per-iteration table and the final resolution."""
    from rich.table import Table

    t = Table(title="refinement")
    for col in ("iteration", "search", "align at (Å)", "resolution (Å)", "kept", "rejected",
                "time (s)"):
        t.add_column(col, justify="right")
    t.add_column("why", justify="left")
    for h in result.history:
        t.add_row(str(h["iteration"]), h.get("search", "global"),
                  f"{h['alignment_resolution_angstrom']:.2f}",
                  f"{'≤ ' if h.get('resolution_is_bound') else ''}{h['resolution_angstrom']:.2f}",
                  str(h["kept"]), str(h["rejected"]),
                  f"{h['seconds']:.0f}", h.get("search_reason", ""))
    console.print(t)
    from swiftalign.fsc import ResolutionEstimate

    bound = bool(result.history and result.history[-1].get("resolution_is_bound"))
    final = ResolutionEstimate(result.resolution_angstrom, is_bound=bound).text()
    console.print(f"final resolution {final} → {out}/final")
