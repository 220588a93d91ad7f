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


#: A round of angular step ``a`` compares coefficients up to ``ROUND_DISC_FACTOR / (N·sin a)``
#: cycles/px, 0.7 × the frequency at which ``a`` is the thesis step (eq. 4.20); measured best
#: of 0.7, 1, 1.5, 2 and the whole disc (accuracy and speed, :func:`refine_local`).
ROUND_DISC_FACTOR = 0.7


def round_discs(disc: Disc, angle_steps_deg: list[float], metric: str
                ) -> list[torch.Tensor | None]:
    """Coefficients each round compares: `(n_r,)` indices into ``disc``, None for all of it.

    A round of step ``a`` cannot tell poses apart finer than ``a``, and coefficients
    beyond ``ROUND_DISC_FACTOR / (N·sin a)`` cycles/px only add local minima and cost
    there, so the early (coarse) rounds compare an inner part of the disc; the cost of
    a round grows with the square of its radius. The last round always compares the
    whole disc (its distances are the ones returned). ``pearson`` normalises over the
    whole disc and keeps it in every round.
    """
    radius = disc.freqs_yx.norm(dim=-1)
    out: list[torch.Tensor | None] = []
    for r, a in enumerate(angle_steps_deg):
        k = ROUND_DISC_FACTOR / (disc.box_size * max(math.sin(math.radians(a)), 1e-9))
        k = max(k, 3.0 / disc.box_size)
        if metric == "pearson" or r == len(angle_steps_deg) - 1 or k >= disc.radius_fftfreq:
            out.append(None)
        else:
            out.append(torch.nonzero(radius <= k).reshape(-1))
    return out


def _sub_disc(disc: Disc, idx: torch.Tensor | None) -> Disc:
    """The coefficients ``idx`` of ``disc`` (all for None)."""
    if idx is None:
        return disc
    return Disc(disc.box_size, float(disc.freqs_yx[idx].norm(dim=-1).max()),
                disc.flat_indices[idx], disc.freqs_yx[idx], disc.transform)


