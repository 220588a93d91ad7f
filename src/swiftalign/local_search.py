"""Local refinement of each particle's pose around its global match.

The global search can only return a pose of the reference grid, so its error
is bounded below by the sampling (about ΔΦ/2). Around the best global pose
``(A₀, s₀)`` each particle is compared with fresh projections at
``A = R(δ)·A₀`` for rotation vectors ``δ`` on a 3×3×3 grid of spacing ``a``
(in the image frame, so ``δ_z`` is the in-plane angle) and shifts
``s₀ + (i, j)·b`` for ``i, j ∈ {−1, 0, 1}``; the best becomes the new centre
and the steps are halved for the next round (thesis §7.3 suggests this
coarse-to-fine refinement as future work).

Distances use the global search's disc and metric; when CTF parameters are
given the particle's own CTF is applied to the projections and compared with
the uncorrected particle (the exact forward model, whatever the CTF mode of the
global search). Coefficient weights (noise whitening) multiply the projections'
coefficients; the queries must carry the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from swiftalign.conventions import euler_to_matrix, matrix_to_euler
from swiftalign.ctf import CtfParams, ctf_rfft2
from swiftalign.fourier import (
    Disc,
    disc_to_vectors,
    extract_disc,
    make_disc,
    normalise_vectors,
    shift_phase_ramps,
)
from swiftalign.io.particles import ParticleImages
from swiftalign.noise import NoiseSpectrum, coefficient_weights
from swiftalign.projection import VolumeSpectrum
from swiftalign.queries import particle_vectors

__all__ = ["LocalQueries", "prepare_local", "refine_local"]


@dataclass(frozen=True)
class LocalQueries:
    """Particle vectors for the local refinement and the weights its projections get.

    Attributes
    ----------
    disc : Disc
        Fourier disc (dft) of the local comparison.
    queries : torch.Tensor
        `(m, dim)` particle vectors as recorded (no CTF correction), weighted.
    weights : torch.Tensor or None
        `(n_coeff,)` shared or `(m, n_coeff)` per-particle coefficient weights.
    """

    disc: Disc
    queries: torch.Tensor
    weights: torch.Tensor | None


def prepare_local(
    images: ParticleImages,
    rows: np.ndarray,
    *,
    resolution_angstrom: float,
    pixel_size_angstrom: float,
    metric: str,
    device: str,
    noise: NoiseSpectrum | None = None,
    weighting: str = "none",
    optics_group: np.ndarray | None = None,
    recentre_shift_yx_px: np.ndarray | None = None,
    reusable_queries: torch.Tensor | None = None,
) -> LocalQueries:
    """Disc, particle vectors and weights of a local refinement (align and refine alike).

    The local search always compares Fourier-disc (dft) coefficients up to
    ``resolution_angstrom`` (Nyquist-capped). With noise spectra of several
    optics groups each particle uses its own group's weights.

    Parameters
    ----------
    images : ParticleImages
        The particles.
    rows : np.ndarray
        `(m,)` STAR rows.
    resolution_angstrom : float
        Finest resolution compared (Å).
    pixel_size_angstrom : float
        Pixel size (Å/px).
    metric : str
        ``l2``, ``cosine`` or ``pearson``.
    device : str
        Torch device.
    noise : NoiseSpectrum, optional
        Spectra for the weights (none: unweighted).
    weighting : str
        ``noise`` or ``ssnr`` (:func:`swiftalign.noise.coefficient_weights`).
    optics_group : np.ndarray, optional
        `(m,)` optics group of each particle (needed with several spectra).
    recentre_shift_yx_px : np.ndarray, optional
        `(m, 2)` known shifts removed before the disc is cut.
    reusable_queries : torch.Tensor, optional
        `(m, dim)` vectors already made on this same disc (used when all particles
        share one weight row).

    Returns
    -------
    LocalQueries
    """
    disc = make_disc(images.box_size, min(pixel_size_angstrom / resolution_angstrom, 0.5))
    weights = group_of = None
    if noise is not None:
        weights = coefficient_weights(noise, disc.to(device), weighting)
        if weights.shape[0] > 1 and optics_group is not None:
            group_of = np.searchsorted(noise.groups, optics_group)
    if reusable_queries is not None and group_of is None:
        queries = reusable_queries
    else:
        _, queries = particle_vectors(
            images, disc, ctf=None, pixel_size_angstrom=pixel_size_angstrom, metric=metric,
            device=device, rows=rows, recentre_shift_yx_px=recentre_shift_yx_px,
            coefficient_weights=weights, weight_group=group_of)
    if weights is not None:
        weights = weights[0] if group_of is None else weights[
            torch.as_tensor(group_of, device=device)]
    return LocalQueries(disc, queries, weights)


_SHIFT_CENTRE = 4  # index of the zero offset in the 3×3 shift grid
_GRID2 = np.stack(np.meshgrid([-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0], indexing="ij"), -1).reshape(-1, 2)


def _offsets(step: float) -> np.ndarray:
    """`(27, 3)` rotation-vector offsets (degrees) of the 3×3×3 grid, the zero offset first."""
    ax = np.array([-1.0, 0.0, 1.0]) * step
    grid = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1).reshape(-1, 3)
    return np.concatenate([grid[13:14], grid[:13], grid[14:]])


def _distances_by_inner_product(
    queries: torch.Tensor, coeffs: torch.Tensor, ramps: torch.Tensor, box: int, metric: str
) -> torch.Tensor:
    """Squared distances `(m, r, s)` between queries and every rotation × shift.

    A shift only changes phases, so the norm of a candidate vector depends on the
    rotation alone and the distances follow from one batched complex product
    ``Σ_k c_rk·(conj(q_k)·ramp_sk)`` instead of materialising `(m, r, s, dim)` vectors.
    """
    weight = math.sqrt(2.0) / box
    q = torch.view_as_complex(queries.reshape(queries.shape[0], -1, 2).contiguous())
    shifted_q = q.conj()[:, None, :] * ramps  # (m, s, n_coeff)
    inner = torch.bmm(coeffs, shifted_q.transpose(1, 2)).real * weight
    norm2 = torch.view_as_real(coeffs).square().sum((-1, -2)) * weight**2  # (m, r)
    if metric == "cosine":
        return 2.0 - 2.0 * inner / norm2.clamp_min(1e-30).sqrt()[:, :, None]
    q_norm2 = (queries**2).sum(-1)
    return q_norm2[:, None, None] + norm2[:, :, None] - 2.0 * inner


def _distances(
    queries: torch.Tensor, coeffs: torch.Tensor, ramps: torch.Tensor, box: int, metric: str
) -> torch.Tensor:
    """`(m, r · s)` squared distances of every rotation × shift candidate."""
    if metric in ("cosine", "l2"):
        d = _distances_by_inner_product(queries, coeffs, ramps, box, metric)
    else:  # pearson: the mean over components depends on the shift
        vecs = normalise_vectors(
            disc_to_vectors(coeffs[:, :, None, :] * ramps[:, None, :, :], box), metric
        )  # (m, r, s, dim)
        d = ((vecs - queries[:, None, None, :]) ** 2).sum(-1)
    return d.reshape(d.shape[0], -1)


def _modulation(
    ctf: CtfParams | None,
    rows: np.ndarray,
    weights: torch.Tensor | None,
    disc: Disc,
    pixel_size_angstrom: float,
) -> torch.Tensor | None:
    """`(m, n_coeff)` real factor (CTF × coefficient weights) applied to the slices.

    Computed once per particle for all rounds (``None``: no CTF, no weights).
    """
    device = disc.freqs_yx.device
    mod = None
    if ctf is not None:
        c = ctf_rfft2(ctf.subset(rows), pixel_size_angstrom=pixel_size_angstrom,
                      box_size=disc.box_size, device=device)
        mod = extract_disc(c, disc)
    if weights is not None:
        w = weights.to(device)
        w = w[torch.as_tensor(rows, device=device)] if w.ndim == 2 else w[None]
        mod = w if mod is None else mod * w
    return None if mod is None else mod.to(torch.float32)


def _refine_batch(
    spectrum: VolumeSpectrum,
    queries: torch.Tensor,
    mats: np.ndarray,
    shifts: np.ndarray,
    mod: torch.Tensor | None,
    disc: Disc,
    metric: str,
    steps: list[tuple[float, float]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All rounds for one batch of particles.

    `(m, 3, 3)` matrices and `(m, 2)` shifts in; the refined ones and `(m,)`
    distances out.

    Every round slices the 26 rotations around the current centre in one call (the
    centre's own slice is carried over from the round that chose it and scored
    apart, so nothing is concatenated) and scores them against the 3×3 shifts
    around the current shift with one batched product; the shift ramps are the
    centre's ramp times the 9 grid ramps shared by all particles. A particle whose
    best candidate is its centre at some round keeps the pose but still goes on
    with the halved steps (the optimum lies within half a step).
    """
    m = mats.shape[0]
    rows = torch.arange(m, device=spectrum.rfft.device)
    freqs = disc.freqs_yx
    centre = None  # (m, n_coeff) coefficients of the current pose
    dist = np.full(m, np.inf)
    for a, b in steps:
        offsets = _offsets(a) if centre is None else _offsets(a)[1:]
        deltas = Rotation.from_rotvec(np.radians(offsets)).as_matrix()  # (r, 3, 3)
        cand = np.einsum("rij,njk->nrik", deltas, mats)  # (m, r, 3, 3)
        fresh = spectrum.slice_disc(torch.as_tensor(cand.reshape(-1, 3, 3), dtype=torch.float32),
                                    disc, batch_size=cand.shape[0] * cand.shape[1])
        fresh = fresh.view(m, len(deltas), -1)
        if mod is not None:
            fresh.mul_(mod[:, None, :])
        ramps = (shift_phase_ramps(freqs, torch.as_tensor(shifts, dtype=torch.float32,
                                                          device=freqs.device))[:, None, :]
                 * shift_phase_ramps(freqs, torch.as_tensor(_GRID2 * b, dtype=torch.float32,
                                                            device=freqs.device))[None])
        d = _distances(queries, fresh, ramps, disc.box_size, metric)
        if centre is not None:  # the carried-over centre is candidate 0
            d = torch.cat([_distances(queries, centre[:, None], ramps, disc.box_size, metric), d],
                          dim=1)
            cand = np.concatenate([mats[:, None], cand], axis=1)
        best_d, best = torch.min(d, dim=1)
        ri, si = np.divmod(best.cpu().numpy(), len(_GRID2))
        pick = torch.as_tensor(ri, device=rows.device)
        if centre is None:
            centre = fresh[rows, pick]
        else:
            centre = torch.where((pick == 0)[:, None], centre,
                                 fresh[rows, (pick - 1).clamp_min(0)])
        mats = cand[np.arange(m), ri]
        shifts = shifts + _GRID2[si] * b
        dist = best_d.cpu().numpy().astype(np.float64)
    return mats, shifts, dist


