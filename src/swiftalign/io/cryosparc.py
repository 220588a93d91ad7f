"""cryoSPARC ``.cs`` particle files (numpy structured arrays) as a :class:`ParticleTable`.

A ``.cs`` file is read with ``np.load`` and converted once, here, to the
RELION columns and units the rest of swiftalign uses (see
:mod:`swiftalign.conventions`); output stays RELION 3.1 STAR.

Field mapping
-------------
==============================  ==============================================
``blob/path``, ``blob/idx``     ``rlnImageName = (idx + 1)@path``; a leading
                                ``>`` (cryoSPARC import/export marker) is
                                stripped. Relative paths are looked up from
                                the ``.cs`` file's folder, then from its parent
                                (the project folder when the ``.cs`` sits in a
                                job folder ``Jnn/``).
``blob/psize_A``                pixel size (Å/px); ``--angpix`` only where it
                                is missing or 0.
``blob/shape``                  ``rlnImageSize`` of the optics block.
``ctf/df1_A``, ``ctf/df2_A``    ``rlnDefocusU``, ``rlnDefocusV`` (Å, underfocus
                                positive, unchanged).
``ctf/df_angle_rad``            ``rlnDefocusAngle`` = degrees(value); same axis
                                and sense (checked on the EMPIAR-10076 pair:
                                0.0921534 rad ↔ 5.28°).
``ctf/phase_shift_rad``         ``rlnPhaseShift`` = degrees(value).
``ctf/accel_kv``, ``ctf/cs_mm``,  voltage (kV), Cs (mm), amplitude contrast.
``ctf/amp_contrast``
``ctf/bfactor``, ``ctf/scale``  ``rlnCtfBfactor`` (Å²), ``rlnCtfScalefactor``
                                (RELION's CTF envelope), when present.
``ctf/exp_group_id``            optics groups (one per exposure group and
                                optics values), numbered from 1.
``alignments3D/pose``           axis-angle vector ``v`` (radians): the RELION
                                matrix is ``A = R(v)ᵀ`` with ``R(v)`` the
                                Rodrigues rotation, i.e. ``(rot, tilt, psi) =
                                Rotation.from_rotvec(v).as_euler("ZYZ")``
                                (pyem ``csparc2star`` and cryoDRGN
                                ``parse_pose_csparc`` use the same relation).
``alignments3D/shift``          pixels (x, y) at ``alignments3D/psize_A`` (else
                                ``blob/psize_A``), same sign as RELION's
                                origin: ``rlnOriginX/YAngst = shift · psize``.
``alignments3D/split``          0/1 → ``rlnRandomSubset`` 1/2.
``alignments3D/class``          ``rlnClassNumber`` = class + 1.
==============================  ==============================================

Without ``alignments3D`` fields, 3D classification results
(``alignments_class_K/…``) give each particle the pose of its most probable
class (highest ``class_posterior``); otherwise the particles carry no poses
(fine for ``align``). 2D-classification poses (``alignments2D``) are in-plane
only and are not read. ``blob/sign`` (image contrast) is not used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from swiftalign.errors import StarFileError
from swiftalign.io.table import ParticleTable

__all__ = ["read_cryosparc", "is_cryosparc_file", "CS_REQUIRED_FIELDS"]

#: Fields every particle ``.cs`` file must have.
CS_REQUIRED_FIELDS = (
    "blob/path",
    "blob/idx",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
)

_NPY_MAGIC = b"\x93NUMPY"
_CLASS_FIELD = re.compile(r"^alignments_class_(\d+)/class_posterior$")


def is_cryosparc_file(path: str | Path) -> bool:
    """True for a ``.cs`` suffix or a file that starts with the ``.npy`` magic bytes."""
    path = Path(path)
    if path.suffix.lower() == ".cs":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(_NPY_MAGIC)) == _NPY_MAGIC
    except OSError:
        return False


def _decode(values: np.ndarray) -> np.ndarray:
    """`(n,)` bytes/str → `(n,)` str, stripped of whitespace, NULs and the ``>`` marker."""
    out = pd.Series(values.astype(object)).map(
        lambda v: (v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v))
    )
    return out.str.strip().str.rstrip("\x00").str.lstrip(">").to_numpy(dtype=object)


def _numeric(cs: np.ndarray, path: Path, name: str, *, width: int | None = None) -> np.ndarray:
    """A numeric field as float64 `(n,)` or `(n, width)`; errors name file, field, particle."""
    try:
        vals = np.asarray(cs[name], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise StarFileError(f"{path}: field '{name}' is not numeric ({exc})") from None
    expected = (len(cs),) if width is None else (len(cs), width)
    if vals.shape != expected:
        raise StarFileError(
            f"{path}: field '{name}' has shape {vals.shape[1:]} per particle, expected "
            f"{expected[1:] or 'a scalar'}"
        )
    bad = ~np.isfinite(vals).reshape(len(cs), -1).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise StarFileError(f"{path}: particle {i + 1} has non-finite '{name}' ({cs[name][i]})")
    return vals


def _load(path: Path) -> np.ndarray:
    if not path.exists():
        raise StarFileError(f"{path}: no such file")
    try:
        cs = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for bad bytes
        raise StarFileError(
            f"{path}: not a cryoSPARC .cs file (numpy cannot load it: {exc})"
        ) from None
    if not isinstance(cs, np.ndarray):
        cs.close()
        raise StarFileError(f"{path}: not a cryoSPARC .cs file (an .npz archive, not one array)")
    if cs.dtype.names is None:
        raise StarFileError(
            f"{path}: not a cryoSPARC .cs file (a {cs.dtype} array without named fields such "
            "as 'blob/path')"
        )
    cs = cs.reshape(-1)
    if len(cs) == 0:
        raise StarFileError(f"{path}: no particles (the .cs array has 0 rows)")
    missing = [f for f in CS_REQUIRED_FIELDS if f not in cs.dtype.names]
    if missing:
        raise StarFileError(
            f"{path}: cryoSPARC field '{missing[0]}' is missing (particle .cs files need "
            f"{', '.join(CS_REQUIRED_FIELDS)})"
        )
    return cs


def _resolve_stacks(paths: np.ndarray, cs_dir: Path) -> np.ndarray:
    """Stack paths relative to ``cs_dir`` (as ``rlnImageName`` needs), per unique path."""
    uniq, inverse = np.unique(paths.astype(str), return_inverse=True)
    resolved = []
    for p in uniq:
        if Path(p).is_absolute():
            resolved.append(p)
            continue
        for base in (cs_dir, cs_dir.parent):
            if (base / p).exists():
                resolved.append(os.path.relpath(base / p, cs_dir))
                break
        else:
            resolved.append(p)  # reported (with the .cs file) when the images are opened
    return np.asarray(resolved, dtype=object)[inverse.reshape(-1)]


def _pose_fields(cs: np.ndarray) -> dict[str, str] | None:
    """Field names of the pose to use: ``alignments3D/…`` or the most probable class."""
    names = cs.dtype.names
    if "alignments3D/pose" in names:
        return {k: f"alignments3D/{k}" for k in
                ("pose", "shift", "psize_A", "split", "class") if f"alignments3D/{k}" in names}
    classes = sorted(int(m.group(1)) for n in names if (m := _CLASS_FIELD.match(n)))
    classes = [k for k in classes if f"alignments_class_{k}/pose" in names]
    if classes:
        return {"multiclass": ",".join(map(str, classes))}
    return None


def _multiclass_poses(cs: np.ndarray, path: Path, classes: list[int]) -> dict[str, np.ndarray]:
    post = np.stack([_numeric(cs, path, f"alignments_class_{k}/class_posterior")
                     for k in classes], axis=1)
    best = np.argmax(post, axis=1)
    rows = np.arange(len(cs))

    def pick(field: str, width: int | None) -> np.ndarray:
        stack = np.stack([_numeric(cs, path, f"alignments_class_{k}/{field}", width=width)
                          for k in classes], axis=1)
        return stack[rows, best]

    out = {"pose": pick("pose", 3), "shift": pick("shift", 2),
           "class": np.asarray(classes, dtype=np.float64)[best]}
    if all(f"alignments_class_{k}/psize_A" in cs.dtype.names for k in classes):
        out["psize_A"] = pick("psize_A", None)
    if all(f"alignments_class_{k}/split" in cs.dtype.names for k in classes):
        out["split"] = pick("split", None)
    return out


def _image_names(cs: np.ndarray, path: Path) -> pd.Series:
    """``rlnImageName`` (``N@stack``, stacks relative to the file's folder) of every particle."""
    stacks = _decode(cs["blob/path"])
    empty = stacks == ""
    if empty.any():
        raise StarFileError(f"{path}: particle {int(np.argmax(empty)) + 1} has an empty 'blob/path'")
    index = _numeric(cs, path, "blob/idx")
    if (index < 0).any() or (index != np.round(index)).any():
        i = int(np.argmax((index < 0) | (index != np.round(index))))
        raise StarFileError(f"{path}: particle {i + 1} has 'blob/idx' {index[i]} (must be an "
                            "integer >= 0)")
    rel = _resolve_stacks(stacks, path.parent)
    return pd.Series(index.astype(np.int64) + 1).astype(str) + "@" + pd.Series(rel)


def _pixel_sizes(cs: np.ndarray, path: Path, angpix: float | None) -> np.ndarray:
    """`(n,)` pixel sizes (Å/px): ``blob/psize_A``, ``angpix`` where it is missing or 0."""
    names = cs.dtype.names
    if "blob/psize_A" in names:
        pixel_size = _numeric(cs, path, "blob/psize_A")
    else:
        pixel_size = np.zeros(len(cs))
    if not (pixel_size > 0).all():
        if angpix is None:
            i = int(np.argmax(~(pixel_size > 0)))
            raise StarFileError(
                f"{path}: particle {i + 1} has no pixel size ('blob/psize_A' "
                f"{'missing' if 'blob/psize_A' not in names else pixel_size[i]}); pass --angpix"
            )
        pixel_size = np.where(pixel_size > 0, pixel_size, float(angpix))
    return pixel_size


def _add_poses(particles: pd.DataFrame, cs: np.ndarray, path: Path, pose: dict[str, str],
               pixel_size: np.ndarray) -> None:
    """Add RELION pose columns (angles, origins in Å, half sets, classes) from the pose fields."""
    from scipy.spatial.transform import Rotation

    from swiftalign.conventions import matrix_to_euler

    n = len(cs)
    if "multiclass" in pose:
        fields = _multiclass_poses(cs, path, [int(k) for k in pose["multiclass"].split(",")])
    else:
        fields = {"pose": _numeric(cs, path, pose["pose"], width=3)}
        if "shift" in pose:
            fields["shift"] = _numeric(cs, path, pose["shift"], width=2)
        for key in ("psize_A", "split", "class"):
            if key in pose:
                fields[key] = _numeric(cs, path, pose[key])
    # RELION A = R(v)ᵀ (R: Rodrigues rotation of the axis-angle vector v)
    euler = matrix_to_euler(Rotation.from_rotvec(fields["pose"]).as_matrix().transpose(0, 2, 1))
    particles["rlnAngleRot"] = euler[:, 0]
    particles["rlnAngleTilt"] = euler[:, 1]
    particles["rlnAnglePsi"] = euler[:, 2]
    shift = fields.get("shift", np.zeros((n, 2)))
    shift_psize = fields.get("psize_A", pixel_size)
    shift_psize = np.where(shift_psize > 0, shift_psize, pixel_size)
    particles["rlnOriginXAngst"] = shift[:, 0] * shift_psize
    particles["rlnOriginYAngst"] = shift[:, 1] * shift_psize
    if "split" in fields:
        split = fields["split"]
        if not np.isin(split, (0, 1)).all():
            i = int(np.argmax(~np.isin(split, (0, 1))))
            raise StarFileError(f"{path}: particle {i + 1} has split {split[i]:g} (must be "
                                "0 or 1)")
        particles["rlnRandomSubset"] = split.astype(int) + 1
    if "class" in fields:
        particles["rlnClassNumber"] = fields["class"].astype(int) + 1


def _optics_groups(cs: np.ndarray, path: Path, particles: pd.DataFrame, pixel_size: np.ndarray,
                   voltage: np.ndarray, cs_mm: np.ndarray,
                   amplitude_contrast: np.ndarray) -> pd.DataFrame:
    """The optics block (one group per exposure group and optics); sets ``rlnOpticsGroup``."""
    names = cs.dtype.names
    n = len(cs)
    exposure = (_numeric(cs, path, "ctf/exp_group_id") if "ctf/exp_group_id" in names
                else np.zeros(n))
    keys = np.stack([exposure, pixel_size, voltage, cs_mm, amplitude_contrast], axis=1)
    uniq, group0 = np.unique(keys.round(6), axis=0, return_inverse=True)
    groups = group0.reshape(-1) + 1
    particles["rlnOpticsGroup"] = groups
    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"exp_group_{int(e)}" for e in uniq[:, 0]],
        "rlnOpticsGroup": np.arange(1, len(uniq) + 1),
        "rlnVoltage": uniq[:, 2],
        "rlnSphericalAberration": uniq[:, 3],
        "rlnAmplitudeContrast": uniq[:, 4],
        "rlnImagePixelSize": uniq[:, 1],
        "rlnImageDimensionality": 2,
    })
    if "blob/shape" in names:
        shape = np.asarray(cs["blob/shape"]).reshape(n, -1)
        box = np.zeros(len(uniq), dtype=int)
        box[groups - 1] = shape[:, -1]
        optics["rlnImageSize"] = box
    return optics


