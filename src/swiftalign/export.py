"""Particle tables out to other programs: cryoSPARC ``.cs`` and ChimeraX ``.bild``.

cryoSPARC
---------
:func:`cryosparc_dataset` is the exact inverse of the reader
:func:`swiftalign.io.cryosparc.read_cryosparc` (see its field table): a
RELION table → a ``cryosparc.dataset.Dataset`` (cryosparc-tools' own class,
saved in its numpy ``.cs`` format), with the dtypes cryoSPARC itself writes
(``f4`` values, ``u4`` indices):

==============================  ==============================================
``uid``                         a stable 64-bit hash of ``rlnImageName`` (and
                                its occurrence number for repeated names), so
                                that exporting twice gives the same uids.
``blob/path``, ``blob/idx``     ``N@stack`` → the stack relative to the
                                ``.cs`` file's folder (absolute stays
                                absolute; all absolute with
                                ``absolute_paths``), ``N − 1``.
``blob/shape``                  ``(box, box)`` from ``rlnImageSize`` (else the
                                stack headers).
``blob/psize_A``                pixel size (Å/px).
``blob/sign``                   +1 by default: protein white, as RELION
                                refinement needs its particles (extraction with
                                ``--invert_contrast``); −1 for dark protein
                                (raw micrograph contrast: cryoSPARC's import of
                                the dark EMPIAR-10076 particles says −1).
``ctf/…``                       ``accel_kv``, ``cs_mm``, ``amp_contrast``,
                                ``df1_A`` = rlnDefocusU, ``df2_A`` =
                                rlnDefocusV (Å), ``df_angle_rad`` and
                                ``phase_shift_rad`` = radians of the degrees,
                                ``exp_group_id`` = rlnOpticsGroup, ``scale`` =
                                rlnCtfScalefactor (1), ``bfactor`` =
                                rlnCtfBfactor (0).
``alignments3D/pose``           axis-angle ``v`` (rad) with ``R(v) = Aᵀ``
                                (:func:`swiftalign.conventions.euler_to_cryosparc_pose`).
``alignments3D/shift``          ``rlnOriginX/YAngst / psize`` (px, same sign).
``alignments3D/psize_A``        pixel size (Å/px).
``alignments3D/split``          ``rlnRandomSubset − 1`` (when present).
``alignments3D/class``          ``rlnClassNumber − 1`` with
                                ``class_posterior`` 1 (when present).
``location/micrograph_path``    ``rlnMicrographName`` (when present).
==============================  ==============================================

Particles without ``rlnAngleRot/Tilt/Psi`` get no ``alignments3D`` fields.

ChimeraX
--------
:func:`angular_distribution_bild` writes what ``relion_refine`` writes as
``*_angdist.bild`` (``HealpixSampling::writeBildFileOrientationalDistribution``,
RELION 3.1): one cylinder per occupied direction bin, from radius ``R`` to
``R·(1 + 0.3·count/max)`` along the viewing direction, centred on the map
centre, ``R`` = half the box in Å, width ``0.5·π·R·step/360°``, coloured from
blue to red by the bin's z-score (clipped to [−1, 5]).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from swiftalign.errors import StarFileError

__all__ = [
    "CS_EXPORT_REQUIRED_COLUMNS",
    "angular_distribution_bild",
    "cryosparc_dataset",
    "direction_counts",
    "particle_box_sizes",
    "write_bild",
    "write_cryosparc",
]

#: Particle columns a ``.cs`` export needs.
CS_EXPORT_REQUIRED_COLUMNS = ("rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")

_POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")

#: cryoSPARC's own field types (cryosparc-tools allocation specs).
_BLOB_FIELDS = [("blob/path", "O"), ("blob/idx", "u4"), ("blob/shape", "u4", (2,)),
                ("blob/psize_A", "f4"), ("blob/sign", "f4")]
_CTF_FIELDS = [("ctf/exp_group_id", "u4"), ("ctf/accel_kv", "f4"), ("ctf/cs_mm", "f4"),
               ("ctf/amp_contrast", "f4"), ("ctf/df1_A", "f4"), ("ctf/df2_A", "f4"),
               ("ctf/df_angle_rad", "f4"), ("ctf/phase_shift_rad", "f4"), ("ctf/scale", "f4"),
               ("ctf/bfactor", "f4")]
_POSE_FIELDS = [("alignments3D/pose", "f4", (3,)), ("alignments3D/shift", "f4", (2,)),
                ("alignments3D/psize_A", "f4")]


def _finite_column(table, name: str, default: float | None = None) -> np.ndarray:
    """`(n,)` float64 column; a missing or non-finite value is named (file, column, row)."""
    try:
        values = table.column(name, default)
    except (TypeError, ValueError):
        raise StarFileError(f"{table.path}: column '{name}' is not numeric") from None
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise StarFileError(f"{table.path}: particle {i + 1} has {name} = "
                            f"{table.particles[name].iloc[i]!r} (must be a finite number)")
    return values


def _image_locations(table, relative_to: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """`(n,)` stack paths and `(n,)` 0-based indices in them.

    Paths are relative to ``relative_to``, absolute when it is None.
    """
    from swiftalign.io.star import parse_image_name

    names = pd.Series(table.image_names())
    parts = names.str.extract(r"^\s*(\d+)@(.+?)\s*$")
    number = pd.to_numeric(parts[0], errors="coerce")
    bad = number.isna() | (number < 1)
    if bad.any():
        i = int(np.argmax(bad.to_numpy()))
        raise StarFileError(f"{table.path}: particle {i + 1} has rlnImageName {names[i]!r} "
                            "(not of the form N@stack.mrcs with N >= 1)")
    uniq, inverse = np.unique(parts[1].to_numpy(dtype=str), return_inverse=True)
    out_dir = None if relative_to is None else Path(relative_to).resolve()
    paths = []
    for stack in uniq:  # one per stack file, not per particle
        resolved = parse_image_name(f"1@{stack}", table.path.parent)[1]
        if out_dir is None:
            paths.append(str(resolved.resolve()))
        else:
            paths.append(stack if Path(stack).is_absolute()
                         else os.path.relpath(resolved.resolve(), out_dir))
    return (np.asarray(paths, dtype=object)[inverse.reshape(-1)],
            number.to_numpy(dtype=np.int64) - 1)


def particle_box_sizes(table) -> np.ndarray:
    """`(n,)` box size (px) of each particle: optics ``rlnImageSize``, else the stack headers.

    Raises
    ------
    StarFileError, MrcFileError
        A stack is missing or unreadable (only when the optics block has no size).
    """
    sizes = table.optics_value("rlnImageSize")
    if sizes is not None and not np.isnan(sizes).any():
        return sizes.astype(np.int64)
    from swiftalign.io.particles import ParticleImages

    with ParticleImages(table) as images:
        return np.full(len(table), images.box_size, dtype=np.int64)


def _uids(image_names: pd.Series) -> np.ndarray:
    """`(n,)` uint64: a hash of each name and its occurrence number (stable across exports)."""
    frame = pd.DataFrame({"name": image_names.to_numpy(),
                          "occurrence": image_names.groupby(image_names).cumcount().to_numpy()})
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)


def cryosparc_dataset(table, *, output_dir: str | Path, absolute_paths: bool = False,
                      sign: float = 1.0):
    """A cryoSPARC particle dataset of a table (the inverse of ``read_cryosparc``).

    Parameters
    ----------
    table : ParticleTable
        Particles with ``rlnImageName`` and CTF columns; poses (``rlnAngleRot/
        Tilt/Psi`` °, origins Å or px), ``rlnRandomSubset`` and
        ``rlnClassNumber`` are exported when present.
    output_dir : str or Path
        Folder of the ``.cs`` file: stack paths are written relative to it.
    absolute_paths : bool
        Write absolute stack paths instead (e.g. for a cryoSPARC project elsewhere).
    sign : float
        ``blob/sign``: +1 for white protein (RELION), −1 for dark protein.

    Returns
    -------
    cryosparc.dataset.Dataset
        `n` rows with the fields of the module table.

    Raises
    ------
    StarFileError
        A required column (:data:`CS_EXPORT_REQUIRED_COLUMNS`) is missing, a value
        is not finite, or an image name is malformed (names file, column, row).
    ValueError
        ``sign`` is not ±1.
    """
    from cryosparc.dataset import Dataset

    from swiftalign.conventions import euler_to_cryosparc_pose, shift_px_to_origin_angstrom

    if sign not in (1, -1):
        raise ValueError(f"--sign {sign}: must be +1 (white protein) or -1 (dark protein)")
    for name in CS_EXPORT_REQUIRED_COLUMNS:
        if name not in table.particles:
            raise StarFileError(f"{table.path}: particle block has no column '{name}' (a "
                                "cryoSPARC export needs image names and CTF parameters)")
    paths, index = _image_locations(table, None if absolute_paths else Path(output_dir))
    has_pose = all(c in table.particles for c in _POSE_COLUMNS)
    columns = {c: c in table.particles for c in ("rlnRandomSubset", "rlnClassNumber",
                                                   "rlnMicrographName")}
    fields = list(_BLOB_FIELDS) + _CTF_FIELDS
    if has_pose:
        fields += _POSE_FIELDS
        fields += [("alignments3D/split", "u4")] if columns["rlnRandomSubset"] else []
        if columns["rlnClassNumber"]:
            fields += [("alignments3D/class", "u4"), ("alignments3D/class_posterior", "f4")]
    if columns["rlnMicrographName"]:
        fields.append(("location/micrograph_path", "O"))
    n = len(table)
    ps = table.pixel_size_angstrom
    dset = Dataset.allocate(n, fields)
    dset["uid"] = _uids(table.particles["rlnImageName"].astype(str))
    dset["blob/path"] = paths
    dset["blob/idx"] = index
    box = particle_box_sizes(table)
    dset["blob/shape"] = np.stack([box, box], axis=1)
    dset["blob/psize_A"] = ps
    dset["blob/sign"] = float(sign)
    _fill_ctf(dset, table)
    if has_pose:
        euler = np.stack([_finite_column(table, c) for c in _POSE_COLUMNS], axis=1)
        dset["alignments3D/pose"] = euler_to_cryosparc_pose(euler)
        origin_xy = shift_px_to_origin_angstrom(table.origins_shift_px(), ps)
        dset["alignments3D/shift"] = origin_xy / ps[:, None]
        dset["alignments3D/psize_A"] = ps
        if columns["rlnRandomSubset"]:
            dset["alignments3D/split"] = _subset_split(table)
        if columns["rlnClassNumber"]:
            dset["alignments3D/class"] = _finite_column(table, "rlnClassNumber") - 1
            dset["alignments3D/class_posterior"] = 1.0
    if columns["rlnMicrographName"]:
        dset["location/micrograph_path"] = table.particles["rlnMicrographName"].astype(str)
    return dset


def _fill_ctf(dset, table) -> None:
    """The ``ctf/…`` fields of ``dset`` from the table's CTF columns and optics."""
    groups = (_finite_column(table, "rlnOpticsGroup") if "rlnOpticsGroup" in table.particles
              else np.ones(len(table)))
    dset["ctf/exp_group_id"] = groups
    dset["ctf/accel_kv"] = table.voltage_kv
    dset["ctf/cs_mm"] = table.cs_mm
    dset["ctf/amp_contrast"] = table.amplitude_contrast
    dset["ctf/df1_A"] = _finite_column(table, "rlnDefocusU")
    dset["ctf/df2_A"] = _finite_column(table, "rlnDefocusV")
    dset["ctf/df_angle_rad"] = np.radians(_finite_column(table, "rlnDefocusAngle"))
    dset["ctf/phase_shift_rad"] = np.radians(_finite_column(table, "rlnPhaseShift", 0.0))
    dset["ctf/scale"] = _finite_column(table, "rlnCtfScalefactor", 1.0)
    dset["ctf/bfactor"] = _finite_column(table, "rlnCtfBfactor", 0.0)