def refine_local(
    spectrum: VolumeSpectrum,
    queries: torch.Tensor,
    euler_deg: np.ndarray,
    shift_yx_px: np.ndarray,
    *,
    disc: Disc,
    metric: str,
    angle_step_deg: float,
    shift_step_px: float,
    rounds: int = 2,
    ctf: CtfParams | None = None,
    pixel_size_angstrom: float = 1.0,
    batch_size: int = 128,
    progress: Callable[[int], None] | None = None,
    coefficient_weights: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coarse-to-fine local search around given poses.

    Parameters
    ----------
    spectrum : VolumeSpectrum
        The reference map's oversampled transform (on the compute device).
    queries : torch.Tensor
        `(n, dim)` prepared particle vectors (as for the global search).
    euler_deg : np.ndarray
        `(n, 3)` starting RELION Euler angles.
    shift_yx_px : np.ndarray
        `(n, 2)` starting shifts (y, x) in px.
    disc : Disc
        Coefficient selection.
    metric : str
        ``l2``, ``cosine`` or ``pearson``.
    angle_step_deg : float
        First-round rotation step ``a`` (degrees); halved every round.
    shift_step_px : float
        First-round shift step ``b`` (px); halved every round.
    rounds : int
        Number of rounds.
    ctf : CtfParams, optional
        Per-particle CTF applied to the projections (then ``queries`` must be
        the particles without CTF correction).
    pixel_size_angstrom : float
        Pixel size for the CTF.
    batch_size : int
        Particles per batch.
    coefficient_weights : torch.Tensor, optional
        `(n_coeff,)` shared or `(n, n_coeff)` per-particle real weights applied to
        the projections (the queries carry the same weights).

    Returns
    -------
    euler_deg : np.ndarray
        `(n, 3)` refined angles.
    shift_yx_px : np.ndarray
        `(n, 2)` refined shifts.
    distance : np.ndarray
        `(n,)` squared distance of the refined pose.
    """
    if disc.transform != "dft":
        raise ValueError("the local search compares Fourier-disc (dft) coefficients")
    device = spectrum.rfft.device
    n = queries.shape[0]
    disc_dev = disc.to(device)
    mats = euler_to_matrix(euler_deg)
    shifts = np.asarray(shift_yx_px, dtype=np.float64).copy()
    dist = np.full(n, np.inf)
    steps = [(angle_step_deg / 2**r, shift_step_px / 2**r) for r in range(rounds)]
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        mod = _modulation(ctf, rows, coefficient_weights, disc_dev, pixel_size_angstrom)
        mats[rows], shifts[rows], dist[rows] = _refine_batch(
            spectrum, queries[start : rows[-1] + 1].to(device), mats[rows], shifts[rows], mod,
            disc_dev, metric, steps)
        if progress is not None:
            progress(len(rows) * rounds)
    return matrix_to_euler(mats), shifts, dist
