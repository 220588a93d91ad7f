"""MRC maps and MRCS particle stacks (through ``mrcfile``).

Maps are returned as float32 ``(z, y, x)`` arrays with their voxel size in Å.
Stacks are memory-mapped, so only the images asked for are read.
Writes are atomic: a temporary name in the same folder, then a rename.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from swiftalign.errors import MrcFileError
from swiftalign.io.atomic import atomic_path, atomic_write
from swiftalign.io.checks import require_regular_file

__all__ = ["MapData", "read_map", "read_map_header", "write_map", "open_stack", "write_stack",
           "atomic_path"]

_HEADER_BYTES = 1024


@dataclass
class MapData:
    """A 3D map.

    Attributes
    ----------
    data : np.ndarray
        `(d, h, w)` float32 voxel values, zyx order.
    voxel_size_angstrom : float
        Voxel size in Å (0 when the header leaves it unset and no override is given).
    path : Path
        File the map came from.
    """

    data: np.ndarray
    voxel_size_angstrom: float
    path: Path


def _open(path: Path, *, mmap: bool):
    """Open an MRC file after checking its header against the file size.

    Everything that could make ``mrcfile`` map or allocate more than the file
    (absurd dimensions, unknown modes, a file shorter than its header says) is
    refused here from the raw 1024-byte header, with a clear error.
    """
    require_regular_file(path, "MRC file", error=MrcFileError)
    size = path.stat().st_size
    if size < _HEADER_BYTES:
        raise MrcFileError(f"{path}: not an MRC file ({size} bytes, shorter than a header)")
    head = np.fromfile(path, dtype=np.uint8, count=_HEADER_BYTES).tobytes()
    for order in ("<", ">"):
        nx, ny, nz, mode = np.frombuffer(head[:16], dtype=f"{order}i4").tolist()
        if 0 < nx <= 10**6 and 0 < ny <= 10**6 and 0 < nz <= 2**31 and 0 <= mode <= 16:
            break
    else:
        raise MrcFileError(f"{path}: not an MRC file (header nx, ny, nz, mode invalid)")
    item = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}.get(mode)
    if item is None:
        raise MrcFileError(f"{path}: unsupported MRC mode {mode} (field 'mode'; use 0, 1, 2, 6 "
                           "or 12)")
    nsymbt = int(np.frombuffer(head[92:96], dtype=f"{order}i4")[0])
    _check_volume_stack(path, head, order, nz)
    if nsymbt < 0 or nsymbt > size:
        raise MrcFileError(f"{path}: extended header size nsymbt={nsymbt} is invalid")
    expected = _HEADER_BYTES + nsymbt + nx * ny * nz * item
    if size < expected:
        raise MrcFileError(
            f"{path}: file is truncated: header says {nx}x{ny}x{nz} (mode {mode}) = "
            f"{expected} bytes, file has {size} bytes"
        )
    opener = mrcfile.mmap if mmap else mrcfile.open
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mrc = opener(path, mode="r", permissive=True)
    except Exception as exc:  # mrcfile raises ValueError/IndexError on corrupt headers
        raise MrcFileError(f"{path}: not a readable MRC file ({exc})") from exc
    for w in caught:  # header problems concern the user; library deprecations do not
        if not issubclass(w.category, DeprecationWarning):
            warnings.warn(f"{path}: {w.message}", stacklevel=3)
    if mrc.data is None:
        mrc.close()
        raise MrcFileError(f"{path}: header could not be parsed as MRC")
    return mrc


def _check_volume_stack(path: Path, head: bytes, order: str, nz: int) -> None:
    """Refuse volume stacks (``ispg`` 401: ``nz / mz`` volumes) and ``mz`` that contradicts them.

    MRC2014: ``ispg`` 401 marks a stack of ``nz / mz`` volumes of ``mz`` sections each.
    """
    ispg = int(np.frombuffer(head[88:92], dtype=f"{order}i4")[0])
    mz = int(np.frombuffer(head[36:40], dtype=f"{order}i4")[0])
    if not 401 <= ispg <= 630 or mz == nz:
        return
    if mz <= 0 or nz % mz:
        raise MrcFileError(f"{path}: volume-stack header (ispg {ispg}) with mz {mz} that does "
                           f"not divide nz {nz}; fix the header (mz = nz for one map)")
    raise MrcFileError(f"{path}: a stack of {nz // mz} volumes (ispg {ispg}, mz {mz}, nz {nz}); "
                       "one map or an image stack is expected")


#: IMOD's stamp in the header ``imodStamp`` field; bit 0 of ``imodFlags`` marks signed bytes.
IMOD_STAMP = 1146047817


def _as_float32(path: Path, mrc) -> np.ndarray:
    """Map data as float32, with mode 0 (bytes) interpreted safely.

    MRC2014 says mode 0 is signed; IMOD writes unsigned bytes unless its stamp
    and signed flag say otherwise. Unstamped bytes are therefore read as
    unsigned (0…255, never negative); IMOD-signed bytes stay signed. A byte
    map with two values (a binary mask, e.g. 0/1, 0/255 or 0/−1) becomes 0/1.
    Mode 12 (float16) is read and converted exactly.
    """
    h = mrc.header
    if int(h.mode) != 0:
        return np.array(mrc.data, dtype=np.float32)
    raw = np.asarray(mrc.data)
    # imodStamp and imodFlags are header bytes 152-159 (extra2 starts at byte 112)
    extra2 = bytes(np.asarray(h.extra2).tobytes())
    order = "<" if h.mode.dtype.byteorder in ("<", "=", "|") else ">"
    imod_stamp, imod_flags = np.frombuffer(extra2[40:48], dtype=f"{order}i4")
    signed = imod_stamp == IMOD_STAMP and (int(imod_flags) & 1)
    data = raw.view(np.int8 if signed else np.uint8).astype(np.float32)
    values = np.unique(data)
    if len(values) <= 2 and values.max() != values.min():
        import warnings

        warnings.warn(f"{path}: byte map with values {values.tolist()} read as a 0/1 mask",
                      stacklevel=3)
        data = (data != values[np.argmin(np.abs(values))]).astype(np.float32)
    return data


def read_map_header(path: str | Path) -> tuple[tuple[int, ...], float]:
    """Shape `(d, h, w)` and voxel size (Å, x) of a map, from its header alone (no data read).

    Raises
    ------
    MrcFileError
        As :func:`read_map`.
    """
    with _open(Path(path), mmap=True) as mrc:
        return tuple(int(v) for v in mrc.data.shape), float(mrc.voxel_size.x)


def _check_header(path: Path, *, box_px: int | None, pixel_size_angstrom: float | None,
                  voxel_size_angstrom: float | None, tolerance: float = 0.05) -> None:
    """Box and voxel size against the particles', from the header, before any data is read."""
    shape, vox = read_map_header(path)
    if box_px is not None and shape != (box_px,) * 3:
        dims = "x".join(map(str, shape[::-1]))
        raise MrcFileError(f"{path}: map box {dims} differs from the particle box {box_px} px "
                           f"(the map must be {box_px}x{box_px}x{box_px}; header checked, data "
                           "not read)")
    vox = voxel_size_angstrom if voxel_size_angstrom is not None else vox
    if pixel_size_angstrom and vox > 0 and abs(vox - pixel_size_angstrom) > (
            tolerance * pixel_size_angstrom):
        raise MrcFileError(f"{path}: voxel size {vox} Å differs from the particle pixel size "
                           f"{pixel_size_angstrom} Å by more than {tolerance:.0%}; resample the "
                           "map (e.g. relion_image_handler --rescale_angpix)")


