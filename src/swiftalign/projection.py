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
        self._layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def slice_disc(self, matrices: torch.Tensor, disc, *, batch_size: int = 2048) -> torch.Tensor:
        """Disc coefficients of projections at RELION poses.

        The disc frequencies ``(kx, ky, 0)`` are rotated into the map by ``Aᵀ``
        and sampled trilinearly from the oversampled transform (one
        :func:`torch.nn.functional.grid_sample` call per batch on a cached
        real/imaginary layout; the same samples as ``torch-image-interpolation``'s
        ``sample_image_3d``, points outside the grid zero); points in the missing
        half use the conjugate of their Friedel mate. Only the disc points are sampled.

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
        if disc.box_size != self.box_size:
            raise ValueError(f"disc is for box {disc.box_size}, map is {self.box_size}")
        device = self.rfft.device
        volume, scale, offset = self._grid_sample_layout()
        f = disc.freqs_yx.to(device)
        xyz = torch.stack([f[:, 1], f[:, 0], torch.zeros_like(f[:, 0])], dim=-1)  # (k, 3)
        # points inside the sampled grid only (else zero, as torch-image-interpolation)
        inside_all = float(f.norm(dim=-1).max()) < 0.5 - 1.0 / self.padded
        mats = matrices.to(device, torch.float32)
        out = []
        for start in range(0, mats.shape[0], batch_size):
            # volume xyz = Aᵀ·(kx, ky, 0), i.e. row vector xyz·A
            grid = torch.matmul(xyz, mats[start : start + batch_size])  # (b, k, 3) xyz
            sign = torch.where(grid[..., :1] < 0, -1.0, 1.0)  # Friedel mate: conjugate
            grid.mul_(sign).mul_(scale).add_(offset)  # grid_sample's [-1, 1], in place
            b, k = grid.shape[:2]
            values = torch.nn.functional.grid_sample(
                volume, grid.view(1, 1, 1, b * k, 3), mode="bilinear",
                padding_mode="border", align_corners=True,
            ).view(2, b, k)
            if not inside_all:
                values = values * (grid.abs() <= 1.0).all(dim=-1)
            pair = torch.empty((b, k, 2), dtype=torch.float32, device=device)
            pair[..., 0] = values[0]
            torch.mul(values[1], sign[..., 0], out=pair[..., 1])
            out.append(torch.view_as_complex(pair))
        if not out:
            return torch.zeros((0, disc.n_coeff), dtype=torch.complex64, device=device)
        return out[0] if len(out) == 1 else torch.cat(out)

    def _grid_sample_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The transform as a `(1, 2, 2N, 2N, N + 1)` real/imaginary volume (cached).

        For :func:`torch.nn.functional.grid_sample`, with the scale and offset that
        map frequencies (cycles/px, xyz) to its normalised coordinates (align_corners).
        """
        if self._layout is None:
            d, h, w = self.rfft.shape
            m = self.padded
            volume = torch.view_as_real(self.rfft).permute(3, 0, 1, 2)[None].contiguous()
            size = torch.tensor([w - 1, h - 1, d - 1], dtype=torch.float32,
                                device=self.rfft.device)
            centre = torch.tensor([0.0, m // 2, m // 2], device=self.rfft.device)
            self._layout = (volume, 2.0 * m / size, 2.0 * centre / size - 1.0)
        return self._layout
