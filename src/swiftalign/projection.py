"""Projections of a reference map (wrapping ``torch-fourier-slice``).

Poses are RELION matrices ``A`` (:mod:`swiftalign.conventions`);
torch-fourier-slice rotates the central slice into the volume and therefore
takes ``Aᵀ``.
"""

from __future__ import annotations

import torch
from torch_fourier_slice import project_3d_to_2d

__all__ = ["project", "VolumeSpectrum"]


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


class VolumeSpectrum:
    """A map's oversampled Fourier transform, for slicing at disc frequencies only.

    Central slices are taken only where the search vector needs them
    (``torch-fourier-slice`` with ``fftfreq_max`` = disc radius), which makes
    per-particle local searches cheap. The map is zero-padded to ``2N`` with
    its centre (``N // 2``) moved to the padded centre, so the disc frequencies
    ``j / N`` fall exactly on every other sample of the padded grid; it is
    divided by sinc² (trilinear-interpolation correction) as
    :func:`torch_fourier_slice.project_3d_to_2d` does.
    Equals :func:`project` followed by the disc cut for maps whose density
    lies inside the inscribed sphere.

    Parameters
    ----------
    volume : torch.Tensor
        `(N, N, N)` map.
    """

    def __init__(self, volume: torch.Tensor) -> None:
        from torch_fourier_slice.volume_utils import (
            compute_cube_face_averages,
            separable_sinc2_correction,
        )

        n = volume.shape[-1]
        self.box_size = n
        vol = volume - compute_cube_face_averages(volume, n=4)
        left, right = n - n // 2, n // 2
        vol = torch.nn.functional.pad(vol, [left, right] * 3)
        vol = vol / separable_sinc2_correction(tuple(vol.shape), device=vol.device)
        dft = torch.fft.rfftn(torch.fft.ifftshift(vol, dim=(-3, -2, -1)), dim=(-3, -2, -1))
        self.rfft = torch.fft.fftshift(dft, dim=(-3, -2))
        self.padded = 2 * n

    def slice_disc(self, matrices: torch.Tensor, disc, *, batch_size: int = 2048) -> torch.Tensor:
        """Disc coefficients of projections at RELION poses.

        The disc frequencies ``(kx, ky, 0)`` are rotated into the map by ``Aᵀ``
        and sampled trilinearly (``torch-image-interpolation``) from the
        oversampled transform; points in the missing half use the conjugate of
        their Friedel mate. Only the disc points are sampled.

        Parameters
        ----------
        matrices : torch.Tensor
            `(b, 3, 3)` RELION matrices ``A``.
        disc : Disc
            Coefficient selection for box ``N``.

        Returns
        -------
        torch.Tensor
            `(b, n_coeff)` complex64, as :func:`swiftalign.fourier.images_to_disc`
            of the projections.

        Raises
        ------
        ValueError
            If the disc is for another box size.
        """
        from torch_image_interpolation import sample_image_3d

        if disc.box_size != self.box_size:
            raise ValueError(f"disc is for box {disc.box_size}, map is {self.box_size}")
        device = self.rfft.device
        m = self.padded
        f = disc.freqs_yx.to(device)
        xyz = torch.stack([f[:, 1], f[:, 0], torch.zeros_like(f[:, 0])], dim=-1)  # (k, 3)
        mats = matrices.to(device, torch.float32)
        out = []
        for start in range(0, mats.shape[0], batch_size):
            a = mats[start : start + batch_size]
            # volume xyz = Aᵀ·(kx, ky, 0), i.e. row vector xyz·A
            coords = torch.einsum("kj,bji->bki", xyz, a)  # (b, k, 3) xyz
            conj = coords[..., 0] < 0
            coords = torch.where(conj[..., None], -coords, coords)
            zyx = coords.flip(-1) * m
            zyx[..., 0] += m // 2
            zyx[..., 1] += m // 2
            values = sample_image_3d(self.rfft, zyx, interpolation="trilinear")
            out.append(torch.where(conj, values.conj(), values))
        return torch.cat(out).to(torch.complex64)