def _sub_queries(queries: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """`(m, 2·n_r)` query components of the coefficients ``idx`` (interleaved re, im)."""
    if idx is None:
        return queries
    return queries.view(queries.shape[0], -1, 2)[:, idx].reshape(queries.shape[0], -1)


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
    with the halved steps (the optimum lies within half a step). Coarse rounds
    compare only the inner coefficients their step resolves (:func:`round_discs`).
    """
    m = mats.shape[0]
    rows = torch.arange(m, device=spectrum.rfft.device)
    centre = None  # (m, n_r) coefficients of the current pose on the round's disc
    dist = np.full(m, np.inf)
    subsets = round_discs(disc, [a for a, _ in steps], metric)
    full_queries, full_mod, full_disc = queries, mod, disc
    for (a, b), idx in zip(steps, subsets, strict=True):
        n_r = full_disc.n_coeff if idx is None else idx.numel()
        if centre is not None and centre.shape[1] != n_r:
            centre = None  # the disc grew (nested discs): the centre is sliced again
        disc = _sub_disc(full_disc, idx)
        queries = _sub_queries(full_queries, idx)
        mod = full_mod if full_mod is None or idx is None else full_mod[:, idx]
        freqs = disc.freqs_yx
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


_AXES = np.concatenate([np.zeros((1, 3)), np.eye(3), -np.eye(3)])  # centre, +x +y +z, −x −y −z


def _axis_fit(d: torch.Tensor, a: float) -> np.ndarray:
    """`(m, 3)` rotation-vector move (°) from distances `(m, 7)` at the centre and ±``a``.

    Per axis, the vertex of the parabola through ``(−a, 0, +a)`` (a Newton step with
    the diagonal of the Hessian), clipped to ``±a``; without upward curvature, the
    better of the two ends.
    """
    dist = d.double().cpu().numpy()
    d0, dp, dm = dist[:, :1], dist[:, 1:4], dist[:, 4:7]
    curv = dp + dm - 2.0 * d0
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = 0.5 * a * (dm - dp) / curv
    end = np.where(dp < dm, a, -a) * (np.minimum(dp, dm) < d0)
    return np.clip(np.where(curv > 0, vertex, end), -a, a)


def _refine_batch_axes(
    spectrum: VolumeSpectrum,
    queries: torch.Tensor,
    mats: np.ndarray,
    shifts: np.ndarray,
    mod: torch.Tensor | None,
    disc: Disc,
    metric: str,
    steps: list[tuple[float, float]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All rounds for one batch, moving along the axes of rotation (7 slices per round).

    Each round slices the centre and the six poses ``±a`` about the image-frame axes,
    scores them against the 3×3 shifts, takes the best shift and moves the pose to the
    vertex of the parabola through each axis's three distances; a final slice scores
    the pose reached. Same arguments and results as :func:`_refine_batch`.
    """
    m = mats.shape[0]
    subsets = round_discs(disc, [a for a, _ in steps], metric)
    full_queries, full_mod, full_disc = queries, mod, disc
    n_shift = len(_GRID2)

    def score(mats_now, shifts_now, offsets, b, idx):
        sub = _sub_disc(full_disc, idx)
        q = _sub_queries(full_queries, idx)
        md = full_mod if full_mod is None or idx is None else full_mod[:, idx]
        deltas = Rotation.from_rotvec(np.radians(offsets)).as_matrix()
        cand = np.einsum("rij,njk->nrik", deltas, mats_now)
        fresh = spectrum.slice_disc(torch.as_tensor(cand.reshape(-1, 3, 3), dtype=torch.float32),
                                    sub, batch_size=cand.shape[0] * cand.shape[1])
        fresh = fresh.view(m, len(deltas), -1)
        if md is not None:
            fresh.mul_(md[:, None, :])
        f = sub.freqs_yx
        ramps = (shift_phase_ramps(f, torch.as_tensor(shifts_now, dtype=torch.float32,
                                                      device=f.device))[:, None, :]
                 * shift_phase_ramps(f, torch.as_tensor(_GRID2 * b, dtype=torch.float32,
                                                        device=f.device))[None])
        return _distances(q, fresh, ramps, sub.box_size, metric).view(m, len(deltas), n_shift)

    for (a, b), idx in zip(steps, subsets, strict=True):
        d = score(mats, shifts, _AXES * a, b, idx)  # (m, 7, 9)
        si = torch.argmin(d.amin(dim=1), dim=1)  # best shift
        move = _axis_fit(d[torch.arange(m), :, si], a)
        mats = np.einsum("nij,njk->nik", Rotation.from_rotvec(np.radians(move)).as_matrix(), mats)
        # the centre rotation's 3×3 shift distances: a parabola along y and along x
        g = d[:, 0, :].view(m, 3, 3)
        c = g[:, 1, 1]  # [centre, +y, +x, (none), −y, −x, (none)] as for the rotation axes
        d7 = torch.stack([c, g[:, 2, 1], g[:, 1, 2], c, g[:, 0, 1], g[:, 1, 0], c], 1)
        shifts = shifts + _axis_fit(d7, b)[:, :2]
    d = score(mats, shifts, np.zeros((1, 3)), 0.0, None)[:, 0, 0]
    return mats, shifts, d.cpu().numpy().astype(np.float64)


#: Pattern of the local search's rounds: ``axes`` (centre and ±a per axis, 7 slices,
#: parabolic moves of the pose and the shift) or ``grid`` (3×3×3 rotations, 26 slices,
#: the best grid point).
PATTERNS = ("axes", "grid")


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
    pattern: str = "axes",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coarse-to-fine local search around given poses.

    Every round halves the steps and compares only the coefficients its angular step
    resolves (:func:`round_discs`; the last round the whole disc). Measured on 256
    GroEL particles (160 px, 1.6 Å/px, −15 dB, CTF, D7) started 2.3° (median) from
    the truth, 4 rounds from 2.24° to 3.4 Å on 2 cores: ``axes`` 37 ms/particle,
    median error 0.23° (p90 0.72°), shift error 0.07 px; ``grid`` on the whole disc
    every round (before) 212 ms/particle, 0.35° (p90 1.79°), 0.17 px
    (``/work`` script in the closing note of issue 16).

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
    pattern : str
        ``axes`` (default): each round slices the centre and ``±a`` about the three
        image-frame axes (7 slices) and moves pose and shift to the vertices of the
        parabolas through them (a Newton step with the Hessian's diagonal);
        ``grid``: the 3×3×3 rotation grid (26 slices), the best point wins.

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
    if pattern not in PATTERNS:
        raise ValueError(f"local search pattern {pattern!r}: use one of {', '.join(PATTERNS)}")
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
        kernel = _refine_batch_axes if pattern == "axes" else _refine_batch
        mats[rows], shifts[rows], dist[rows] = kernel(
            spectrum, queries[start : rows[-1] + 1].to(device), mats[rows], shifts[rows], mod,
            disc_dev, metric, steps)
        if progress is not None:
            progress(len(rows) * rounds)
    return matrix_to_euler(mats), shifts, dist
