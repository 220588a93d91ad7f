"""Contrast transfer function (wrapping ``torch-ctf``) and the Wiener filter.

RELION conventions (see :mod:`swiftalign.conventions`): defocus U/V in Å,
positive underfocus; the defocus angle in degrees from the x axis to the
direction of defocus U; phase shift in degrees. torch-ctf takes mean defocus
and half the astigmatism in µm; this module is the only place that converts.

RELION's envelope (``CTF::getCTF`` in RELION's ``src/ctf.h``): the CTF is
multiplied by ``scale · exp(−B·s²/4)`` with ``B = rlnCtfBfactor`` (Å²) and
``scale = rlnCtfScalefactor``, ``s`` the spatial frequency in 1/Å. Both are
read from the particle block, else the optics block, else 0 and 1 (RELION's
``CTF::readByGroup``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch_ctf import calculate_ctf_2d

from swiftalign.errors import InputError

__all__ = [
    "CtfParams",
    "ctf_rfft2",
    "ctf_envelope_from_table",
    "wiener_filter",
    "electron_wavelength_angstrom",
]


class CtfParams:
    """Per-particle CTF parameters, `(n,)` arrays in RELION units.

    Parameters
    ----------
    defocus_u_angstrom, defocus_v_angstrom : array_like
        Defocus in Å (positive underfocus).
    defocus_angle_deg : array_like
        Astigmatism angle in degrees.
    voltage_kv, cs_mm, amplitude_contrast : array_like
        Microscope optics.
    phase_shift_deg : array_like
        Additional phase shift in degrees (phase plate).
    bfactor_angstrom2 : array_like
        RELION ``rlnCtfBfactor`` in Å²: envelope ``exp(−B·s²/4)``.
    scale : array_like
        RELION ``rlnCtfScalefactor``: the CTF is multiplied by it.
    """

    _FIELDS = (
        "defocus_u_angstrom",
        "defocus_v_angstrom",
        "defocus_angle_deg",
        "voltage_kv",
        "cs_mm",
        "amplitude_contrast",
        "phase_shift_deg",
        "bfactor_angstrom2",
        "scale",
    )

    defocus_u_angstrom: np.ndarray
    defocus_v_angstrom: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kv: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor_angstrom2: np.ndarray
    scale: np.ndarray

    def __init__(
        self,
        defocus_u_angstrom,
        defocus_v_angstrom,
        defocus_angle_deg,
        voltage_kv,
        cs_mm,
        amplitude_contrast,
        phase_shift_deg=0.0,
        bfactor_angstrom2=0.0,
        scale=1.0,
    ) -> None:
        values = (defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, voltage_kv, cs_mm,
                  amplitude_contrast, phase_shift_deg, bfactor_angstrom2, scale)
        arrays = [np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in values]
        n = max(a.size for a in arrays)
        for name, a in zip(self._FIELDS, arrays, strict=True):
            setattr(self, name, np.broadcast_to(a, (n,)).copy())

    def __len__(self) -> int:
        return self.defocus_u_angstrom.size

    def subset(self, index) -> CtfParams:
        """Parameters of the selected particles."""
        return CtfParams(*(getattr(self, name)[index] for name in self._FIELDS))


def electron_wavelength_angstrom(voltage_kv: float | np.ndarray) -> np.ndarray:
    """Relativistic electron wavelength λ = 12.2643247 / sqrt(V (1 + 0.978466e-6 V)) Å.

    Parameters
    ----------
    voltage_kv : float or np.ndarray
        Acceleration voltage in kV.
    """
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + 0.978466e-6 * v))


def ctf_rfft2(
    params: CtfParams,
    *,
    pixel_size_angstrom: float | np.ndarray,
    box_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """CTF on the centred-rfft grid of :mod:`swiftalign.conventions`.

    Parameters
    ----------
    params : CtfParams
        `n` particles' CTF parameters.
    pixel_size_angstrom : float or np.ndarray
        Pixel size in Å/px (scalar or `(n,)`).
    box_size : int
        Image side ``N``.

    Returns
    -------
    torch.Tensor
        `(n, N, N // 2 + 1)` float32, not fftshifted, positive at low frequency
        for positive amplitude contrast (RELION sign), times RELION's
        envelope ``scale · exp(−B·s²/4)`` (module docstring).
    """
    du = params.defocus_u_angstrom
    dv = params.defocus_v_angstrom
    angle = params.defocus_angle_deg.copy()
    # torch-ctf needs U >= V (it takes sqrt of the half-astigmatism); swap otherwise.
    swap = du < dv
    du, dv = np.where(swap, dv, du), np.where(swap, du, dv)
    angle = np.where(swap, angle + 90.0, angle)

    def t(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)

    ps = np.broadcast_to(np.asarray(pixel_size_angstrom, dtype=np.float64), du.shape)
    if np.allclose(ps, ps[0]):
        ps_arg = float(ps[0])
    else:
        raise ValueError("ctf_rfft2 takes one pixel size per call; group particles by optics")
    ctf = calculate_ctf_2d(
        defocus=t((du + dv) / 2.0 * 1e-4),
        astigmatism=t((du - dv) / 2.0 * 1e-4),
        astigmatism_angle=t(angle),
        voltage=t(params.voltage_kv),
        spherical_aberration=t(params.cs_mm),
        amplitude_contrast=t(params.amplitude_contrast),
        phase_shift=t(params.phase_shift_deg),
        pixel_size=ps_arg,
        image_shape=(box_size, box_size),
        rfft=True,
        fftshift=False,
    )
    ctf = ctf.to(torch.float32)
    if np.any(params.bfactor_angstrom2 != 0.0) or np.any(params.scale != 1.0):
        ctf = ctf * _envelope(params.bfactor_angstrom2, params.scale, ps_arg, box_size, ctf.device)
    return ctf


def _envelope(bfactor_angstrom2: np.ndarray, scale: np.ndarray, pixel_size_angstrom: float,
              box_size: int, device: torch.device | str) -> torch.Tensor:
    """RELION's ``scale · exp(−B·s²/4)`` on the rfft grid, `(n, N, N // 2 + 1)` (ctf.h, K4 = −B/4)."""
    fy = torch.fft.fftfreq(box_size, d=pixel_size_angstrom, device=device)
    fx = torch.fft.rfftfreq(box_size, d=pixel_size_angstrom, device=device)
    s2 = (fy[:, None] ** 2 + fx[None, :] ** 2).to(torch.float32)  # 1/Å²
    b = torch.as_tensor(np.asarray(bfactor_angstrom2, dtype=np.float32), device=device)
    a = torch.as_tensor(np.asarray(scale, dtype=np.float32), device=device)
    return a[:, None, None] * torch.exp(-b[:, None, None] / 4.0 * s2)


