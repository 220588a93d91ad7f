"""Local resolution of two half maps by windowed FSC (relion_postprocess --locres).

A soft sphere moved over a grid (--sampling Å; radius sampling/2, edge
sampling) gives a phase-randomisation-corrected FSC per window; each voxel
gets the weighted harmonic mean of the FSC 0.143 resolutions of the windows
covering it. Writes OUTPUT/local_resolution.mrc (Å; 0 where no window
reaches), local_resolution_histogram.png (voxels with mask > 0.5),
local_resolution_slices.png (central slices coloured by resolution) and
local_resolution_run.json.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from swiftalign.cli._common import (
    USER_ERRORS,
    DeviceOption,
    MapAngpixOption,
    QuietOption,
    VerboseOption,
    console,
    fail,
    setup_logging,
    write_run_json,
)


def write_local_resolution(out_dir: Path, result, mask, average_map,
                           pixel_size_angstrom: float) -> dict[str, Path]:
    """Write the map, the histogram and the coloured slices of a local-resolution result."""
    import numpy as np

    from swiftalign.io.mrc import write_map
    from swiftalign.plots import (
        local_resolution_histogram_figure,
        map_slices_figure,
        save_figure,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"map": out_dir / "local_resolution.mrc",
             "histogram": out_dir / "local_resolution_histogram.png",
             "slices": out_dir / "local_resolution_slices.png"}
    local = result.local_resolution_angstrom
    write_map(paths["map"], local, pixel_size_angstrom)
    inside = np.where(mask > 0.5, local, 0.0)
    save_figure(local_resolution_histogram_figure(
        inside, title=f"local resolution inside the mask ({len(result.centres_zyx_px)} windows)"),
        paths["histogram"])
    save_figure(map_slices_figure(average_map, overlay=inside,
                                  overlay_label="local resolution (Å)",
                                  title="average of the half maps, coloured by local resolution"),
                paths["slices"])
    return paths


def local_resolution_command(
    half1: Annotated[Path, typer.Argument(help="Unfiltered half map 1 (.mrc).")],
    half2: Annotated[Path, typer.Argument(help="Unfiltered half map 2 (.mrc).")],
    mask: Annotated[Path, typer.Option(help="Solvent mask (.mrc): windows near mask > 0.5.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    sampling: Annotated[float, typer.Option(
        help="Grid step (Å) of the windows; radius sampling/2, soft edge sampling.")] = 25.0,
    randomize_at: Annotated[float, typer.Option(
        help="Randomise phases beyond this resolution (Å).")] = 25.0,
    min_resolution: Annotated[float, typer.Option(
        help="Coarsest local resolution reported (Å).")] = 50.0,
    angpix: MapAngpixOption = None,
    device: DeviceOption = "cpu",
    max_memory: Annotated[float, typer.Option(help="Memory (GB) for one batch of windows.")] = 2.0,
    seed: Annotated[int, typer.Option(help="Seed of the phase randomisation.")] = 0,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """``swiftalign local-resolution`` (help: the module docstring)."""
    import numpy as np

    from swiftalign.cli.postprocess import read_half_maps
    from swiftalign.local_resolution import local_resolution

    setup_logging(verbose, quiet, Path(output) / "local_resolution.log")
    t0 = time.perf_counter()
    try:
        if not (sampling > 0 and randomize_at > 0 and min_resolution > 0 and max_memory > 0):
            raise ValueError("--sampling, --randomize-at, --min-resolution and --max-memory "
                             "must be positive")
        h1, h2, m, pixel = read_half_maps(half1, half2, mask, angpix)
        result = local_resolution(h1, h2, m, pixel, sampling_angstrom=sampling,
                                  randomize_at_angstrom=randomize_at,
                                  min_resolution_angstrom=min_resolution,
                                  max_memory_gb=max_memory, device=device, seed=seed)
        paths = write_local_resolution(Path(output), result, m, 0.5 * (h1 + h2), pixel)
    except USER_ERRORS as exc:
        fail(exc)
    median = float(np.median(result.window_resolution_angstrom))
    n_windows = len(result.window_resolution_angstrom)
    write_run_json(Path(output) / "local_resolution_run.json", started=t0,
        command="local-resolution", device=device,
        inputs={"half1": str(half1), "half2": str(half2), "mask": str(mask)},
        outputs={k: str(v) for k, v in paths.items()},
        parameters={"sampling_angstrom": sampling, "randomize_at_angstrom": randomize_at,
                    "min_resolution_angstrom": min_resolution, "seed": seed,
                    "pixel_size_angstrom": pixel, "window_radius_px": result.radius_px,
                    "window_edge_px": result.edge_px, "grid_step_px": result.sampling_px},
        found={"windows": n_windows, "median_window_resolution_angstrom": median})
    if not quiet:
        console.print(f"{n_windows} windows, median local resolution {median:.2f} Å "
                      f"→ {paths['map']}")
