"""Direct Fourier inversion with CTF weighting (wrapping ``torch-fourier-slice`` insertion).

``V(k) = Σ_i CTF_i(k)·F_i(k) / (Σ_i CTF_i(k)² + λ)`` over every particle and
every symmetry-equivalent pose; particles are padded twofold, shifted to the
box centre with a Fourier phase ramp, inserted as central slices with the
RELION matrices' transposes (as for projection), and the result is corrected
for the trilinear-interpolation kernel (gridding correction, sinc²). λ is
``regularisation`` times the mean of the weight over the populated voxels
within Nyquist.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch_fourier_slice import insert_central_slices_rfft_3d_multichannel
from torch_fourier_slice.volume_utils import separable_sinc2_correction

from swiftalign.conventions import centred_rfft2, euler_to_matrix
from swiftalign.ctf import CtfParams, ctf_rfft2

__all__ = ["reconstruct"]


def _shift_ramp(box: int, shifts_yx_px: torch.Tensor) -> torch.Tensor:
    ky = torch.fft.fftfreq(box, device=shifts_yx_px.device)
    kx = torch.fft.rfftfreq(box, device=shifts_yx_px.device)
    phase = 2 * torch.pi * (shifts_yx_px[:, 0, None, None] * ky[None, :, None]
                            + shifts_yx_px[:, 1, None, None] * kx[None, None, :])
    return torch.polar(torch.ones_like(phase), phase)


def reconstruct(
    images: np.ndarray,
    euler_deg: np.ndarray,
    shift_yx_px: np.ndarray,
    *,
    ctf: CtfParams | None,
    pixel_size_angstrom: float,
    symmetry_group: np.ndarray | None = None,
    regularisation: float = 0.01,
    batch_size: int = 128,
    device: str = "cpu",
) -> np.ndarray:
    """Reconstruct a map from particles and their poses.

    Parameters
    ----------
    images : np.ndarray
        `(n, N, N)` particle images.
    euler_deg : np.ndarray
        `(n, 3)` RELION angles.
    shift_yx_px : np.ndarray
        `(n, 2)` particle-centre shifts (y, x) in px.
    ctf : CtfParams or None
        Per-particle CTF (None: CTF = 1).
    pixel_size_angstrom : float
        Pixel size (for the CTF).
    symmetry_group : np.ndarray, optional
        `(G, 3, 3)` matrices; each particle is inserted at every ``A·gᵀ``.
    regularisation : float
        λ relative to the mean weight.

    Returns
    -------
    np.ndarray
        `(N, N, N)` float32 map.
    """
    n, box, _ = images.shape
    padded = 2 * box
    p = box - box // 2  # keep the centre N//2 at the padded centre N
    q = box // 2
    vol_shape = (padded, padded, padded)
    group = np.eye(3)[None] if symmetry_group is None else symmetry_group
    mats = euler_to_matrix(euler_deg)
    num = None
    den = None
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        img = torch.as_tensor(images[start:stop], device=device, dtype=torch.float32)
        img = img - img.mean(dim=(-2, -1), keepdim=True)
        img = F.pad(img, [p, q, p, q])
        spec = centred_rfft2(img)
        spec = spec * _shift_ramp(padded, torch.as_tensor(shift_yx_px[start:stop],
                                                          device=device, dtype=torch.float32))
        if ctf is not None:
            c = ctf_rfft2(ctf.subset(np.arange(start, stop)),
                          pixel_size_angstrom=pixel_size_angstrom, box_size=padded, device=device)
        else:
            c = torch.ones(spec.shape, device=device)
        chans = torch.stack([spec * c, (c * c).to(torch.complex64)], dim=1)  # (b, 2, h, w)
        chans = torch.fft.fftshift(chans, dim=(-2,))
        m = mats[start:stop]
        sym_mats = np.einsum("nij,gkj->ngik", m, group)  # A·gᵀ, (b, G, 3, 3)
        rot = torch.as_tensor(sym_mats.transpose(0, 1, 3, 2), dtype=torch.float32, device=device)
        chans = chans[:, None].expand(-1, len(group), -1, -1, -1)
        dft, _ = insert_central_slices_rfft_3d_multichannel(
            chans.reshape(-1, 2, *chans.shape[-2:]), vol_shape, rot.reshape(-1, 3, 3)
        )
        num = dft[0] if num is None else num + dft[0]
        den = dft[1].real if den is None else den + dft[1].real
    populated = den > 0
    lam = regularisation * float(den[populated].mean()) if bool(populated.any()) else 1.0
    vol_ft = num / (den + lam)
    vol_ft = torch.fft.ifftshift(vol_ft, dim=(-3, -2))
    vol = torch.fft.irfftn(vol_ft, dim=(-3, -2, -1), s=vol_shape)
    vol = torch.fft.fftshift(vol, dim=(-3, -2, -1))
    vol = vol / separable_sinc2_correction(vol_shape, device=vol.device)
    vol = vol[p : p + box, p : p + box, p : p + box]
    return vol.cpu().numpy().astype(np.float32)
