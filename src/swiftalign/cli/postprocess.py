"""Sharpen two half maps and measure their resolution, as relion_postprocess --auto_bfac.

Masked and unmasked FSC with phase-randomisation correction, resolution at
FSC 0.143, B-factor from a Guinier fit (--autob-lowres … Nyquist) of the
FSC-weighted average map, or --bfactor. Writes OUTPUT/postprocess.mrc,
postprocess_masked.mrc, postprocess.star (RELION's general, fsc and guinier
blocks), postprocess_fsc.png, postprocess_guinier.png and postprocess_run.json.
Half maps without signal (independent noise): "no signal", exit 2, and only
postprocess.star (rlnFinalResolution 999, RELION's "no resolution"), the plots,
the log and run.json are written, no sharpened map.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from swiftalign.cli._common import (
    USER_ERRORS,
    MapAngpixOption,
    QuietOption,
    VerboseOption,
    console,
    fail,
    setup_logging,
    write_run_json,
)


def read_half_maps(half1: Path, half2: Path, mask: Path, angpix: float | None):
    """Read two half maps and a mask; check shapes and voxel size (ValueError naming the file)."""
    import numpy as np

    from swiftalign.io.mrc import read_map

    maps = [read_map(p, voxel_size_angstrom=angpix) for p in (half1, half2, mask)]
    pixel = maps[0].voxel_size_angstrom
    if pixel <= 0:
        raise ValueError(f"{half1}: voxel size is 0 in the header; pass --angpix")
    for p, m in zip((half2, mask), maps[1:], strict=True):
        if angpix is None and m.voxel_size_angstrom > 0 and abs(
                m.voxel_size_angstrom - pixel) > 1e-3 * pixel:
            raise ValueError(f"{p}: voxel size {m.voxel_size_angstrom:.4g} Å differs from "
                             f"{half1} ({pixel:.4g} Å); pass --angpix to override both")
        if m.data.shape != maps[0].data.shape:
            raise ValueError(f"{p}: shape {m.data.shape} differs from {half1} "
                             f"{maps[0].data.shape}")
    shape = maps[0].data.shape
    if len(set(shape)) != 1 or shape[0] % 2:
        raise ValueError(f"{half1}: shape {shape}: need a cubic map with an even box")
    mdata = maps[2].data
    if mdata.min() < -1e-3 or mdata.max() > 1 + 1e-3 or mdata.max() <= 0:
        raise ValueError(f"{mask}: values {mdata.min():.3g} … {mdata.max():.3g}: a mask must "
                         "lie in [0, 1] and not be empty")
    return maps[0].data, maps[1].data, np.clip(mdata, 0, 1), pixel


def postprocess_command(
    half1: Annotated[Path, typer.Argument(help="Unfiltered half map 1 (.mrc).")],
    half2: Annotated[Path, typer.Argument(help="Unfiltered half map 2 (.mrc).")],
    mask: Annotated[Path, typer.Option(help="Soft solvent mask (.mrc), values in [0, 1].")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    bfactor: Annotated[float | None, typer.Option(
        help="B-factor (Å², negative sharpens) instead of the automatic fit.")] = None,
    autob_lowres: Annotated[float, typer.Option(
        help="Lowest resolution (Å) of the Guinier fit.")] = 10.0,
    autob_highres: Annotated[float, typer.Option(
        help="Highest resolution (Å) of the Guinier fit; 0: Nyquist.")] = 0.0,
    lowpass: Annotated[float, typer.Option(
        help="Low-pass the sharpened map (Å): 0 none (FSC weighting only, as RELION), "
        "negative: at the FSC 0.143 resolution.")] = 0.0,
    angpix: MapAngpixOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the phase randomisation.")] = 0,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """``swiftalign postprocess`` (help: the module docstring)."""
    from swiftalign.fsc import NoSignalError, require_signal
    from swiftalign.postprocess import postprocess_half_maps, write_postprocess

    setup_logging(verbose, quiet, Path(output) / "postprocess.log")
    t0 = time.perf_counter()
    try:
        if not autob_lowres > autob_highres >= 0:
            raise ValueError(f"--autob-lowres {autob_lowres} / --autob-highres {autob_highres}: "
                             "need lowres > highres >= 0 (Å)")
        h1, h2, m, pixel = read_half_maps(half1, half2, mask, angpix)
        result = postprocess_half_maps(
            h1, h2, m, pixel, bfactor_angstrom2=bfactor, autob_lowres_angstrom=autob_lowres,
            autob_highres_angstrom=autob_highres, lowpass_angstrom=lowpass, seed=seed)
        paths = write_postprocess(output, result, half_map_names=(str(half1), str(half2)),
                                  mask_name=str(mask), autob_lowres_angstrom=autob_lowres)
    except USER_ERRORS as exc:
        fail(exc)
    write_run_json(Path(output) / "postprocess_run.json", started=t0,
        command="postprocess",
        inputs={"half1": str(half1), "half2": str(half2), "mask": str(mask)},
        outputs={k: str(v) for k, v in paths.items()},
        parameters={"bfactor": bfactor, "autob_lowres_angstrom": autob_lowres,
                    "autob_highres_angstrom": autob_highres, "lowpass_angstrom": lowpass,
                    "seed": seed, "pixel_size_angstrom": pixel},
        found={"resolution_angstrom": result.fsc.resolution_angstrom,
               "resolution_is_bound": result.fsc.resolution_is_bound,
               "no_signal": result.fsc.no_signal,
               "bfactor_angstrom2": result.bfactor_angstrom2})
    if result.fsc.no_signal:  # postprocess.star (999 Å) and the plots show why; no map
        try:
            require_signal(result.fsc, f"{half1} and {half2}")
        except NoSignalError as exc:
            fail(exc, keep_log=True)
    if not quiet:
        console.print(f"resolution {result.fsc.resolution_text()} (FSC 0.143), "
                      f"B-factor {result.bfactor_angstrom2:.1f} Å² → {paths['map']}")
