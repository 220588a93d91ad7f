"""Make a soft solvent mask from a map, as relion_mask_create.

Binarise at --threshold (voxels >= T; default: the volume of
--molecular-weight-kda of protein at 1.35 g/cm³, else 10 % of the map's
maximum), extend by --extend px, add a raised-cosine edge of --soft-edge px;
optionally low-pass the map first (--lowpass Å, RELION's filter). Written with
the map's voxel size; OUTPUT_run.json records the parameters.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from swiftalign.cli._common import (
    USER_ERRORS,
    QuietOption,
    ReferenceAngpixOption,
    VerboseOption,
    console,
    fail,
    setup_logging,
    write_run_json,
)


def _threshold(data, threshold: float | None, molecular_weight_kda: float | None,
               pixel_size_angstrom: float) -> tuple[float, str]:
    """The threshold and the rule that chose it."""
    from swiftalign.mask import default_threshold, threshold_for_molecular_weight

    if threshold is not None:
        return float(threshold), "--threshold"
    if molecular_weight_kda is not None:
        return (threshold_for_molecular_weight(data, molecular_weight_kda, pixel_size_angstrom),
                f"volume of {molecular_weight_kda:g} kDa at 0.81 Da/Å³")
    return default_threshold(data), "10 % of the map's maximum"


def mask_command(
    map_path: Annotated[Path, typer.Argument(help="Map (.mrc) to threshold.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Mask file (.mrc) to write.")],
    threshold: Annotated[float | None, typer.Option(
        help="Density threshold (relion_mask_create --ini_threshold).")] = None,
    molecular_weight_kda: Annotated[float | None, typer.Option(
        help="Choose the threshold that encloses this mass of protein (kDa).")] = None,
    extend: Annotated[float, typer.Option(
        help="Extend the binary mask by this many px (negative shrinks).")] = 3.0,
    soft_edge: Annotated[float, typer.Option(
        min=0, help="Width of the raised-cosine edge (px).")] = 6.0,
    lowpass: Annotated[float | None, typer.Option(
        help="Low-pass the map at this resolution (Å) before thresholding.")] = None,
    angpix: ReferenceAngpixOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """``swiftalign mask`` (help: the module docstring)."""
    from swiftalign.io.mrc import read_map, write_map
    from swiftalign.mask import create_mask, relion_lowpass

    setup_logging(verbose, quiet)
    t0 = time.perf_counter()
    try:
        vol = read_map(map_path, voxel_size_angstrom=angpix)
        if vol.voxel_size_angstrom <= 0:
            raise ValueError(f"{map_path}: voxel size is 0 in the header; pass --angpix")
        data = vol.data
        if lowpass is not None:
            if not lowpass > 2 * vol.voxel_size_angstrom:
                raise ValueError(f"--lowpass {lowpass}: must be coarser than Nyquist "
                                 f"({2 * vol.voxel_size_angstrom:.3g} Å)")
            data = relion_lowpass(data, lowpass, vol.voxel_size_angstrom)
        thr, rule = _threshold(data, threshold, molecular_weight_kda, vol.voxel_size_angstrom)
        if not float(data.max()) >= thr:
            raise ValueError(f"{map_path}: threshold {thr:.4g} ({rule}) is above the map's "
                             f"maximum {float(data.max()):.4g}")
        mask = create_mask(data, thr, extend_px=extend, soft_edge_px=soft_edge)
        write_map(output, mask, vol.voxel_size_angstrom)
    except USER_ERRORS as exc:
        fail(exc)
    inside = float((mask > 0.5).mean())
    write_run_json(output.with_name(output.stem + "_run.json"), started=t0,
        command="mask", inputs={"map": str(map_path)}, outputs={"mask": str(output)},
        parameters={"threshold": thr, "threshold_rule": rule, "extend_px": extend,
                    "soft_edge_px": soft_edge, "lowpass_angstrom": lowpass,
                    "molecular_weight_kda": molecular_weight_kda},
        found={"fraction_of_box_above_0.5": inside})
    if not quiet:
        console.print(f"mask (threshold {thr:.4g}: {rule}; {100 * inside:.1f} % of the box) "
                      f"→ {output}")
