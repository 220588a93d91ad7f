"""CTF in the search: defocus groups for reference CTF mode, and re-scoring of candidates.

With a CTF the index only proposes candidates; each particle's own CTF applied
to the candidate references decides among them (the exact forward model, no
Wiener bias). In ``reference`` CTF mode the gallery is searched per defocus
group, with one CTF per group whose defocus phase stays within a tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from swiftalign.ctf import CtfParams, ctf_rfft2, electron_wavelength_angstrom
from swiftalign.fourier import Disc, extract_disc
from swiftalign.gallery import Gallery
from swiftalign.search import rescore

__all__ = ["ctf_groups", "particle_ctf_disc", "reference_ctf_pool", "rescore_with_ctf"]

#: Particles re-scored at once (bounds the `(b, n_coeff)` per-particle CTFs).
RESCORE_BLOCK = 4096


def ctf_on_features(c: torch.Tensor, disc: Disc) -> torch.Tensor:
    """What the gallery applies of a CTF.

    Parameters
    ----------
    c : torch.Tensor
        `(..., N, N // 2 + 1)` real CTF on the rfft grid.
    disc : Disc
        Coefficient selection.

    Returns
    -------
    torch.Tensor
        `(..., n_coeff)` complex64 disc values (dft) or the float32 grid itself (dct).
    """
    if disc.transform == "dct":
        return c.to(torch.float32)
    return extract_disc(c.to(torch.complex64), disc.to(c.device))


def particle_ctf_disc(ctf: CtfParams, rows: np.ndarray, disc: Disc, *,
                      pixel_size_angstrom: float, device: str) -> torch.Tensor:
    """CTF of particles ``rows`` as the gallery applies it.

    Parameters
    ----------
    ctf : CtfParams
        Per-particle CTF, indexed by STAR row.
    rows : np.ndarray
        `(m,)` rows.
    disc : Disc
        Coefficient selection.
    pixel_size_angstrom : float
        Pixel size (Å/px).
    device : str
        Torch device.

    Returns
    -------
    torch.Tensor
        `(m, n_coeff)` complex64 on the disc (dft) or `(m, N, N // 2 + 1)` float32 (dct).
    """
    c = ctf_rfft2(ctf.subset(rows), pixel_size_angstrom=pixel_size_angstrom,
                  box_size=disc.box_size, device=device)
    return ctf_on_features(c, disc)


def ctf_groups(ctf: CtfParams, disc: Disc, *, pixel_size_angstrom: float,
               max_phase_rad: float, device: str) -> list[tuple[np.ndarray, torch.Tensor]]:
    """Group particles by defocus so that one CTF per group stays within ``max_phase_rad``.

    The defocus phase term π·λ·Δf·k² (thesis eq. 2.7) at the disc edge ``k``
    changes by less than ``max_phase_rad`` within a group; each group's CTF is
    that of the median parameters of its particles.

    Parameters
    ----------
    ctf : CtfParams
        `(m,)` particles.
    disc : Disc
        Coefficient selection (its edge sets the group width).
    pixel_size_angstrom : float
        Pixel size (Å/px).
    max_phase_rad : float
        Largest phase change of the defocus term within a group (rad).
    device : str
        Torch device.

    Returns
    -------
    list of (np.ndarray, torch.Tensor)
        Per group: `(g,)` positions in ``ctf`` and its CTF as :func:`ctf_on_features`.
    """
    k_edge = disc.radius_fftfreq / pixel_size_angstrom  # 1/Å
    lam = float(np.mean(electron_wavelength_angstrom(ctf.voltage_kv)))
    width = max_phase_rad / (math.pi * lam * k_edge**2)
    mean_df = (ctf.defocus_u_angstrom + ctf.defocus_v_angstrom) / 2.0
    bins = np.floor((mean_df - mean_df.min()) / width).astype(np.int64)
    groups = []
    for b in np.unique(bins):
        rows = np.nonzero(bins == b)[0]
        sub = ctf.subset(rows)
        med = CtfParams(*(np.median(getattr(sub, name)) for name in CtfParams._FIELDS))
        c = ctf_rfft2(med, pixel_size_angstrom=pixel_size_angstrom, box_size=disc.box_size,
                      device=device)
        groups.append((rows, ctf_on_features(c, disc)[0]))
    return groups


def reference_ctf_pool(ctf: CtfParams, disc: Disc, *, pixel_size_angstrom: float,
                       max_phase_rad: float, device: str) -> torch.Tensor:
    """CTFs of the particles' defocus groups, to augment the vectors an index is trained on.

    Parameters
    ----------
    ctf, disc, pixel_size_angstrom, max_phase_rad, device
        As for :func:`ctf_groups`.

    Returns
    -------
    torch.Tensor
        `(n_groups, n_coeff)` (reference CTF mode).
    """
    groups = ctf_groups(ctf, disc, pixel_size_angstrom=pixel_size_angstrom,
                        max_phase_rad=max_phase_rad, device=device)
    return torch.stack([g[1] for g in groups])


def rescore_with_ctf(gallery: Gallery, raw_queries: torch.Tensor, candidate_ids: np.ndarray,
                     ctf: CtfParams, rows: np.ndarray, disc: Disc, *, k: int,
                     pixel_size_angstrom: float, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each particle's candidates with its own CTF on the references.

    Parameters
    ----------
    gallery : Gallery
        Reference set the ids refer to.
    raw_queries : torch.Tensor
        `(m, dim)` particle vectors as recorded (no CTF correction).
    candidate_ids : np.ndarray
        `(m, c)` reference ids from the search.
    ctf : CtfParams
        Per-particle CTF, indexed by STAR row.
    rows : np.ndarray
        `(m,)` STAR rows of the queries.
    disc : Disc
        Coefficient selection of the gallery.
    k : int
        Matches kept per particle.
    pixel_size_angstrom : float
        Pixel size (Å/px).
    device : str
        Torch device.

    Returns
    -------
    ids : np.ndarray
        `(m, k)` reference ids, best first.
    distances : np.ndarray
        `(m, k)` their squared distances.
    """
    out_i, out_d = [], []
    for start in range(0, len(rows), RESCORE_BLOCK):
        pos = np.arange(start, min(len(rows), start + RESCORE_BLOCK))
        cdisc = particle_ctf_disc(ctf, rows[pos], disc,
                                  pixel_size_angstrom=pixel_size_angstrom, device=device)
        d, i = rescore(gallery, raw_queries[pos], torch.as_tensor(candidate_ids[pos]), k,
                       ctf_disc=cdisc)
        out_d.append(d.cpu().numpy())
        out_i.append(i.cpu().numpy())
    return np.concatenate(out_i), np.concatenate(out_d)
