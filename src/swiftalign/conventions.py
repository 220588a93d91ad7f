"""The one place that states swiftalign's conventions.

Rotations
---------
Euler angles are RELION's ZYZ triple ``(rot, tilt, psi)`` in degrees. The
RELION rotation matrix ``A`` maps reference (map) coordinates onto image
coordinates; it is ``A = scipy.Rotation.from_euler("ZYZ", [rot, tilt, psi],
degrees=True).as_matrix().T``. A projection image is
``p(x) = ∫ V(Aᵀ · (x, y, z)) dz`` with xyz column vectors, so the
projection direction in map coordinates is ``Aᵀ · ẑ``.
torch-fourier-slice takes matrices that rotate the central slice into the
volume, i.e. ``Aᵀ`` (checked against ``relion_project`` in the tests).

Symmetry: a map invariant under ``g`` (``V(g·y) = V(y)``) gives identical
projections for poses ``A`` and ``A·gᵀ``.

Origins and shifts
------------------
RELION's ``rlnOriginXAngst/YAngst`` (Å) is the offset of the box centre from
the particle centre: particle centre = box centre − origin. Internally a shift
``shift_yx_px`` (pixels, y then x) is where the particle centre sits relative to
the box centre, so ``shift_px = −origin_angstrom / pixel_size_angstrom``.
The box centre is pixel ``N // 2`` along each axis (RELION and teamtomo agree).

Fourier layout
--------------
``centred_rfft2`` moves the box centre to the array origin (``ifftshift``) and
takes ``torch.fft.rfft2``: shape ``(..., N, N // 2 + 1)``, DC at ``[0, 0]``, not
fftshifted. Frequencies are in cycles/pixel from ``torch.fft.fftfreq`` (rows,
``ky``) and ``torch.fft.rfftfreq`` (columns, ``kx``). A shift by ``s`` px
(content moves by ``+s``) multiplies coefficient ``k`` by
``exp(-2πi k·s)``.

CTF
---
Defocus in Å, positive underfocus; ``rlnDefocusAngle`` in degrees measured from
the x axis to the direction of defocus U; phase shift in degrees; the CTF is
positive at low frequency for positive amplitude contrast (RELION).

cryoSPARC
---------
``alignments3D/pose`` is an axis-angle vector ``v`` (radians) whose Rodrigues
rotation is ``R(v) = Aᵀ`` (pyem ``csparc2star``, cryoDRGN
``parse_pose_csparc``); ``alignments3D/shift`` is in pixels, (x, y), with the
sign of RELION's origin: ``rlnOriginX/YAngst = shift · psize``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.transform import Rotation

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "origin_angstrom_to_shift_px",
    "shift_px_to_origin_angstrom",
    "centred_rfft2",
    "centred_irfft2",
    "fftfreq_grid_rfft2",
    "angular_distance_deg",
    "euler_to_cryosparc_pose",
    "cryosparc_pose_to_euler",
]


def euler_to_matrix(euler_deg: np.ndarray) -> np.ndarray:
    """RELION ZYZ Euler angles to RELION rotation matrices ``A``.

    Parameters
    ----------
    euler_deg : np.ndarray
        `(..., 3)` angles ``(rot, tilt, psi)`` in degrees.

    Returns
    -------
    np.ndarray
        `(..., 3, 3)` matrices ``A`` (map → image coordinates, xyz columns).
    """
    euler_deg = np.asarray(euler_deg, dtype=np.float64)
    flat = euler_deg.reshape(-1, 3)
    mats = Rotation.from_euler("ZYZ", flat, degrees=True).as_matrix().transpose(0, 2, 1)
    return mats.reshape(*euler_deg.shape[:-1], 3, 3)


def matrix_to_euler(matrices: np.ndarray) -> np.ndarray:
    """RELION rotation matrices ``A`` to ZYZ Euler angles ``(rot, tilt, psi)``.

    At gimbal lock (tilt 0 or 180°) scipy sets the third angle to 0 and folds
    the in-plane rotation into the first; the matrix is reproduced exactly.

    Parameters
    ----------
    matrices : np.ndarray
        `(..., 3, 3)` RELION matrices ``A``.

    Returns
    -------
    np.ndarray
        `(..., 3)` angles in degrees, rot and psi in (−180, 180], tilt in [0, 180].
    """
    matrices = np.asarray(matrices, dtype=np.float64)
    flat = matrices.reshape(-1, 3, 3).transpose(0, 2, 1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # gimbal-lock notice
        euler = Rotation.from_matrix(flat).as_euler("ZYZ", degrees=True)
    return euler.reshape(*matrices.shape[:-2], 3)


def origin_angstrom_to_shift_px(
    origin_xy_angstrom: np.ndarray, pixel_size_angstrom: np.ndarray | float
) -> np.ndarray:
    """RELION ``rlnOriginX/YAngst`` (Å) to internal particle-centre shifts.

    Parameters
    ----------
    origin_xy_angstrom : np.ndarray
        `(..., 2)` origins (x, y) in Å.
    pixel_size_angstrom : np.ndarray or float
        Pixel size in Å/px, broadcastable to `(...)`.

    Returns
    -------
    np.ndarray
        `(..., 2)` shifts ``(y, x)`` in pixels of the particle centre from the box
        centre.
    """
    origin = np.asarray(origin_xy_angstrom, dtype=np.float64)
    ps = np.asarray(pixel_size_angstrom, dtype=np.float64)[..., None]
    return -origin[..., ::-1] / ps


def shift_px_to_origin_angstrom(
    shift_yx_px: np.ndarray, pixel_size_angstrom: np.ndarray | float
) -> np.ndarray:
    """Internal shifts ``(y, x)`` in px to RELION origins ``(x, y)`` in Å.

    Parameters
    ----------
    shift_yx_px : np.ndarray
        `(..., 2)` particle-centre shifts in pixels, (y, x).
    pixel_size_angstrom : np.ndarray or float
        Pixel size in Å/px, broadcastable to `(...)`.

    Returns
    -------
    np.ndarray
        `(..., 2)` ``(rlnOriginXAngst, rlnOriginYAngst)``.
    """
    shift = np.asarray(shift_yx_px, dtype=np.float64)
    ps = np.asarray(pixel_size_angstrom, dtype=np.float64)[..., None]
    return -shift[..., ::-1] * ps


def centred_rfft2(images: torch.Tensor) -> torch.Tensor:
    """rfft2 of images whose centre (pixel ``N // 2``) is the phase origin.

    Parameters
    ----------
    images : torch.Tensor
        `(..., h, w)` real images.

    Returns
    -------
    torch.Tensor
        `(..., h, w // 2 + 1)` complex, DC at ``[0, 0]``, not fftshifted.
    """
    return torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))


def centred_irfft2(spectra: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`centred_rfft2`.

    Parameters
    ----------
    spectra : torch.Tensor
        `(..., h, w // 2 + 1)` complex spectra.
    shape : tuple of int
        ``(h, w)`` of the real images.

    Returns
    -------
    torch.Tensor
        `(..., h, w)` real images.
    """
    return torch.fft.fftshift(torch.fft.irfft2(spectra, s=shape), dim=(-2, -1))


def fftfreq_grid_rfft2(
    box_size: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Frequencies of the :func:`centred_rfft2` layout.

    Parameters
    ----------
    box_size : int
        Image side ``N`` (square images).

    Returns
    -------
    torch.Tensor
        `(N, N // 2 + 1, 2)` frequencies ``(ky, kx)`` in cycles/pixel.
    """
    ky = torch.fft.fftfreq(box_size, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(box_size, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(ky, kx, indexing="ij"), dim=-1)


def angular_distance_deg(matrices_a: np.ndarray, matrices_b: np.ndarray) -> np.ndarray:
    """Geodesic angle between rotations.

    Parameters
    ----------
    matrices_a, matrices_b : np.ndarray
        `(..., 3, 3)` rotation matrices (broadcastable).

    Returns
    -------
    np.ndarray
        `(...)` angle of ``A_a · A_bᵀ`` in degrees, in [0, 180].
    """
    rel = np.einsum("...ij,...kj->...ik", matrices_a, matrices_b)
    trace = np.trace(rel, axis1=-2, axis2=-1)
    cos = np.clip((trace - 1.0) / 2.0, -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def euler_to_cryosparc_pose(euler_deg: np.ndarray) -> np.ndarray:
    """RELION ZYZ Euler angles to cryoSPARC ``alignments3D/pose`` axis-angle vectors.

    Parameters
    ----------
    euler_deg : np.ndarray
        `(..., 3)` ``(rot, tilt, psi)`` in degrees.

    Returns
    -------
    np.ndarray
        `(..., 3)` vectors ``v`` (radians, norm in [0, π]) with ``R(v) = Aᵀ``.
    """
    mats = euler_to_matrix(euler_deg)
    flat = mats.reshape(-1, 3, 3).transpose(0, 2, 1)
    return Rotation.from_matrix(flat).as_rotvec().reshape(*mats.shape[:-2], 3)


def cryosparc_pose_to_euler(pose_rad: np.ndarray) -> np.ndarray:
    """CryoSPARC ``alignments3D/pose`` axis-angle vectors to RELION ZYZ Euler angles.

    Parameters
    ----------
    pose_rad : np.ndarray
        `(..., 3)` axis-angle vectors ``v`` (radians).

    Returns
    -------
    np.ndarray
        `(..., 3)` ``(rot, tilt, psi)`` in degrees of ``A = R(v)ᵀ``.
    """
    pose = np.asarray(pose_rad, dtype=np.float64)
    mats = Rotation.from_rotvec(pose.reshape(-1, 3)).as_matrix().transpose(0, 2, 1)
    return matrix_to_euler(mats).reshape(*pose.shape[:-1], 3)
