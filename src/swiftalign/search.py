"""Nearest-neighbour search of particles in the reference set (FAISS).

Three separable steps, used by ``align``, ``index build``, streaming, the Dask
path and refinement alike: :func:`train_index` (nothing for ``Flat``),
:func:`populate_index` (a copy of the trained index filled with one gallery,
``nprobe`` tuned) and :func:`query_index`; :func:`search_gallery` chains them.
Two kinds of search:

- ``Flat``: exact exhaustive search. The reference set is regenerated block by
  block from the rotated gallery (:class:`~swiftalign.gallery.Gallery`), each
  block is scored against every particle (one GEMM) and the best ``k`` are
  merged across blocks, so memory stays within the budget however many poses
  there are.
- any other FAISS factory string (``PCA128,Flat``, ``IVF1024,PQ32``,
  ``OPQ32_128,IVF1024,PQ32`` …): an index is trained on augmented references,
  populated block by block, and queried for ``rerank`` candidates per particle,
  which are then re-scored exactly from their regenerated vectors (thesis
  §4.1; compression alone loses accuracy).

The FAISS layer is thin: frozen :class:`TrainedIndex` / :class:`PopulatedIndex`
records carry the FAISS index, where it lives, and what building it measured
(timings, recall, bytes per pose: measured once, when populated, or read from
the index file); free functions do the work (:func:`index_to_device`,
:func:`serialize_index`, :func:`index_from_faiss`). Tensors go to FAISS through
its torch interop (``faiss.contrib.torch_utils``): contiguous float32 CPU
tensors are read in place, CUDA tensors go straight to a GPU index. Vectors are
zero-padded to a multiple of 64 components (does not change any distance) so
that PQ and OPQ sub-quantisers divide the dimension.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from swiftalign.fourier import disc_to_vectors, normalise_vectors
from swiftalign.gallery import Gallery

__all__ = [
    "SearchResult",
    "IndexSettings",
    "auto_index_factory",
    "search_cost_s",
    "ivfpq_factory",
    "search_gallery",
    "resolve_factory",
    "PopulatedIndex",
    "TrainedIndex",
    "index_from_faiss",
    "index_to_device",
    "serialize_index",
    "train_index",
    "populate_index",
    "query_index",
    "merge_topk",
    "rescore",
    "validate_factory",
]

log = logging.getLogger(__name__)

_PAD = 64
_QUERY_BLOCK = 16384  # particles per FAISS query block


@dataclass
class SearchResult:
    """Best matches per particle.

    Attributes
    ----------
    distances : np.ndarray
        `(n_particles, k)` squared L2 distances between prepared vectors
        (for ``cosine``: ``2 − 2·cos``), ascending.
    ids : np.ndarray
        `(n_particles, k)` int64 reference ids (see :class:`Gallery.poses`).
    timings : dict
        Seconds spent in ``train``, ``populate``, ``query`` (and ``tune``).
    nprobe : int or None
        The ``nprobe`` used (IVF indexes).
    recall : float or None
        Measured recall of the exact nearest neighbour among the candidates at
        that ``nprobe`` on held-out vectors.
    bytes_per_pose : float
        Memory of the index per reference pose (0 for the streamed exact search).
    factory : str
        The FAISS factory string used.
    """

    distances: np.ndarray
    ids: np.ndarray
    timings: dict = field(default_factory=dict)
    nprobe: int | None = None
    recall: float | None = None
    bytes_per_pose: float = 0.0
    factory: str = ""


@dataclass
class IndexSettings:
    """How to search.

    Attributes
    ----------
    factory : str
        FAISS factory string, ``Flat`` (exact), ``auto`` (see
        :func:`auto_index_factory`) or ``ivfpq`` (:func:`ivfpq_factory` sized
        for the reference set).
    rerank : int
        Candidates per particle re-scored exactly (compressed indexes).
    nprobe : int or None
        IVF lists visited; ``None`` tunes it to ``target_recall``.
    target_recall : float
        Recall of the exact nearest neighbour among the candidates that the
        tuned ``nprobe`` must reach on held-out augmented references.
    max_memory_bytes : int
        Budget for blocks of regenerated vectors and score matrices.
    n_train : int or None
        Training vectors (default from the factory).
    seed : int
        Seed for training-set augmentation.
    gpu_float16 : bool
        FAISS on the GPU stores codes / lookup tables in float16 (large indexes).
    """

    factory: str = "auto"
    rerank: int = 100
    nprobe: int | None = None
    target_recall: float = 0.95
    max_memory_bytes: int = 2 * 1024**3
    n_train: int | None = None
    seed: int = 0
    gpu_float16: bool = False


# Measured costs of this machine (2 cores, idle; README B1/B2, 470,525 to 7,480,956 poses,
# 1,000 and 4,000 particles, dim 276): seconds per unit of work.
EXACT_S_PER_POSE_DIM = 7.2e-9  # regenerating the reference vectors, once per pass
EXACT_S_PER_PARTICLE_POSE_DIM = 1.6e-11  # scoring (GEMM + top-k), per particle
BUILD_S_PER_POSE_DIM = 6.2e-8  # IVF-PQ train + populate + tune
QUERY_S_PER_CANDIDATE_DIM = 1.4e-8  # FAISS search + exact re-scoring of the candidates


def search_cost_s(n_poses: int, dim: int, n_particles: int, *, exact: bool,
                  rerank: int = 100) -> float:
    """Predicted seconds of the search stage on the measured machine.

    Exact: ``P·d·(a + n·b)`` (vectors regenerated once per pass, every particle
    scored against every pose). IVF-PQ built in the run: ``P·d·c + n·rerank·d·e``
    (training, populating and tuning grow with the poses; a query with the
    candidates it re-scores). The constants are this module's ``*_S_PER_*``.

    Parameters
    ----------
    n_poses, dim, n_particles : int
        Reference poses, vector length, particles.
    exact : bool
        The exact streamed search, else an IVF-PQ index built for this run.
    rerank : int
        Candidates re-scored per particle (IVF-PQ).

    Returns
    -------
    float
        Seconds.
    """
    work = float(n_poses) * dim
    if exact:
        return work * (EXACT_S_PER_POSE_DIM + n_particles * EXACT_S_PER_PARTICLE_POSE_DIM)
    return work * BUILD_S_PER_POSE_DIM + n_particles * rerank * dim * QUERY_S_PER_CANDIDATE_DIM


def auto_index_factory(n_poses: int, dim: int, n_particles: int | None = None,
                       rerank: int = 100) -> str:
    """Pick an index for a reference-set size, vector length and particle count.

    Exact search up to 200,000 poses (compression costs accuracy at low SNR,
    README accuracy study) and whenever the measured cost model
    (:func:`search_cost_s`) predicts it faster than building and querying
    :func:`ivfpq_factory`: on the measured machine the crossover is near 4,200
    particles at 470,525 poses and tends to 3,400 for very large reference sets.
    With an unknown particle count (an index built for reuse) the index is used.

    Parameters
    ----------
    n_poses : int
        Reference-set size.
    dim : int
        Search-vector length.
    n_particles : int, optional
        Particles to align (unknown: size only).
    rerank : int
        Candidates re-scored per particle by the index.

    Returns
    -------
    str
        A FAISS factory string.
    """
    if n_poses <= 200_000:
        return "Flat"
    if n_particles is not None and search_cost_s(n_poses, dim, n_particles, exact=True) <= \
            search_cost_s(n_poses, dim, n_particles, exact=False, rerank=rerank):
        return "Flat"
    return _ivfpq(n_poses, dim)[0]


def _ivfpq(n_poses: int, dim: int) -> tuple[str, int]:
    nlist = 2 ** int(round(math.log2(math.sqrt(n_poses))))
    nlist = int(min(max(nlist, 64), 16384))
    m = 64 if dim >= 128 else 32
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 1024 else f"IVF{nlist}"
    return f"{coarse},PQ{m}x4fs", nlist


def ivfpq_factory(n_poses: int, dim: int) -> str:
    """IVF-PQ sized for a reference set.

    An inverted file with ``nlist ≈ sqrt(n_poses)`` lists (power of two; an
    HNSW coarse quantiser from 1,024 lists, which makes assigning poses to lists
    cheap) and 4-bit fast-scan product quantisation with ``m = 64``
    sub-quantisers (32 bytes of code per pose; ``m = 32`` for vectors shorter
    than 128). 4-bit codes encode ~6x faster and scan ~4x faster than 8-bit
    ``PQ32`` on CPU; the exact re-scoring of the candidates recovers the accuracy.

    Returns
    -------
    str
        A FAISS factory string.
    """
    return _ivfpq(n_poses, dim)[0]


def _padded_dim(dim: int, factory: str) -> int:
    mult = _PAD
    for m in re.findall(r"(?:PQ|OPQ)(\d+)", factory):
        mult = math.lcm(mult, int(m))
    return int(math.ceil(dim / mult) * mult)


def merge_topk(
    best_d: torch.Tensor | None,
    best_i: torch.Tensor | None,
    new_d: torch.Tensor,
    new_i: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two `(n, *)` candidate lists into the `k` smallest distances.

    Parameters
    ----------
    best_d, best_i : torch.Tensor or None
        `(n, k0)` current distances and ids (None at the start).
    new_d, new_i : torch.Tensor
        `(n, k1)` new distances and ids.
    k : int
        Entries to keep.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        `(n, min(k, k0 + k1))` distances ascending and their ids.
    """
    if best_d is None or best_i is None:
        d, i = new_d, new_i
    else:
        d = torch.cat([best_d, new_d], dim=1)
        i = torch.cat([best_i, new_i], dim=1)
    kk = min(k, d.shape[1])
    d, order = torch.topk(d, kk, dim=1, largest=False, sorted=True)
    return d, torch.gather(i, 1, order)