def read_cryosparc(path: str | Path, *, angpix: float | None = None):
    """Read a cryoSPARC particle ``.cs`` file into a :class:`ParticleTable`.

    Parameters
    ----------
    path : str or Path
        A ``.cs`` file (numpy structured array, one row per particle) from a
        cryoSPARC job or export.
    angpix : float, optional
        Pixel size in Å/px to use where ``blob/psize_A`` is missing or 0.

    Returns
    -------
    ParticleTable
        RELION columns (``rlnImageName``, ``rlnDefocusU/V/Angle`` in Å and °,
        ``rlnPhaseShift`` °, and where the file has poses ``rlnAngleRot/Tilt/Psi``
        in ° (ZYZ), ``rlnOriginX/YAngst`` in Å, ``rlnRandomSubset`` 1/2,
        ``rlnClassNumber``), per-particle optics resolved and an optics block with
        one group per exposure group. ``path`` is the ``.cs`` file; image
        paths in ``rlnImageName`` are relative to its folder.

    Raises
    ------
    StarFileError
        Not a structured numpy array, no rows, a required field missing
        (``blob/path``, ``blob/idx``, ``ctf/…``), a non-finite value (names
        particle and field), or no pixel size and no ``angpix``.
    """
    path = Path(path)
    if angpix is not None and not angpix > 0:
        raise StarFileError(f"--angpix {angpix}: the pixel size must be positive (Å/px)")
    cs = _load(path)
    names = cs.dtype.names
    n = len(cs)

    image_names = _image_names(cs, path)
    pixel_size = _pixel_sizes(cs, path, angpix)

    voltage = _numeric(cs, path, "ctf/accel_kv")
    cs_mm = _numeric(cs, path, "ctf/cs_mm")
    amplitude_contrast = _numeric(cs, path, "ctf/amp_contrast")
    particles = pd.DataFrame({
        "rlnImageName": image_names,
        "rlnDefocusU": _numeric(cs, path, "ctf/df1_A"),
        "rlnDefocusV": _numeric(cs, path, "ctf/df2_A"),
        "rlnDefocusAngle": np.degrees(_numeric(cs, path, "ctf/df_angle_rad")),
        "rlnPhaseShift": (np.degrees(_numeric(cs, path, "ctf/phase_shift_rad"))
                          if "ctf/phase_shift_rad" in names else np.zeros(n)),
    })
    for field, label in (("ctf/bfactor", "rlnCtfBfactor"), ("ctf/scale", "rlnCtfScalefactor")):
        if field in names:  # RELION's CTF envelope (swiftalign.ctf), as pyem's csparc2star
            particles[label] = _numeric(cs, path, field)
    if "location/micrograph_path" in names:
        particles["rlnMicrographName"] = _decode(cs["location/micrograph_path"])

    pose = _pose_fields(cs)
    if pose is not None:
        _add_poses(particles, cs, path, pose, pixel_size)

    optics = _optics_groups(cs, path, particles, pixel_size, voltage, cs_mm, amplitude_contrast)
    return ParticleTable(
        particles=particles,
        optics=optics,
        path=path,
        pixel_size_angstrom=pixel_size,
        voltage_kv=voltage,
        cs_mm=cs_mm,
        amplitude_contrast=amplitude_contrast,
    )
