"""The particle table: one STAR (or cryoSPARC) particle block with per-particle optics.

Readers (:mod:`swiftalign.io.star`, :mod:`swiftalign.io.cryosparc`) build it;
everything downstream reads particles, optics and origins through it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from swiftalign.errors import StarFileError

__all__ = ["ParticleTable"]


@dataclass
class ParticleTable:
    """Particles of one STAR file with their optics resolved per particle.

    Attributes
    ----------
    particles : pd.DataFrame
        The particle block as read (every column kept), one row per particle.
    optics : pd.DataFrame or None
        The optics block (3.1+), or None for a 3.0 file.
    path : Path
        The STAR file (image paths are relative to its folder).
    pixel_size_angstrom, voltage_kv, cs_mm, amplitude_contrast : np.ndarray
        `(n,)` per-particle optics.
    other_blocks : dict
        Any further blocks, kept for writing back.
    particle_block_name : str
        Name of the particle block in the input.
    """

    particles: pd.DataFrame
    optics: pd.DataFrame | None
    path: Path
    pixel_size_angstrom: np.ndarray
    voltage_kv: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    other_blocks: dict = field(default_factory=dict)
    particle_block_name: str = "particles"

    def __len__(self) -> int:
        return len(self.particles)

    def column(self, name: str, default: float | None = None) -> np.ndarray:
        """A numeric particle column as float64, or ``default`` everywhere."""
        if name in self.particles:
            return self.particles[name].to_numpy(dtype=np.float64)
        if default is None:
            raise StarFileError(f"{self.path}: particle block has no column '{name}'")
        return np.full(len(self), float(default))

    def subset(self, keep: np.ndarray) -> ParticleTable:
        """The particles selected by a `(n,)` bool mask or index array (rows renumbered)."""
        keep = np.asarray(keep)
        return ParticleTable(
            particles=self.particles.iloc[keep].reset_index(drop=True)
            if keep.dtype != bool else self.particles[keep].reset_index(drop=True),
            optics=self.optics,
            path=self.path,
            pixel_size_angstrom=self.pixel_size_angstrom[keep],
            voltage_kv=self.voltage_kv[keep],
            cs_mm=self.cs_mm[keep],
            amplitude_contrast=self.amplitude_contrast[keep],
            other_blocks=self.other_blocks,
            particle_block_name=self.particle_block_name,
        )

    @property
    def optics_group(self) -> np.ndarray:
        """`(n,)` int ``rlnOpticsGroup`` of every particle.

        Where the particle block has no such column: the optics block's group when
        it has exactly one (as the reader resolves the optics), else 1.
        """
        if "rlnOpticsGroup" in self.particles:
            return self.particles["rlnOpticsGroup"].to_numpy().astype(int)
        optics = self.optics
        if optics is not None and "rlnOpticsGroup" in optics and len(optics) == 1:
            return np.full(len(self), int(optics["rlnOpticsGroup"].iloc[0]))
        return np.ones(len(self), dtype=int)

    def optics_value(self, label: str) -> np.ndarray | None:
        """`(n,)` float64 value of an optics-block ``label`` for every particle.

        Looked up through each particle's optics group (:attr:`optics_group`);
        NaN for a particle whose group has no row. None when the optics block
        (or the label in it) is absent.
        """
        optics = self.optics
        if optics is None or label not in optics or len(optics) == 0:
            return None
        if "rlnOpticsGroup" not in optics:
            return np.full(len(self), float(optics[label].iloc[0]))
        by_group = pd.Series(optics[label].to_numpy(np.float64),
                             index=optics["rlnOpticsGroup"].astype(int).to_numpy())
        by_group = by_group[~by_group.index.duplicated(keep="last")]
        return by_group.reindex(self.optics_group).to_numpy(np.float64)

    def image_names(self) -> list[str]:
        """The ``rlnImageName`` entries."""
        if "rlnImageName" not in self.particles:
            raise StarFileError(f"{self.path}: particle block has no column 'rlnImageName'")
        return self.particles["rlnImageName"].astype(str).tolist()

    def origins_shift_px(self) -> np.ndarray:
        """Per-particle shifts `(n, 2)` (y, x) in px, from the origin columns (0 if none)."""
        from swiftalign.conventions import origin_angstrom_to_shift_px

        df = self.particles
        ps = self.pixel_size_angstrom
        has_a = "rlnOriginXAngst" in df and "rlnOriginYAngst" in df
        has_px = "rlnOriginX" in df and "rlnOriginY" in df
        origin_a = np.zeros((len(df), 2))
        if has_a:
            origin_a = df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64)
        if has_px:
            from_px = df[["rlnOriginX", "rlnOriginY"]].to_numpy(np.float64) * ps[:, None]
            if has_a:
                if not np.allclose(from_px, origin_a, atol=1e-3 * ps.max()):
                    warnings.warn(
                        f"{self.path}: rlnOriginX/Y (px) and rlnOriginX/YAngst (Å) disagree; "
                        "using rlnOriginX/YAngst",
                        stacklevel=2,
                    )
            else:
                origin_a = from_px
        return origin_angstrom_to_shift_px(origin_a, ps)