def read_map(path: str | Path, *, voxel_size_angstrom: float | None = None,
             box_px: int | None = None, pixel_size_angstrom: float | None = None) -> MapData:
    """Read a 3D map.

    Parameters
    ----------
    path : str or Path
        ``.mrc``/``.map`` file.
    voxel_size_angstrom : float, optional
        Override for the header voxel size (use when the header says 0).
    box_px : int, optional
        Box (px) the map must have, checked from the header before the data is
        read (a huge map given by mistake fails at once).
    pixel_size_angstrom : float, optional
        Pixel size (Å) the voxel size must be within 5 % of (0 in the header
        passes), checked from the header.

    Returns
    -------
    MapData
        `(d, h, w)` float32 data and voxel size in Å.

    Raises
    ------
    MrcFileError
        File missing, truncated, not MRC, not 3D, or with an axis order other
        than (1, 2, 3) (non-standard MAPC/MAPR/MAPS are refused).
    """
    path = Path(path)
    if box_px is not None or pixel_size_angstrom is not None:
        _check_header(path, box_px=box_px, pixel_size_angstrom=pixel_size_angstrom,
                      voxel_size_angstrom=voxel_size_angstrom)
    with _open(path, mmap=False) as mrc:
        h = mrc.header
        axes = (int(h.mapc), int(h.mapr), int(h.maps))
        if axes != (1, 2, 3):
            raise MrcFileError(
                f"{path}: axis order MAPC/MAPR/MAPS = {axes} is not (1, 2, 3); "
                "reorder the map (e.g. relion_image_handler or ChimeraX 'vop') first"
            )
        data = _as_float32(path, mrc)
        vox = float(mrc.voxel_size.x)
        vy, vz = float(mrc.voxel_size.y), float(mrc.voxel_size.z)
        if vox > 0 and (abs(vy - vox) > 1e-3 * vox or abs(vz - vox) > 1e-3 * vox):
            warnings.warn(f"{path}: anisotropic voxel size ({vox:.4g}, {vy:.4g}, {vz:.4g}) Å; "
                          f"using x ({vox:.4g} Å) for all axes", stacklevel=2)
    if data.ndim != 3:
        raise MrcFileError(f"{path}: expected a 3D map, got shape {data.shape}")
    if voxel_size_angstrom is not None:
        vox = float(voxel_size_angstrom)
    if not np.isfinite(data).all():
        raise MrcFileError(f"{path}: map contains non-finite values (NaN or Inf)")
    return MapData(data=data, voxel_size_angstrom=vox, path=path)


def _write(path: Path, data: np.ndarray, voxel_size_angstrom: float, *, stack: bool) -> None:
    path = Path(path)
    with atomic_write(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
        if stack:
            mrc.set_image_stack()
        mrc.voxel_size = (voxel_size_angstrom, voxel_size_angstrom,
                          voxel_size_angstrom if not stack else 1.0)
        mrc.update_header_stats()


def write_map(path: str | Path, data: np.ndarray, voxel_size_angstrom: float) -> None:
    """Write a `(d, h, w)` map atomically with its voxel size in Å."""
    _write(Path(path), data, voxel_size_angstrom, stack=False)


def write_stack(path: str | Path, images: np.ndarray, pixel_size_angstrom: float) -> None:
    """Write an `(n, h, w)` image stack atomically (MRC image-stack, ispg 0)."""
    _write(Path(path), images, pixel_size_angstrom, stack=True)


def open_stack(path: str | Path):
    """Open a particle stack memory-mapped, read-only.

    Returns
    -------
    mrcfile.mrcmemmap.MrcMemmap
        Call ``.close()`` when done. ``.data`` is `(n, h, w)` (a single image is
        `(h, w)`).

    Raises
    ------
    MrcFileError
        Missing, truncated or non-MRC file.
    """
    return _open(Path(path), mmap=True)
