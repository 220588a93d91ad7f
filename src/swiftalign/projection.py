"""Projections of a reference map (wrapping ``torch-fourier-slice``).

Poses are RELION matrices ``A`` (:mod:`swiftalign.conventions`);
torch-fourier-slice rotates the central slice into the volume and therefore
takes ``Aᵀ``.
"""

from __future__ import annotations

import torch
from torch_fourier_slice import project_3d_to_2d

__all__ = ["project"]


def project(
    volume: torch.Tensor,
    matrices: torch.Tensor,
    *,
    batch_size: int = 256,
    pad_factor: float = 2.0,
) -> torch.Tensor:
    """Project a map at the given poses by Fourier slicing.

    Parameters
    ----------
    volume : torch.Tensor
        `(d, d, d)` map, zyx.
    matrices : torch.Tensor
        `(b, 3, 3)` RELION rotation matrices ``A``.
    batch_size : int
        Poses per call (bounds memory).
    pad_factor : float
        Oversampling of the map before its Fourier transform.

    Returns
    -------
    torch.Tensor
        `(b, d, d)` projections, centred on pixel ``d // 2``.
    """
    mats = matrices.to(device=volume.device, dtype=torch.float32).transpose(-1, -2)
    out = []
    for start in range(0, mats.shape[0], batch_size):
        out.append(project_3d_to_2d(volume, mats[start : start + batch_size], pad_factor=pad_factor))
    if not out:
        d = volume.shape[-1]
        return volume.new_zeros((0, d, d))
    return torch.cat(out)