def _subset_split(table) -> np.ndarray:
    """`(n,)` cryoSPARC split 0/1 from ``rlnRandomSubset`` 1/2."""
    subset = _finite_column(table, "rlnRandomSubset")
    bad = ~np.isin(subset, (1, 2))
    if bad.any():
        i = int(np.argmax(bad))
        raise StarFileError(f"{table.path}: particle {i + 1} has rlnRandomSubset {subset[i]:g} "
                            "(must be 1 or 2)")
    return subset - 1


def write_cryosparc(path: str | Path, table, *, absolute_paths: bool = False,
                    sign: float = 1.0) -> Path:
    """Write a table as a cryoSPARC particle ``.cs`` file, atomically.

    Parameters
    ----------
    path : str or Path
        Output ``.cs`` file (temporary name in the same folder, then renamed).
    table : ParticleTable
    absolute_paths : bool
        Absolute stack paths instead of paths relative to the file's folder.
    sign : float
        ``blob/sign``: +1 white protein (RELION, default), −1 dark protein.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    StarFileError
        See :func:`cryosparc_dataset`.
    """
    from swiftalign.io.atomic import atomic_write

    path = Path(path)
    dset = cryosparc_dataset(table, output_dir=path.parent, absolute_paths=absolute_paths,
                             sign=sign)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        dset.save(f)
    return path