def _block_images(gallery: Gallery, budget: int, n_queries: int) -> int:
    """Rotated-gallery images per block so that vectors and scores fit in ``budget`` bytes."""
    # regenerated vectors (and their complex intermediates) plus the score matrix and
    # top-k workspace
    per_image = gallery.n_shifts * (gallery.bytes_per_vector + max(n_queries, 1) * 4 * 2)
    return max(1, int(budget // max(per_image, 1)))


def _exact_search(
    gallery: Gallery,
    queries: torch.Tensor,
    k: int,
    *,
    ctf_disc: torch.Tensor | None,
    budget: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive search, reference blocks regenerated on the fly.

    Fourier-disc references under ``l2`` or ``cosine`` (the default path) fold the
    shifts into the queries instead of the references (:func:`_exact_search_folded`):
    one large GEMM per block of rotated-gallery images. ``pearson`` (whose mean
    removal depends on the shift) and DCT features score every regenerated
    shifted reference.
    """
    if gallery.disc.transform == "dft" and gallery.metric in ("l2", "cosine") and (
            ctf_disc is None or ctf_disc.ndim == 1):
        return _exact_search_folded(gallery, queries, k, ctf_disc=ctf_disc, budget=budget,
                                    progress=progress)
    q = queries.to(gallery.coeffs.device)
    q_norm = (q * q).sum(dim=1, keepdim=True)
    step = _block_images(gallery, budget, q.shape[0])
    best_d = best_i = None
    for start in range(0, gallery.n_images, step):
        stop = min(gallery.n_images, start + step)
        vecs, ids = gallery.block_vectors(start, stop, ctf_disc=ctf_disc)
        d = q @ vecs.T  # (n_queries, m), then turned into distances in place
        d.mul_(-2.0).add_((vecs * vecs).sum(dim=1)[None, :]).add_(q_norm)
        kk = min(k, d.shape[1])
        dk, ik = torch.topk(d, kk, dim=1, largest=False)
        best_d, best_i = merge_topk(best_d, best_i, dk, ids[ik], k)
        if progress is not None:
            progress(stop - start)
    assert best_d is not None and best_i is not None  # a gallery has at least one image
    return best_d, best_i


def _shifted_queries(gallery: Gallery, queries: torch.Tensor) -> torch.Tensor:
    """`(n · n_shifts, dim)` queries moved by minus every grid shift, rows ``q · S + s``.

    A shift multiplies a reference's coefficients by the unit phase ramp ``r_s``,
    so ``Re Σ conj(q)·(c·r_s) = Re Σ conj(q·conj(r_s))·c``: scoring the unshifted
    reference against the query shifted back equals scoring the shifted reference
    against the query, and the reference's norm does not depend on the shift.
    """
    qc = torch.view_as_complex(queries.reshape(queries.shape[0], -1, 2).contiguous())
    shifted = qc[:, None, :] * gallery.shift_ramps().conj()[None]  # (n, S, n_coeff)
    return torch.view_as_real(shifted).reshape(-1, queries.shape[1])


def _exact_search_folded(
    gallery: Gallery,
    queries: torch.Tensor,
    k: int,
    *,
    ctf_disc: torch.Tensor | None,
    budget: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search of Fourier-disc references with the shifts folded into the queries.

    Each block of rotated-gallery images is turned into vectors once (CTF, weights,
    Parseval weight, cosine normalisation); ``−½|u|² + Q_s·uᵀ`` is one ``addmm`` over
    all particles × shifts, and the best ``k`` per particle over shifts × images are
    merged across blocks. Distances ``|q|² + |u|² − 2⟨q_s, u⟩`` equal those of the
    regenerated shifted references (:func:`_shifted_queries`).
    """
    device = gallery.coeffs.device
    n_shifts = gallery.n_shifts
    q = queries.to(device, torch.float32)
    n, dim = q.shape
    # queries in chunks whose shifted copies take at most a quarter of the budget
    chunk = max(1, int(budget // 4 // max(n_shifts * dim * 4, 1)))
    if n > chunk:
        parts = [_exact_search_folded(gallery, q[s : s + chunk], k, ctf_disc=ctf_disc,
                                      budget=budget, progress=progress if s == 0 else None)
                 for s in range(0, n, chunk)]
        return torch.cat([d for d, _ in parts]), torch.cat([i for _, i in parts])
    q_norm = (q * q).sum(dim=1, keepdim=True)
    shifted = _shifted_queries(gallery, q)
    per_image = dim * 4 * 4 + n * n_shifts * 4 * 2  # vectors, scores and top-k workspace
    step = max(1, int((budget - shifted.numel() * 4) // per_image))
    best_d = best_i = None
    for start in range(0, gallery.n_images, step):
        stop = min(gallery.n_images, start + step)
        coeffs = gallery.coeffs[start:stop]
        if ctf_disc is not None:
            coeffs = coeffs * ctf_disc
        if gallery.weights is not None:
            coeffs = coeffs * gallery.weights
        u = normalise_vectors(disc_to_vectors(coeffs, gallery.disc.box_size), gallery.metric)
        half_norm = (u * u).sum(dim=1).mul_(-0.5)
        score = torch.addmm(half_norm[None, :], shifted, u.T).view(n, -1)  # (n, S · m)
        kk = min(k, score.shape[1])
        top, flat = torch.topk(score, kk, dim=1) if kk > 1 else torch.max(score, 1, keepdim=True)
        shift = torch.div(flat, stop - start, rounding_mode="floor")
        image = flat - shift * (stop - start) + start
        best_d, best_i = merge_topk(best_d, best_i, q_norm - 2.0 * top, image * n_shifts + shift, k)
        if progress is not None:
            progress(stop - start)
    assert best_d is not None and best_i is not None  # a gallery has at least one image
    return best_d, best_i


def rescore(
    gallery: Gallery,
    queries: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    *,
    ctf_disc: torch.Tensor | None = None,
    budget: int = 512 * 1024**2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact distances to candidate reference ids; keep the best ``k``.

    Parameters
    ----------
    gallery : Gallery
        Reference set the ids refer to.
    queries : torch.Tensor
        `(n, dim)` prepared particle vectors.
    candidates : torch.Tensor
        `(n, c)` int64 reference ids (−1 entries are ignored).
    k : int
        Matches to keep.
    ctf_disc : torch.Tensor, optional
        CTF on the disc applied to the references: `(n_coeff,)` shared by all
        particles, or `(n, n_coeff)` one per particle (``dct``: full rfft grids,
        `(N, N // 2 + 1)` or `(n, N, N // 2 + 1)`).
    budget : int
        Bytes for regenerated vectors per chunk.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        `(n, min(k, c))` distances ascending and ids.
    """
    if gallery.disc.transform == "dft" and gallery.metric in ("l2", "cosine"):
        return _rescore_folded(gallery, queries, candidates, k, ctf_disc=ctf_disc, budget=budget)
    device = gallery.coeffs.device
    n, c = candidates.shape
    per_query = c * gallery.bytes_per_vector
    step = max(1, int(budget // max(per_query, 1)))
    per_particle = ctf_disc is not None and ctf_disc.ndim == (
        2 if gallery.disc.transform == "dft" else 3)
    out_d, out_i = [], []
    for start in range(0, n, step):
        cand = candidates[start : start + step].to(device)
        valid = cand >= 0
        safe = torch.where(valid, cand, torch.zeros_like(cand))
        ctf = ctf_disc[start : start + step].unsqueeze(1).to(device) \
            if per_particle and ctf_disc is not None else ctf_disc
        vecs = gallery.vectors(safe, ctf_disc=ctf)  # (b, c, dim)
        q = queries[start : start + step].to(device)
        d = ((vecs - q[:, None, :]) ** 2).sum(dim=-1)
        d = torch.where(valid, d, torch.full_like(d, float("inf")))
        dk, order = torch.topk(d, min(k, c), dim=1, largest=False)
        out_d.append(dk)
        out_i.append(torch.gather(safe, 1, order))
    return torch.cat(out_d), torch.cat(out_i)


def _rescore_folded(
    gallery: Gallery,
    queries: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    *,
    ctf_disc: torch.Tensor | None,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rescore` of Fourier-disc references with the shifts folded into the queries.

    A candidate id is an image and a grid shift; its distance is
    ``|q|² + |u|² − 2⟨q_s, u⟩`` with ``u`` the image's unshifted vector and ``q_s`` the
    query shifted back (:func:`_shifted_queries`), so each distinct candidate image is
    turned into a vector once per chunk (no phase ramps, no per-candidate
    normalisation) and one batched product scores a particle's candidate images
    against its shifted queries. With a CTF per particle (`(n, n_coeff)`) each
    particle's candidate images are vectorised with its own CTF instead.
    """
    device = gallery.coeffs.device
    per_particle = ctf_disc is not None and ctf_disc.ndim == 2
    n_shifts, dim = gallery.n_shifts, gallery.disc.dim
    n, c = candidates.shape
    per_query = (c * (2 * dim + n_shifts) + n_shifts * dim) * 4 * 2
    step = max(1, int(budget // max(per_query, 1)))
    out_d, out_i = [], []
    for start in range(0, n, step):
        cand = candidates[start : start + step].to(device)
        valid = cand >= 0
        safe = torch.where(valid, cand, torch.zeros_like(cand))
        image = torch.div(safe, n_shifts, rounding_mode="floor")
        shift = safe - image * n_shifts
        if per_particle and ctf_disc is not None:  # (b, c, n_coeff): every candidate with its particle's CTF
            coeffs = gallery.coeffs[image] * ctf_disc[start : start + step, None].to(device)
        else:  # each distinct image once
            unique, inverse = torch.unique(image, return_inverse=True)
            coeffs = gallery.coeffs[unique]
            if ctf_disc is not None:
                coeffs = coeffs * ctf_disc
        if gallery.weights is not None:
            coeffs = coeffs * gallery.weights
        u = normalise_vectors(disc_to_vectors(coeffs, gallery.disc.box_size), gallery.metric)
        u_norm2 = (u * u).sum(-1)
        if not per_particle:
            u, u_norm2 = u[inverse], u_norm2[inverse]
        q = queries[start : start + step].to(device, torch.float32)
        shifted = _shifted_queries(gallery, q).view(q.shape[0], n_shifts, dim)
        scores = torch.bmm(u, shifted.transpose(1, 2))  # (b, c, n_shifts)
        inner = torch.gather(scores, 2, shift[..., None])[..., 0]
        d = (q * q).sum(1, keepdim=True) + u_norm2 - 2.0 * inner
        d = torch.where(valid, d, torch.full_like(d, float("inf")))
        dk, order = torch.topk(d, min(k, c), dim=1, largest=False)
        out_d.append(dk)
        out_i.append(torch.gather(safe, 1, order))
    return torch.cat(out_d), torch.cat(out_i)


def _augmented_vectors(
    gallery: Gallery,
    n: int,
    rng: np.random.Generator,
    ctf_disc_pool: torch.Tensor | None,
) -> torch.Tensor:
    """Random gallery images with a random continuous shift (and random CTF).

    The rotated gallery already carries a random in-plane offset per direction;
    drawing random images with off-grid shifts gives training vectors that are
    not the reference vectors themselves.
    """
    device = gallery.coeffs.device
    images = torch.as_tensor(rng.integers(0, gallery.n_images, n), device=device)
    max_shift = float(np.abs(gallery.shifts_yx_px).max()) if gallery.n_shifts > 1 else 0.0
    radius = max_shift * np.sqrt(rng.uniform(0, 1, n))
    angle = rng.uniform(0, 2 * np.pi, n)
    shifts = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1)
    ctf = None
    if ctf_disc_pool is not None:
        pick = torch.as_tensor(rng.integers(0, ctf_disc_pool.shape[0], n), device=device)
        ctf = ctf_disc_pool[pick]
    shifts_t = torch.as_tensor(shifts, dtype=torch.float32)
    out = []
    for start in range(0, n, 4096):  # bounded memory (DCT references need full grids)
        sl = slice(start, start + 4096)
        coeffs = gallery.features(images[sl], shifts_t[sl], ctf=None if ctf is None else ctf[sl])
        out.append(normalise_vectors(disc_to_vectors(coeffs, gallery.disc.box_size),
                                     gallery.metric))
    return torch.cat(out)


def _faiss() -> Any:
    """The ``faiss`` module, with its torch interop loaded.

    ``faiss.contrib.torch_utils`` (FAISS's documented way) patches every FAISS
    index class once per process so that ``train``, ``add`` and ``search``
    also take torch tensors: a contiguous float32 CPU tensor is read in place
    through its data pointer, a CUDA tensor goes to a GPU index without a trip
    through the host, and results come back as tensors on the query's device.
    NumPy arguments still reach FAISS's own methods unchanged.
    """
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (patches the index classes)

    return faiss


def _faiss_reason(exc: RuntimeError) -> str:
    """The last line of a FAISS error (the human-readable reason)."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else repr(exc)


@dataclass(frozen=True, eq=False)
class TrainedIndex:
    """A trained FAISS index without vectors, reused for any number of galleries.

    Made by :func:`train_index`; :func:`populate_index` fills a copy of it and
    never the index itself, so one trained index serves every repetition (and
    CTF group) while the resolution, and thus the vector length, is unchanged.

    Attributes
    ----------
    factory : str
        FAISS factory string (not ``Flat``).
    dim : int
        Search-vector length before padding (``faiss_index.d`` is the padded one).
    faiss_index : faiss.Index
        The trained, empty FAISS index, on ``device``.
    device : str
        Where the FAISS index lives: ``cpu``, or ``cuda[:n]`` with faiss-gpu.
    train_seconds : float
        Training time, augmentation and pooling of the training vectors included.
    n_train : int
        Training vectors.
    gpu_float16 : bool
        On the GPU, IVF codes / lookup tables in float16.
    gpu_resources : faiss.StandardGpuResources or None
        The GPU resources the index uses (kept alive with it).
    """

    factory: str
    dim: int
    faiss_index: Any
    device: str = "cpu"
    train_seconds: float = 0.0
    n_train: int = 0
    gpu_float16: bool = False
    gpu_resources: Any = field(default=None, repr=False)


@dataclass(frozen=True, eq=False)
class PopulatedIndex:
    """A reference set ready to be queried: exact (streamed) or a populated FAISS index.

    Made by :func:`populate_index` or read back from an index file
    (:func:`index_from_faiss`); its size and timings are measured once, there.

    Attributes
    ----------
    gallery : Gallery
        The reference set whose pose ids the index returns.
    factory : str
        ``Flat`` (exact search over regenerated vectors) or the FAISS factory string.
    faiss_index : faiss.Index or None
        The populated FAISS index, ``nprobe`` set (``None`` for ``Flat``).
    device : str
        Where the FAISS index lives (``cpu`` or ``cuda[:n]``).
    ctf_disc : torch.Tensor or None
        `(n_coeff,)` CTF applied to the references (reference CTF mode), else ``None``.
    nprobe : int or None
        IVF lists visited (tuned or given).
    recall : float or None
        Recall of the exact neighbour at ``nprobe`` on held-out vectors (1 for ``Flat``).
    bytes_per_pose : float
        Serialised index size over its vectors (0 for the exact search).
    train_seconds, populate_seconds, tune_seconds : float
        Time spent building it (0 for an index read from a file).
    gpu_float16 : bool
        On the GPU, IVF codes / lookup tables in float16.
    gpu_resources : faiss.StandardGpuResources or None
        The GPU resources the index uses (kept alive with it).
    """

    gallery: Gallery
    factory: str
    faiss_index: Any = None
    device: str = "cpu"
    ctf_disc: torch.Tensor | None = None
    nprobe: int | None = None
    recall: float | None = None
    bytes_per_pose: float = 0.0
    train_seconds: float = 0.0
    populate_seconds: float = 0.0
    tune_seconds: float = 0.0
    gpu_float16: bool = False
    gpu_resources: Any = field(default=None, repr=False)

    @property
    def exact(self) -> bool:
        """Whether queries are answered by the exact streamed search."""
        return self.faiss_index is None

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent in ``train``, ``populate`` and ``tune``."""
        return {"train": self.train_seconds, "populate": self.populate_seconds,
                "tune": self.tune_seconds}


def _new_faiss_index(factory: str, dim: int) -> Any:
    """An untrained CPU FAISS index for vectors of ``dim`` components (padded here).

    Polysemous training is turned off (its codes are unused here and it takes 15x
    the PQ training time) and OPQ's alternating optimisation is bounded.

    Raises
    ------
    ValueError
        When FAISS rejects the factory string.
    """
    faiss = _faiss()
    padded = _padded_dim(dim, factory)
    try:
        index = faiss.index_factory(padded, factory, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise ValueError(
            f"--index {factory!r} is not a valid FAISS factory string for vectors of "
            f"{padded} components ({_faiss_reason(exc)})"
        ) from None
    parts = [faiss.downcast_index(index)]
    if isinstance(parts[0], faiss.IndexPreTransform):
        pre = parts[0]
        parts.append(faiss.downcast_index(pre.index))
        for j in range(pre.chain.size()):
            vt = faiss.downcast_VectorTransform(pre.chain.at(j))
            if isinstance(vt, faiss.OPQMatrix):
                vt.niter = 8
                vt.niter_pq = 4
                vt.max_train_points = 8192
    for part in parts:
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    return index


def _faiss_on_device(index: Any, device: str, *, gpu_float16: bool, factory: str,
                     resources: Any = None) -> tuple[Any, str, Any]:
    """A CPU FAISS index copied to the GPU for ``cuda`` devices when faiss-gpu is installed.

    Returns ``(index, device it lives on, GPU resources or None)``. Without faiss-gpu
    (or for index types with no GPU version) the index stays on the CPU and a warning
    says so; torch work stays on ``device``.
    """
    faiss = _faiss()
    if not device.startswith("cuda"):
        return index, "cpu", None
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        warnings.warn(
            "faiss-gpu is not installed (or sees no GPU): the FAISS index stays on the CPU "
            "(FFTs, rotations and phase ramps still run on the GPU)", stacklevel=3,
        )
        return index, "cpu", None
    gpu = int(device.split(":")[1]) if ":" in device else 0
    resources = resources if resources is not None else faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = bool(gpu_float16)
    try:
        return faiss.index_cpu_to_gpu(resources, gpu, index, options), device, resources
    except Exception as exc:  # some index types have no GPU version
        warnings.warn(f"FAISS index {factory} stays on the CPU: {exc}", stacklevel=3)
        return index, "cpu", None


def _cpu_faiss(index: Any) -> Any:
    """The FAISS index on the CPU (a copy when it lives on a GPU)."""
    return _faiss().index_gpu_to_cpu(index) if _on_gpu(index) else index


def _on_gpu(index: Any) -> bool:
    """Whether a FAISS index lives on a GPU (GPU indexes have ``getDevice``)."""
    return hasattr(index, "getDevice")


def index_to_device(index: PopulatedIndex, device: str) -> PopulatedIndex:
    """The same populated index with its FAISS index on ``device``'s GPU (when possible).

    Only a CPU index is moved, and only for ``cuda`` devices with faiss-gpu
    installed (otherwise a warning, and the index is returned as it is).

    Parameters
    ----------
    index : PopulatedIndex
        Index to move (left untouched).
    device : str
        ``cpu`` or ``cuda[:n]``.

    Returns
    -------
    PopulatedIndex
    """
    if index.faiss_index is None or not device.startswith("cuda") or \
            index.device.startswith("cuda"):
        return index
    moved, where, res = _faiss_on_device(index.faiss_index, device,
                                         gpu_float16=index.gpu_float16, factory=index.factory)
    if moved is index.faiss_index:
        return index
    return dataclasses.replace(index, faiss_index=moved, device=where, gpu_resources=res)


def serialize_index(index: PopulatedIndex) -> np.ndarray:
    """The populated FAISS index as FAISS serialises it.

    Returns
    -------
    np.ndarray
        `(n_bytes,)` uint8.

    Raises
    ------
    ValueError
        For the exact search (no FAISS index).
    """
    if index.faiss_index is None:
        raise ValueError("the exact (Flat) search has no FAISS index to serialise")
    return _faiss().serialize_index(_cpu_faiss(index.faiss_index))


def _serialized_nbytes(index: Any) -> int:
    """Bytes FAISS would serialise ``index`` to, counted without keeping them."""
    faiss = _faiss()
    count = [0]

    def sink(chunk: bytes) -> None:
        count[0] += len(chunk)

    writer = faiss.PyCallbackIOWriter(sink)
    faiss.write_index(_cpu_faiss(index), writer)
    del writer
    return count[0]


def index_from_faiss(
    gallery: Gallery,
    faiss_index: Any,
    factory: str,
    *,
    nprobe: int | None,
    recall: float | None,
    bytes_per_pose: float,
    device: str = "cpu",
    gpu_float16: bool = False,
) -> PopulatedIndex:
    """A populated index around a CPU FAISS index read back from a file.

    Parameters
    ----------
    gallery : Gallery
        The reference set whose poses the index holds, in order.
    faiss_index : faiss.Index
        Populated CPU FAISS index (it is configured, not copied).
    factory : str
        Its factory string.
    nprobe : int or None
        IVF lists to visit (set on the index).
    recall : float or None
        Recall measured when it was tuned.
    bytes_per_pose : float
        Its serialised size over its vectors (from the file, not measured again).
    device : str
        ``cpu`` or ``cuda[:n]`` (GPU FAISS when faiss-gpu is installed).
    gpu_float16 : bool
        On the GPU, IVF codes / lookup tables in float16.

    Returns
    -------
    PopulatedIndex
        Building times 0 (not part of this run).
    """
    if nprobe is not None:
        _set_nprobe(faiss_index, nprobe)
    index = PopulatedIndex(gallery, factory, faiss_index, nprobe=nprobe, recall=recall,
                           bytes_per_pose=bytes_per_pose, gpu_float16=gpu_float16)
    return index_to_device(index, device)


def _ivf(index: Any) -> Any:
    """The IVF part of a FAISS index, or None when it has none."""
    try:
        return _faiss().extract_index_ivf(index)
    except RuntimeError:
        return None


def _set_nprobe(index: Any, nprobe: int) -> None:
    """IVF lists visited per query (no effect without IVF)."""
    ivf = _ivf(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe)


def _faiss_input(index: Any, x: torch.Tensor) -> torch.Tensor:
    """`(n, dim)` vectors as FAISS reads them in place: `(n, index.d)`, contiguous float32.

    Zero-padded to the index's dimension (does not change any distance); kept on
    the GPU only for an index that lives there, else brought to the CPU. No copy
    when the vectors already are so.
    """
    x = x.detach()
    if x.is_cuda and not _on_gpu(index):
        x = x.cpu()
    x = x.to(torch.float32)
    if x.shape[-1] < index.d:
        x = torch.nn.functional.pad(x, (0, index.d - x.shape[-1]))
    return x.contiguous()


def _faiss_train(index: Any, vectors: torch.Tensor, factory: str) -> None:
    """Train a FAISS index on `(n, dim)` vectors.

    Raises
    ------
    ValueError
        When FAISS cannot train this index on these vectors (e.g. more PCA
        components than dimensions, more lists than training vectors).
    """
    try:
        index.train(_faiss_input(index, vectors))
    except RuntimeError as exc:
        raise ValueError(
            f"--index {factory!r} cannot be trained on {vectors.shape[0]} vectors of "
            f"{index.d} components ({_faiss_reason(exc)})"
        ) from None


def _faiss_add(index: Any, vectors: torch.Tensor) -> None:
    """Append `(n, dim)` vectors; their ids continue from ``ntotal``."""
    index.add(_faiss_input(index, vectors))


def _faiss_search(index: Any, queries: torch.Tensor, k: int) -> torch.Tensor:
    """`(n, dim)` queries → `(n, k)` int64 candidate ids (−1 when missing)."""
    _, ids = index.search(_faiss_input(index, queries), k)
    return ids


def validate_factory(factory: str, dim: int) -> None:
    """Raise ``ValueError`` now if FAISS cannot build ``factory`` (before any long work)."""
    f = factory.strip().lower()
    if f in ("flat", "auto", "ivfpq"):
        return
    _new_faiss_index(factory, dim)


def resolve_factory(factory: str, n_poses: int, dim: int, n_particles: int | None = None,
                    rerank: int = 100) -> str:
    """The FAISS factory string that ``auto``, ``ivfpq`` or ``Flat`` stands for.

    Parameters
    ----------
    factory : str
        As given by the user (``auto``, ``ivfpq``, ``Flat`` or a FAISS string).
    n_poses, dim : int
        Reference-set size and search-vector length.
    n_particles : int, optional
        Particles to align (``None``: unknown, e.g. an index built for reuse).
    rerank : int
        Candidates re-scored per particle (enters ``auto``'s cost model).

    Returns
    -------
    str
        ``Flat`` for the exact search, else a FAISS factory string.
    """
    f = factory.strip().lower()
    if f == "auto":
        return auto_index_factory(n_poses, dim, n_particles, rerank)
    if f == "ivfpq":
        return ivfpq_factory(n_poses, dim)
    if f == "flat":
        return "Flat"
    return factory


def train_index(
    galleries: Gallery | Sequence[Gallery],
    settings: IndexSettings,
    *,
    n_particles: int | None = None,
    ctf_disc_pool: torch.Tensor | None = None,
    device: str = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
) -> TrainedIndex | None:
    """Train a FAISS index on augmented references (thesis §4.1), or nothing for ``Flat``.

    Several galleries (e.g. the differently perturbed reference sets of the
    repetitions of a refinement iteration) are pooled: the training vectors are
    drawn from each of them in equal parts, so one trained index serves all.

    Parameters
    ----------
    galleries : Gallery or sequence of Gallery
        Reference sets of the same disc and sampling (the first one sizes the index).
    settings : IndexSettings
        Factory (``auto``/``ivfpq`` resolved with :func:`resolve_factory`),
        ``n_train``, ``seed`` and ``gpu_float16``.
    n_particles : int, optional
        Particles to be aligned (for ``auto``).
    ctf_disc_pool : torch.Tensor, optional
        `(p, n_coeff)` CTFs drawn at random to augment training vectors.
    device : str
        ``cpu`` or ``cuda`` (the FAISS index is trained on the GPU with faiss-gpu).
    progress : callable, optional
        ``progress(step_name, done, total)``.

    Returns
    -------
    TrainedIndex or None
        ``None`` when the factory resolves to ``Flat`` (nothing to train).

    Raises
    ------
    ValueError
        Invalid factory string or one that cannot be trained on these vectors.
    """
    pool = [galleries] if isinstance(galleries, Gallery) else list(galleries)
    first = pool[0]
    factory = resolve_factory(settings.factory, first.n_poses, first.disc.dim, n_particles,
                              settings.rerank)
    if factory == "Flat":
        return None
    rng = np.random.default_rng(settings.seed)
    t0 = time.perf_counter()
    index, where, resources = _faiss_on_device(
        _new_faiss_index(factory, first.disc.dim), device, gpu_float16=settings.gpu_float16,
        factory=factory)
    ivf = _ivf(index)
    nlist = int(ivf.nlist) if ivf is not None else 0
    n_train = settings.n_train or int(
        min(sum(g.n_poses for g in pool), max(40 * max(nlist, 1), 20_000), 200_000)
    )
    parts = np.full(len(pool), n_train // len(pool))
    parts[: n_train % len(pool)] += 1
    train = torch.cat([_augmented_vectors(g, int(m), rng, ctf_disc_pool)
                       for g, m in zip(pool, parts, strict=True) if m > 0])
    if progress is not None:
        progress("train index", 0, len(train))
    _faiss_train(index, train, factory)
    if progress is not None:
        progress("train index", len(train), len(train))
    seconds = time.perf_counter() - t0  # pooling and augmentation included
    log.debug("trained %s on %d vectors from %d reference sets in %.1f s", factory,
              len(train), len(pool), seconds)
    return TrainedIndex(factory, first.disc.dim, index, where, seconds, len(train),
                        settings.gpu_float16, resources)


def _empty_copy(trained: TrainedIndex) -> Any:
    """A copy of a trained FAISS index without vectors, where the trained one lives."""
    faiss = _faiss()
    copy = faiss.clone_index(_cpu_faiss(trained.faiss_index))
    copy.reset()
    if _on_gpu(trained.faiss_index):
        copy, _, _ = _faiss_on_device(copy, trained.device, gpu_float16=trained.gpu_float16,
                                      factory=trained.factory, resources=trained.gpu_resources)
    return copy


def populate_index(
    trained: TrainedIndex | None,
    gallery: Gallery,
    settings: IndexSettings,
    *,
    ctf_disc: torch.Tensor | None = None,
    ctf_disc_pool: torch.Tensor | None = None,
    nprobe: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> PopulatedIndex:
    """Add every reference of a gallery to a copy of a trained index and tune ``nprobe``.

    The index's size per pose is measured here, once (FAISS's serialised size,
    counted without keeping the bytes).

    Parameters
    ----------
    trained : TrainedIndex or None
        From :func:`train_index`; left untouched (an empty copy is populated),
        so it can be populated again with another gallery. ``None``: exact search.
    gallery : Gallery
        Reference set, added block by block within ``settings.max_memory_bytes``.
    settings : IndexSettings
        ``nprobe``, ``target_recall``, ``rerank``, memory budget, seed.
    ctf_disc : torch.Tensor, optional
        `(n_coeff,)` CTF applied to every reference (one reference CTF group).
    ctf_disc_pool : torch.Tensor, optional
        `(p, n_coeff)` CTFs for held-out tuning vectors (when ``ctf_disc`` is None).
    nprobe : int, optional
        Use this ``nprobe`` instead of tuning (``settings.nprobe`` wins over it).
    progress : callable, optional
        ``progress(step_name, done, total)``.

    Returns
    -------
    PopulatedIndex
    """
    if trained is None:
        return PopulatedIndex(gallery, "Flat", ctf_disc=ctf_disc, recall=1.0)
    t0 = time.perf_counter()
    index = _empty_copy(trained)
    step = _block_images(gallery, settings.max_memory_bytes, 0)
    for start in range(0, gallery.n_images, step):
        stop = min(gallery.n_images, start + step)
        vecs, _ = gallery.block_vectors(start, stop, ctf_disc=ctf_disc)
        _faiss_add(index, vecs)
        if progress is not None:  # counted in reference poses: the bars show poses/s
            progress("populate index", stop * gallery.n_shifts, gallery.n_poses)
    populate_seconds = time.perf_counter() - t0
    bytes_per_pose = _serialized_nbytes(index) / max(1, index.ntotal)
    t0 = time.perf_counter()
    recall = None
    given = settings.nprobe if settings.nprobe is not None else nprobe
    nprobe_used: int | None
    if _ivf(index) is None:
        nprobe_used = None
    elif given is not None:
        nprobe_used = int(given)
    else:
        nprobe_used, recall = _tune_nprobe(index, trained.factory, gallery, settings, ctf_disc,
                                           ctf_disc_pool)
    if nprobe_used is not None:
        _set_nprobe(index, nprobe_used)
    return PopulatedIndex(
        gallery, trained.factory, index, trained.device, ctf_disc, nprobe_used, recall,
        bytes_per_pose, trained.train_seconds, populate_seconds, time.perf_counter() - t0,
        trained.gpu_float16, trained.gpu_resources,
    )


def _tune_nprobe(
    index: Any,
    factory: str,
    gallery: Gallery,
    settings: IndexSettings,
    ctf_disc: torch.Tensor | None,
    ctf_disc_pool: torch.Tensor | None,
) -> tuple[int, float]:
    """Smallest power-of-two ``nprobe`` of a populated FAISS index reaching ``target_recall``.

    Its ``rerank`` candidates hold the exact neighbour of held-out augmented
    references at that rate.
    """
    rng = np.random.default_rng([settings.seed, 1])
    pool = ctf_disc[None] if ctf_disc is not None else ctf_disc_pool
    held = _augmented_vectors(gallery, 256, rng, pool)
    _, exact_i = _exact_search(gallery, held, 1, ctf_disc=ctf_disc,
                               budget=settings.max_memory_bytes)
    exact_i = exact_i[:, 0].cpu()
    nlist = int(_ivf(index).nlist)
    nprobe = 1
    while True:
        _set_nprobe(index, nprobe)
        cand = _faiss_search(index, held, max(1, settings.rerank)).cpu()
        recall = float((cand == exact_i[:, None]).any(dim=1).float().mean())
        if recall >= settings.target_recall or nprobe >= nlist:
            break
        nprobe = min(nlist, nprobe * 2)
    if recall < settings.target_recall:
        log.warning(
            "index %s reaches only recall %.3f of the exact neighbour at nprobe %d (target "
            "%.2f): raise --rerank or use longer codes",
            factory, recall, nprobe, settings.target_recall,
        )
    else:
        log.info("nprobe %d reaches recall %.3f of the exact neighbour", nprobe, recall)
    return nprobe, recall


def query_index(
    index: PopulatedIndex,
    queries: torch.Tensor,
    *,
    k: int = 1,
    settings: IndexSettings,
    progress: Callable[[str, int, int], None] | None = None,
) -> SearchResult:
    """The ``k`` nearest reference poses of every particle in a populated index.

    Exact (``Flat``): every reference is regenerated block by block and scored.
    FAISS: ``max(k, settings.rerank)`` candidates per particle, re-scored
    exactly from their regenerated vectors (:func:`rescore`). Each particle's
    result depends only on that particle (queries may be split in any chunks).

    Parameters
    ----------
    index : PopulatedIndex
        From :func:`populate_index`.
    queries : torch.Tensor
        `(n_particles, dim)` prepared particle vectors.
    k : int
        Matches per particle.
    settings : IndexSettings
        ``rerank``, ``nprobe`` (overrides the tuned one) and memory budget.
    progress : callable, optional
        ``progress(step_name, done, total)``.

    Returns
    -------
    SearchResult
    """
    gallery = index.gallery
    budget = settings.max_memory_bytes
    timings = {"train": 0.0, "populate": 0.0, "tune": 0.0, **index.timings}
    t0 = time.perf_counter()
    if index.faiss_index is None:
        done = [0]

        def cb(m: int) -> None:
            done[0] += m
            if progress is not None:
                progress("search (exact)", done[0] * gallery.n_shifts, gallery.n_poses)

        d, i = _exact_search(gallery, queries, k, ctf_disc=index.ctf_disc, budget=budget,
                             progress=cb)
        timings["query"] = time.perf_counter() - t0
        return SearchResult(d.cpu().numpy(), i.cpu().numpy().astype(np.int64), timings, None,
                            1.0, bytes_per_pose=0.0, factory="Flat")
    nprobe = index.nprobe
    if settings.nprobe is not None and _ivf(index.faiss_index) is not None:
        nprobe = int(settings.nprobe)
    if nprobe is not None:  # set for every query: an override does not outlive it
        _set_nprobe(index.faiss_index, nprobe)
    out_d, out_i = [], []
    n = queries.shape[0]
    for start in range(0, n, _QUERY_BLOCK):  # blocks: progress, bounded memory
        sub = queries[start : start + _QUERY_BLOCK]
        cand = _faiss_search(index.faiss_index, sub, max(k, settings.rerank))
        d, i = rescore(gallery, sub, cand, k, ctf_disc=index.ctf_disc, budget=budget)
        out_d.append(d.cpu().numpy())
        out_i.append(i.cpu().numpy().astype(np.int64))
        if progress is not None:
            progress("query index", min(n, start + _QUERY_BLOCK), n)
    timings["query"] = time.perf_counter() - t0
    return SearchResult(
        np.concatenate(out_d), np.concatenate(out_i), timings, nprobe, index.recall,
        bytes_per_pose=index.bytes_per_pose, factory=index.factory,
    )


def search_gallery(
    gallery: Gallery,
    queries: torch.Tensor,
    *,
    k: int = 1,
    settings: IndexSettings,
    ctf_groups: list[tuple[np.ndarray, torch.Tensor]] | None = None,
    ctf_disc_pool: torch.Tensor | None = None,
    device: str = "cpu",
    trained: TrainedIndex | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> SearchResult:
    """Find the ``k`` nearest reference poses of every particle: train, populate, query.

    :func:`train_index` (unless ``trained`` is given), then for each CTF group
    :func:`populate_index` and :func:`query_index`.

    Parameters
    ----------
    gallery : Gallery
        Reference set.
    queries : torch.Tensor
        `(n_particles, dim)` prepared particle vectors.
    k : int
        Matches per particle.
    settings : IndexSettings
        Index type and budget.
    ctf_groups : list of (np.ndarray, torch.Tensor), optional
        Reference CTF mode: for each CTF group, the particle rows `(m,)` and the
        group's CTF on the disc `(n_coeff,)`; the index is populated once per
        group with CTF-modulated references. ``None``: one CTF-free reference set.
    ctf_disc_pool : torch.Tensor, optional
        `(p, n_coeff)` CTFs drawn at random to augment training vectors.
    device : str
        ``cpu`` or ``cuda``.
    trained : TrainedIndex, optional
        An index already trained (e.g. once for all repetitions of a refinement
        iteration); only populated and queried here.
    progress : callable, optional
        ``progress(step_name, done, total)``.

    Returns
    -------
    SearchResult

    Raises
    ------
    ValueError
        Invalid factory string.
    """
    n = queries.shape[0]
    if trained is None:
        trained = train_index(gallery, settings, n_particles=n, ctf_disc_pool=ctf_disc_pool,
                              device=device)
    groups: list[tuple[np.ndarray, torch.Tensor | None]] = (
        list(ctf_groups) if ctf_groups else [(np.arange(n), None)])
    out_d = np.full((n, k), np.inf, dtype=np.float32)
    out_i = np.full((n, k), -1, dtype=np.int64)
    timings = {"train": 0.0, "populate": 0.0, "query": 0.0, "tune": 0.0}
    nprobe = recall = None
    result = None
    for rows, ctf_disc in groups:
        populated = populate_index(trained, gallery, settings, ctf_disc=ctf_disc,
                                   ctf_disc_pool=ctf_disc_pool, nprobe=nprobe, progress=progress)
        if nprobe is None:
            nprobe, recall = populated.nprobe, populated.recall
        result = query_index(populated, queries[rows], k=k, settings=settings,
                             progress=progress)
        kk = result.ids.shape[1]
        out_d[rows, :kk], out_i[rows, :kk] = result.distances, result.ids
        for name in ("populate", "query", "tune"):
            timings[name] += result.timings.get(name, 0.0)
        timings["train"] = result.timings.get("train", 0.0)
    assert result is not None  # at least one group
    return SearchResult(out_d, out_i, timings, nprobe, recall,
                        bytes_per_pose=result.bytes_per_pose, factory=result.factory)