def ctf_envelope_from_table(table) -> tuple[np.ndarray, np.ndarray]:
    """RELION ``rlnCtfBfactor`` (Å²) and ``rlnCtfScalefactor`` per particle.

    Each is taken from the particle block, else from the particle's optics
    group, else 0 and 1 (RELION ``CTF::readByGroup``).

    Parameters
    ----------
    table : ParticleTable
        Particles (``particles`` and ``optics`` data frames).

    Returns
    -------
    (np.ndarray, np.ndarray)
        `(n,)` B-factors in Å² and `(n,)` scale factors.

    Raises
    ------
    InputError
        A non-finite value or a scale ≤ 0, naming the file, label and particle.
    """
    out = []
    for label, default in (("rlnCtfBfactor", 0.0), ("rlnCtfScalefactor", 1.0)):
        vals = _per_particle(table, label, default)
        bad = ~np.isfinite(vals) | ((vals <= 0) if label == "rlnCtfScalefactor" else False)
        if np.any(bad):
            i = int(np.argmax(bad))
            raise InputError(f"{table.path}: particle {i + 1} has {label} = {vals[i]}")
        out.append(vals)
    return out[0], out[1]


def _per_particle(table, label: str, default: float) -> np.ndarray:
    """A column from the particle block, else its optics group's value, else ``default``."""
    parts = table.particles
    n = len(parts)
    if label in parts:
        return parts[label].to_numpy(dtype=np.float64)
    values = table.optics_value(label)
    if values is None:
        return np.full(n, default)
    return np.where(np.isnan(values), default, values)


def wiener_filter(ctf: torch.Tensor, *, constant_fraction: float = 0.1) -> torch.Tensor:
    """Wiener filter ``W = C / (C² + c)`` with ``c = constant_fraction · mean(C²)``.

    Thesis §4.2: particles are multiplied by ``W`` so that they can be compared
    with CTF-free references.

    Parameters
    ----------
    ctf : torch.Tensor
        `(..., h, w)` real CTF values.
    constant_fraction : float
        ``c`` relative to the mean of ``C²`` over each particle's grid.

    Returns
    -------
    torch.Tensor
        `(..., h, w)` filter.
    """
    power = ctf**2
    c = constant_fraction * power.mean(dim=(-2, -1), keepdim=True)
    return ctf / (power + c)