def direction_counts(euler_deg: np.ndarray, *, bin_deg: float = 7.5
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Viewing directions binned on a quasi-uniform grid.

    Parameters
    ----------
    euler_deg : np.ndarray
        `(n, 3)` RELION (rot, tilt, psi) in degrees; psi does not change the
        direction ``(cos rot·sin tilt, sin rot·sin tilt, cos tilt)`` (RELION
        ``Euler_angles2direction``).
    bin_deg : float
        Spacing of the bin centres (°): ``4π / bin²`` Fibonacci directions.

    Returns
    -------
    centres : np.ndarray
        `(m, 3)` unit vectors of the bin centres.
    counts : np.ndarray
        `(m,)` int64 particles per bin (nearest centre).
    """
    from scipy.spatial import cKDTree

    from swiftalign.sampling import fibonacci_directions

    if not bin_deg > 0:
        raise ValueError(f"--bin {bin_deg}: the direction bin must be positive (°)")
    rot, tilt = np.radians(np.asarray(euler_deg, dtype=np.float64)[:, :2]).T
    directions = np.stack([np.cos(rot) * np.sin(tilt), np.sin(rot) * np.sin(tilt),
                           np.cos(tilt)], axis=1)
    centres = fibonacci_directions(max(12, int(round(4 * math.pi / math.radians(bin_deg) ** 2))))
    _, nearest = cKDTree(centres).query(directions)
    return centres, np.bincount(nearest, minlength=len(centres)).astype(np.int64)


def angular_distribution_bild(euler_deg: np.ndarray, *, radius_angstrom: float,
                              bin_deg: float = 7.5, max_length_fraction: float = 0.3,
                              width_fraction: float = 0.5) -> str:
    """A ChimeraX ``.bild`` angular distribution, as ``relion_refine`` writes it.

    Parameters
    ----------
    euler_deg : np.ndarray
        `(n, 3)` RELION (rot, tilt, psi) in degrees.
    radius_angstrom : float
        ``R``: the cylinders start on this sphere around the map centre, which
        is placed at ``(R, R, R)`` (RELION: R = offset = box · pixel size / 2, Å).
    bin_deg : float
        Direction bin spacing (°), see :func:`direction_counts`.
    max_length_fraction, width_fraction : float
        RELION's ``Rmax_frac`` (0.3: the fullest bin reaches 1.3 R) and
        ``width_frac`` (0.5: width ``0.5·π·R·bin/360``).

    Returns
    -------
    str
        ``.color r g b`` and ``.cylinder x1 y1 z1 x2 y2 z2 width`` lines (Å).
    """
    centres, counts = direction_counts(euler_deg, bin_deg=bin_deg)
    pdf = counts / max(int(counts.sum()), 1)
    mean, sigma, top = pdf.mean(), pdf.std(), max(pdf.max(), 1e-30)
    width = width_fraction * math.pi * radius_angstrom * bin_deg / 360.0
    occupied = np.nonzero(pdf > 0)[0]
    z = (pdf[occupied] - mean) / sigma if sigma > 0 else np.zeros(len(occupied))
    colour = np.clip(z, -1.0, 5.0) / 6.0 + 1.0 / 6.0
    r_end = radius_angstrom * (1.0 + max_length_fraction * pdf[occupied] / top)
    start = radius_angstrom * centres[occupied] + radius_angstrom
    end = r_end[:, None] * centres[occupied] + radius_angstrom
    visible = np.abs(end - start).max(axis=1) > 0.01  # chimera refuses zero-length cylinders
    lines = []
    for c, a, b in zip(colour[visible], start[visible], end[visible], strict=True):
        lines.append(f".color {c:.4f} 0 {1.0 - c:.4f}")
        lines.append(".cylinder " + " ".join(f"{v:.3f}" for v in (*a, *b)) + f" {width:.3f}")
    return "\n".join(lines) + "\n"


def write_bild(path: str | Path, table, *, bin_deg: float = 7.5) -> Path:
    """Write the angular distribution of a table's poses as ``.bild``, atomically.

    ``R`` is half the box in Å (the first particle's box and pixel size).

    Raises
    ------
    StarFileError
        The table has no ``rlnAngleRot/Tilt/Psi`` or a non-finite angle.
    """
    from swiftalign.io.atomic import atomic_write

    missing = [c for c in _POSE_COLUMNS if c not in table.particles]
    if missing:
        raise StarFileError(f"{table.path}: particle block has no column '{missing[0]}' (an "
                            "angular distribution needs poses)")
    euler = np.stack([_finite_column(table, c) for c in _POSE_COLUMNS], axis=1)
    radius = float(particle_box_sizes(table)[0] * table.pixel_size_angstrom[0] / 2.0)
    text = angular_distribution_bild(euler, radius_angstrom=radius, bin_deg=bin_deg)
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return path
