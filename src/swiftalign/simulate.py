"""Synthetic particle datasets with ground truth (thesis §5.1).

Uniform random orientations (mapped into the asymmetric unit of the symmetry
group), Fourier-slice projections, Gaussian in-plane shifts truncated at
``max_shift_px`` (default: ``align``'s default ``--max-shift``, so every true
shift is inside the default search; shifts beyond it are redrawn), per-particle
astigmatic CTF, Gaussian noise at a given SNR, where
SNR = variance of the clean CTF-modulated projection over the box / noise
variance (per particle). The noise is white, or coloured with a power spectrum
``∝ 1/|k|^a`` (``noise_psd_exponent = a``; ``a ≈ 1`` resembles the 1/f-like
background of real ice), shaped in Fourier space (|k| floored at 1/N) and
normalised so that its pixel variance, hence the SNR definition, is unchanged.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.spatial.transform import Rotation
from torch_fourier_shift import fourier_shift_image_2d

from swiftalign.conventions import (
    centred_irfft2,
    centred_rfft2,
    euler_to_matrix,
    fftfreq_grid_rfft2,
    matrix_to_euler,
    shift_px_to_origin_angstrom,
)
from swiftalign.ctf import CtfParams, ctf_rfft2
from swiftalign.io.mrc import MapData, write_stack
from swiftalign.io.star import ParticleTable, project_relative, write_particles
from swiftalign.projection import project
from swiftalign.sampling import DEFAULT_MAX_SHIFT_PX
from swiftalign.symmetry import symmetry_matrices, to_asymmetric_unit

__all__ = ["SimulationConfig", "simulate_particles", "write_dataset", "noise_colour_filter"]


def noise_colour_filter(box_size: int, psd_exponent: float) -> torch.Tensor:
    """Amplitude filter ``|k|^(−a/2)`` on the centred-rfft grid, unit mean power.

    Parameters
    ----------
    box_size : int
        Image side ``N``.
    psd_exponent : float
        ``a`` of the noise power spectrum ``∝ 1/|k|^a`` (0: white).

    Returns
    -------
    torch.Tensor
        `(N, N // 2 + 1)` float32; white noise of variance σ² filtered by it keeps
        variance σ² (the mean of the squared filter over the full `(N, N)` grid is 1).
    """
    k = fftfreq_grid_rfft2(box_size, dtype=torch.float64).norm(dim=-1).clamp_min(1.0 / box_size)
    ky = torch.fft.fftfreq(box_size, dtype=torch.float64)
    full = torch.sqrt(ky[:, None] ** 2 + ky[None, :] ** 2).clamp_min(1.0 / box_size)
    norm = torch.sqrt((full ** (-psd_exponent)).mean())
    return (k ** (-psd_exponent / 2.0) / norm).to(torch.float32)


@dataclass
class SimulationConfig:
    """Parameters of a simulated dataset (units in the names)."""

    n_particles: int = 2000
    snr_db: float = -10.0
    shift_sigma_px: float = 3.0
    max_shift_px: float = DEFAULT_MAX_SHIFT_PX
    defocus_min_angstrom: float = 5000.0
    defocus_max_angstrom: float = 25000.0
    astigmatism_max_angstrom: float = 500.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    symmetry: str = "C1"
    ctf: bool = True
    noise_psd_exponent: float = 0.0
    seed: int = 0
    batch_size: int = 256
    #: RELION ``rlnCtfBfactor`` drawn uniformly in [0, max] Å² (0: no column).
    ctf_bfactor_max_angstrom2: float = 0.0
    #: RELION ``rlnCtfScalefactor`` drawn uniformly in [min, 1] (1: no column).
    ctf_scale_min: float = 1.0


def _truncate_shifts(shifts: np.ndarray, config: SimulationConfig) -> np.ndarray:
    """Redraw `(n, 2)` shifts beyond ``max_shift_px`` (radius) from the same Gaussian.

    A separate generator (seeded from ``config.seed``) keeps every other drawn
    value identical to an untruncated simulation.
    """
    if config.max_shift_px <= 0:
        return np.zeros_like(shifts)
    rng = np.random.default_rng([config.seed, 1])
    out = shifts.copy()
    far = np.hypot(out[:, 0], out[:, 1]) > config.max_shift_px
    while far.any():  # rejection rounds, vectorised over the particles still outside
        out[far] = rng.normal(0.0, config.shift_sigma_px, size=(int(far.sum()), 2))
        far = np.hypot(out[:, 0], out[:, 1]) > config.max_shift_px
    return out


def _envelope_columns(config: SimulationConfig, rng: np.random.Generator, n: int) -> dict:
    """Per-particle ``rlnCtfBfactor``/``rlnCtfScalefactor`` when the config asks for them."""
    out = {}
    if config.ctf_bfactor_max_angstrom2 > 0:
        out["rlnCtfBfactor"] = rng.uniform(0.0, config.ctf_bfactor_max_angstrom2, n)
    if config.ctf_scale_min < 1.0:
        out["rlnCtfScalefactor"] = rng.uniform(config.ctf_scale_min, 1.0, n)
    return out


def simulate_particles(
    reference: MapData, config: SimulationConfig, *, pixel_size_angstrom: float | None = None
) -> tuple[np.ndarray, pd.DataFrame]:
    """Simulate particle images and their ground truth.

    Parameters
    ----------
    reference : MapData
        `(N, N, N)` map.
    config : SimulationConfig
    pixel_size_angstrom : float, optional
        Override for the map's voxel size.

    Returns
    -------
    images : np.ndarray
        `(n, N, N)` float32.
    truth : pd.DataFrame
        RELION columns: rlnAngleRot/Tilt/Psi, rlnOriginXAngst/YAngst,
        rlnDefocusU/V/Angle, rlnPhaseShift.

    Raises
    ------
    ValueError
        For a non-cubic map, an unset pixel size or a negative noise_psd_exponent.
    """
    vol = reference.data
    if len(set(vol.shape)) != 1:
        raise ValueError(f"{reference.path}: map is not cubic ({vol.shape})")
    ps = pixel_size_angstrom or reference.voxel_size_angstrom
    if not ps or ps <= 0:
        raise ValueError(f"{reference.path}: voxel size is 0; pass --angpix")
    if not config.noise_psd_exponent >= 0:
        raise ValueError(f"--noise-color {config.noise_psd_exponent}: the noise power-spectrum "
                         "exponent must be >= 0 (0 white, 1 for 1/f)")
    n, box = config.n_particles, vol.shape[0]
    rng = np.random.default_rng(config.seed)
    rel = Rotation.random(n, random_state=rng).as_matrix()
    mats = to_asymmetric_unit(rel, symmetry_matrices(config.symmetry))
    euler = matrix_to_euler(mats)
    shifts = rng.normal(0.0, config.shift_sigma_px, size=(n, 2))
    shifts = _truncate_shifts(shifts, config)
    mean_df = rng.uniform(config.defocus_min_angstrom, config.defocus_max_angstrom, n)
    astig = rng.uniform(0.0, config.astigmatism_max_angstrom, n)
    angle = rng.uniform(-180.0, 180.0, n)
    du, dv = mean_df + astig / 2.0, mean_df - astig / 2.0
    envelope = _envelope_columns(config, rng, n)
    ctf = CtfParams(du, dv, angle, config.voltage_kv, config.cs_mm, config.amplitude_contrast, 0.0,
                    envelope.get("rlnCtfBfactor", 0.0), envelope.get("rlnCtfScalefactor", 1.0))
    volume = torch.as_tensor(vol)
    gen = torch.Generator().manual_seed(config.seed)
    images = np.empty((n, box, box), dtype=np.float32)
    snr = 10.0 ** (config.snr_db / 10.0)
    colour = noise_colour_filter(box, config.noise_psd_exponent) if config.noise_psd_exponent else None
    for start in range(0, n, config.batch_size):
        stop = min(n, start + config.batch_size)
        proj = project(volume, torch.as_tensor(euler_to_matrix(euler[start:stop]),
                                               dtype=torch.float32))
        proj = fourier_shift_image_2d(proj, torch.as_tensor(shifts[start:stop], dtype=torch.float32))
        if config.ctf:
            c = ctf_rfft2(ctf.subset(slice(start, stop)), pixel_size_angstrom=ps, box_size=box)
            proj = centred_irfft2(centred_rfft2(proj) * c, (box, box))
        var = proj.var(dim=(-2, -1), keepdim=True)
        sigma = torch.sqrt(var / snr)
        noise = torch.randn(proj.shape, generator=gen)
        if colour is not None:
            noise = centred_irfft2(centred_rfft2(noise) * colour, (box, box))
        noise = noise * sigma
        images[start:stop] = (proj + noise).numpy()
    origin = shift_px_to_origin_angstrom(shifts, ps)
    truth = pd.DataFrame(
        {
            "rlnAngleRot": euler[:, 0],
            "rlnAngleTilt": euler[:, 1],
            "rlnAnglePsi": euler[:, 2],
            "rlnOriginXAngst": origin[:, 0],
            "rlnOriginYAngst": origin[:, 1],
            "rlnDefocusU": du,
            "rlnDefocusV": dv,
            "rlnDefocusAngle": angle,
            "rlnPhaseShift": np.zeros(n),
            **envelope,
        }
    )
    return images, truth


def write_dataset(
    out_dir: str | Path,
    images: np.ndarray,
    truth: pd.DataFrame,
    *,
    pixel_size_angstrom: float,
    config: SimulationConfig,
) -> Path:
    """Write ``particles.mrcs`` and ``particles.star`` (RELION 3.1, truth in the standard columns).

    Image names are relative to the project folder (the working directory), as
    RELION writes them (``000001@sim/particles.mrcs`` for ``out_dir`` ``sim``),
    so ``relion_reconstruct --i sim/particles.star`` works from the project
    folder; absolute when ``out_dir`` is outside the working directory.

    Returns
    -------
    Path
        The STAR file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(images)
    write_stack(out / "particles.mrcs", images, pixel_size_angstrom)
    stack = project_relative(out / "particles.mrcs", os.getcwd())
    if stack.startswith(".."):  # outside the project folder: a name that works from anywhere
        stack = os.path.abspath(out / "particles.mrcs")
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)]})
    for col in truth.columns:
        particles[col] = truth[col].to_numpy()
    particles["rlnOpticsGroup"] = 1
    particles["rlnRandomSubset"] = (np.arange(n) % 2) + 1
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnVoltage": [config.voltage_kv],
            "rlnSphericalAberration": [config.cs_mm],
            "rlnAmplitudeContrast": [config.amplitude_contrast],
            "rlnImagePixelSize": [pixel_size_angstrom],
            "rlnImageSize": [images.shape[-1]],
            "rlnImageDimensionality": [2],
        }
    )
    table = ParticleTable(
        particles=particles,
        optics=optics,
        path=out / "particles.star",
        pixel_size_angstrom=np.full(n, pixel_size_angstrom),
        voltage_kv=np.full(n, config.voltage_kv),
        cs_mm=np.full(n, config.cs_mm),
        amplitude_contrast=np.full(n, config.amplitude_contrast),
    )
    write_particles(out / "particles.star", table, box_size=images.shape[-1],
                    project_names=False)  # named above
    return out / "particles.star"


class _CallableModule(types.ModuleType):
    """The ``swiftalign.simulate`` module, callable as :func:`swiftalign.api.simulate`.

    Importing a submodule rebinds the package attribute of its name, so once
    this module is imported ``swiftalign.simulate`` is the module; calling it
    still runs the API function.
    """

    def __call__(self, *args, **kwargs):
        from swiftalign.api import simulate

        return simulate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
