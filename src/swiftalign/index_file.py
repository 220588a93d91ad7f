"""Persisted reference index (``.swidx``): build once, align any number of datasets.

One file, a zip container (stored, not compressed; zip CRCs catch corruption):

- ``manifest.json``: ``format`` = ``swiftalign-index``, ``format_version``, the
  swiftalign version that wrote it, the :class:`~swiftalign.alignment.AlignConfig`
  it was built with (resolution, symmetry, steps, shifts, CTF mode, metric,
  factory, seed …), pixel size (Å/px), box (px), sampling counts, the resolved
  FAISS factory, tuned ``nprobe`` and its recall, build timings, the map's path
  and SHA-256;
- ``reference.npy``: the `(N, N, N)` float32 reference map (CTF re-scoring and
  the local search need it);
- ``rot_tilt_deg.npy``, ``psi_deg.npy``, ``shifts_yx_px.npy``: the pose table
  (pose id → rot, tilt, psi, shift, see :mod:`swiftalign.gallery`);
- ``gallery_coeffs.npy``: `(n_images, n_coeff)` complex64 rotated-gallery
  coefficients (candidates are regenerated from them for exact re-scoring);
- ``faiss.index``: the trained and populated FAISS index
  (``faiss.serialize_index``); absent for the exact (``Flat``) search, which
  needs only the gallery;
- ``noise_groups.npy``, ``noise_power.npy``, ``noise_total_power.npy``,
  ``noise_counts.npy`` (format 2, weighted indexes only): the noise spectra
  whose pooled weights whitened the gallery; particles aligned with the file
  are whitened by the same weights (:mod:`swiftalign.noise`). Format 1 files
  (no weighting, DFT) are still read.

Only CTF modes that do not depend on the particles can be persisted
(``wiener``, ``none``); ``reference`` populates the index per defocus group of
the particles and is refused at build time.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import swiftalign
from swiftalign.errors import InputError

__all__ = [
    "INDEX_FORMAT",
    "INDEX_FORMAT_VERSION",
    "save_reference_index",
    "load_reference_index",
    "load_reference_index_cached",
    "read_manifest",
    "read_header",
    "IndexHeader",
]

INDEX_FORMAT = "swiftalign-index"
#: Version of the file layout; files with a newer version are refused.
INDEX_FORMAT_VERSION = 2
#: Config values of format 1 files, which predate these options.
_FORMAT_1_DEFAULTS = {"weighting": "none", "transform": "dft"}
_NOISE_ARRAYS = ("noise_groups", "noise_power", "noise_total_power", "noise_counts")

_ARRAYS = ("reference", "rot_tilt_deg", "psi_deg", "shifts_yx_px", "gallery_coeffs")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _sha256(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def save_reference_index(path: str | Path, refset) -> dict:
    """Write a reference set with its populated index to one file, atomically.

    Parameters
    ----------
    path : str or Path
        Output file (``.swidx`` by convention); written under a temporary name,
        then renamed.
    refset : swiftalign.alignment.ReferenceSet
        Built with ``populate=True`` (:func:`~swiftalign.alignment.build_reference_set`).

    Returns
    -------
    dict
        The manifest written.

    Raises
    ------
    ValueError
        When ``refset`` has no populated index, or CTF mode ``reference``.
    """
    from swiftalign.io.atomic import atomic_write
    from swiftalign.search import serialize_index

    if refset.index is None:
        raise ValueError("the reference set has no populated index (build it with populate=True)")
    if refset.config.ctf_mode in ("reference", "auto"):
        raise ValueError(f"--ctf-mode {refset.config.ctf_mode} cannot be persisted (a reference-"
                         "CTF index depends on the particles' defocus groups)")
    if refset.config.transform != "dft":
        raise ValueError("--transform dct cannot be persisted (its gallery keeps whole "
                         "spectra); build the index with --transform dft")
    path = Path(path)
    gallery = refset.gallery
    index = refset.index
    manifest = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "swiftalign_version": swiftalign.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": refset.config.model_dump(),
        "pixel_size_angstrom": float(refset.pixel_size_angstrom),
        "box_size": int(refset.box_size),
        "sampling": dict(vars(refset.sampling)),
        "n_poses": int(gallery.n_poses),
        "n_coeff": int(gallery.disc.n_coeff),
        "metric": gallery.metric,
        "factory": index.factory,
        "nprobe": index.nprobe,
        "recall": index.recall,
        "timings_s": refset.timings,
        "reference": {"path": str(refset.reference.path),
                      "sha256": _sha256(Path(refset.reference.path))},
    }
    arrays = {
        "reference": np.asarray(refset.reference.data, dtype=np.float32),
        "rot_tilt_deg": gallery.rot_tilt_deg,
        "psi_deg": gallery.psi_deg,
        "shifts_yx_px": gallery.shifts_yx_px,
        "gallery_coeffs": gallery.coeffs.detach().cpu().numpy().astype(np.complex64),
    }
    if refset.noise is not None:  # the whitening the gallery was built with
        noise = refset.noise
        arrays.update(noise_groups=np.asarray(noise.groups, np.int64),
                      noise_power=np.asarray(noise.noise_power, np.float64),
                      noise_total_power=np.asarray(noise.total_power, np.float64),
                      noise_counts=np.asarray(noise.counts, np.int64))
    with atomic_write(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED,
                                                   allowZip64=True) as zf:
        zf.writestr("manifest.json", json.dumps(manifest, indent=2))
        for name, arr in arrays.items():
            zf.writestr(f"{name}.npy", _npy_bytes(arr))
        if index.faiss_index is not None:
            zf.writestr("faiss.index", serialize_index(index).tobytes())
    return manifest


def _open_zip(path: Path) -> zipfile.ZipFile:
    from swiftalign.io.checks import require_regular_file

    require_regular_file(path, "index file")
    try:
        return zipfile.ZipFile(path, "r")
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path}: not a swiftalign index file ({exc}); build one with "
                         "`swiftalign index build`") from None


def _manifest(path: Path, zf: zipfile.ZipFile) -> dict:
    if "manifest.json" in zf.namelist():
        _check_member_size(path, zf.getinfo("manifest.json"), MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(zf.read("manifest.json"))
    except KeyError:
        raise InputError(f"{path}: not a swiftalign index file (no manifest.json)") from None
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InputError(f"{path}: corrupt index file (manifest.json: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise InputError(f"{path}: not a swiftalign index file (format {fmt!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > INDEX_FORMAT_VERSION or version < 1:
        raise InputError(
            f"{path}: index format_version {version!r} is not supported by swiftalign "
            f"{swiftalign.__version__} (reads 1 to {INDEX_FORMAT_VERSION}); rebuild the index"
        )
    return manifest


#: Largest manifest.json accepted (it holds parameters only).
MAX_MANIFEST_BYTES = 16 * 1024**2
#: Room for the ``.npy`` header of each array member.
_NPY_HEADER_BYTES = 4096


def _check_member_size(path: Path, info: zipfile.ZipInfo, limit: int) -> None:
    """Refuse a member that would inflate beyond ``limit`` bytes, from the zip directory alone.

    Index files are written uncompressed (``ZIP_STORED``), so a stored member
    cannot be larger than the file either; an oversized member (a zip bomb, a
    foreign file) fails here, before any byte is inflated.
    """
    if info.compress_type == zipfile.ZIP_STORED:
        limit = min(limit, path.stat().st_size)
    if info.file_size > limit:
        raise InputError(f"{path}: corrupt index file (member {info.filename} claims "
                         f"{info.file_size:,} bytes; at most {limit:,} expected from the "
                         "manifest and the file size)")


def _member_limits(manifest: dict) -> dict[str, int]:
    """Upper bounds (bytes) of the array members implied by the manifest.

    Raises
    ------
    InputError
        Manifest sizes that are missing or absurd.
    """
    try:
        box = int(manifest["box_size"])
        n_poses = int(manifest["n_poses"])
        n_coeff = int(manifest["n_coeff"])
        n_images = int(manifest["sampling"]["n_directions"]) * int(manifest["sampling"]["n_psi"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path_of(manifest)}: corrupt index manifest ({exc})") from None
    if not (0 < box <= 4096 and 0 < n_coeff <= box * box and 0 < n_images <= n_poses):
        raise InputError(f"{path_of(manifest)}: corrupt index manifest (box {box}, "
                         f"{n_images} images, {n_coeff} coefficients, {n_poses} poses)")
    h = _NPY_HEADER_BYTES
    small = 8 * 3 * n_poses + h  # pose tables: at most 3 float64 per pose
    return {"reference.npy": 4 * box**3 + h, "gallery_coeffs.npy": 8 * n_images * n_coeff + h,
            "rot_tilt_deg.npy": small, "psi_deg.npy": small, "shifts_yx_px.npy": small,
            "noise_groups.npy": 8 * 4096 + h, "noise_counts.npy": 8 * 4096 * (box + 1) + h,
            "noise_power.npy": 8 * 4096 * (box + 1) + h,
            "noise_total_power.npy": 8 * 4096 * (box + 1) + h,
            # a FAISS index stores at most the vectors themselves plus ids and lists
            "faiss.index": n_poses * (4 * 2 * n_coeff + 16) + 64 * 1024**2}


def path_of(manifest: dict) -> str:
    """The index file a manifest came from, for messages."""
    return str(manifest.get("_path", "index file"))


def check_members(path: Path, zf: zipfile.ZipFile, manifest: dict) -> None:
    """Every member's size against the manifest's bounds, before anything is inflated.

    Raises
    ------
    InputError
        A member larger than the manifest allows (or than the file).
    """
    limits = _member_limits({**manifest, "_path": str(path)})
    for info in zf.infolist():
        _check_member_size(path, info, limits.get(info.filename, MAX_MANIFEST_BYTES))


def manifest_config(manifest: dict) -> dict:
    """The AlignConfig values of a manifest (format 1 files: no weighting, DFT).

    Raises
    ------
    KeyError, TypeError
        When the manifest has no ``config`` mapping.
    """
    base = _FORMAT_1_DEFAULTS if manifest.get("format_version") == 1 else {}
    return {**base, **manifest["config"]}


def read_manifest(path: str | Path) -> dict:
    """The manifest of an index file (validated, arrays not read).

    Raises
    ------
    InputError
        Missing file, not a zip container, no manifest, foreign format or newer version.
    """
    path = Path(path)
    with _open_zip(path) as zf:
        return _manifest(path, zf)


@dataclass
class IndexHeader:
    """What an index file was built for, from its manifest alone (cheap checks before work).

    Attributes
    ----------
    config : AlignConfig
        Parameters it was built with.
    pixel_size_angstrom : float
        Pixel size (Å/px).
    box_size : int
        Box (px).
    source : str
        The file.
    manifest : dict
        The whole manifest.
    """

    config: object
    pixel_size_angstrom: float
    box_size: int
    source: str
    manifest: dict


def read_header(path: str | Path) -> IndexHeader:
    """The parameters of an index file without reading its arrays.

    Raises
    ------
    InputError
        See :func:`read_manifest`; a manifest without valid parameters.
    """
    from swiftalign.alignment import AlignConfig

    manifest = read_manifest(path)
    try:
        return IndexHeader(AlignConfig(**manifest_config(manifest)),
                           float(manifest["pixel_size_angstrom"]), int(manifest["box_size"]),
                           str(path), manifest)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: corrupt index manifest ({exc})") from None


def _read_contents(path: Path) -> tuple[dict, dict[str, np.ndarray], bytes | None]:
    """Manifest, arrays and serialised FAISS index (None if absent) of an index file.

    Raises
    ------
    InputError
        Missing, foreign, newer-version or corrupt file.
    """
    with _open_zip(path) as zf:
        manifest = _manifest(path, zf)
        check_members(path, zf, manifest)
        arrays = {}
        try:
            for name in _ARRAYS:
                arrays[name] = np.load(io.BytesIO(zf.read(f"{name}.npy")), allow_pickle=False)
            if manifest_config(manifest).get("weighting", "none") != "none":
                for name in _NOISE_ARRAYS:
                    arrays[name] = np.load(io.BytesIO(zf.read(f"{name}.npy")),
                                           allow_pickle=False)
            faiss_bytes = zf.read("faiss.index") if "faiss.index" in zf.namelist() else None
        except KeyError as exc:
            raise InputError(f"{path}: corrupt index file (missing {exc.args[0]})") from None
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise InputError(f"{path}: corrupt index file ({exc})") from None
    return manifest, arrays, faiss_bytes


def _faiss_index(path: Path, faiss_bytes: bytes, n_poses: int):
    """The FAISS index of an index file, checked to hold one vector per pose.

    Raises
    ------
    InputError
        Not a FAISS index, or another number of vectors than ``n_poses``.
    """
    import faiss

    try:
        raw = faiss.deserialize_index(np.frombuffer(faiss_bytes, dtype=np.uint8).copy())
    except RuntimeError as exc:
        raise InputError(f"{path}: corrupt FAISS index ({exc})") from None
    if raw.ntotal != n_poses:
        raise InputError(f"{path}: corrupt index file (FAISS index holds {raw.ntotal} "
                         f"vectors, the gallery {n_poses} poses)")
    return raw


def load_reference_index(path: str | Path, *, device: str = "cpu"):
    """Read an index file back into a :class:`~swiftalign.alignment.ReferenceSet`.

    Parameters
    ----------
    path : str or Path
        File written by :func:`save_reference_index`.
    device : str
        ``cpu`` or ``cuda``: where the gallery tensors go (and the FAISS index
        when faiss-gpu is installed).

    Returns
    -------
    swiftalign.alignment.ReferenceSet
        With its populated index (no training, no populating).

    Raises
    ------
    InputError
        Missing, foreign, newer-version or corrupt file (naming what is wrong).
    """
    from swiftalign.alignment import AlignConfig, ReferenceSet, Sampling
    from swiftalign.fourier import make_disc
    from swiftalign.gallery import Gallery
    from swiftalign.io.mrc import MapData
    from swiftalign.search import PopulatedIndex, index_from_faiss

    path = Path(path)
    manifest, arrays, faiss_bytes = _read_contents(path)
    try:
        config = AlignConfig(**manifest_config(manifest))
        sampling = Sampling(**manifest["sampling"])
        pixel_size = float(manifest["pixel_size_angstrom"])
        box = int(manifest["box_size"])
        factory = str(manifest["factory"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: corrupt index manifest ({exc})") from None
    disc = make_disc(box, sampling.disc_radius_fftfreq, device=device)
    coeffs = arrays["gallery_coeffs"]
    n_images = sampling.n_directions * sampling.n_psi
    if coeffs.shape != (n_images, disc.n_coeff) or arrays["reference"].shape != (box,) * 3:
        raise InputError(
            f"{path}: corrupt index file (gallery {coeffs.shape}, map "
            f"{arrays['reference'].shape}; expected ({n_images}, {disc.n_coeff}) and {(box,) * 3})"
        )
    noise = weights = None
    if "noise_power" in arrays:
        from swiftalign.noise import NoiseSpectrum, coefficient_weights

        noise = NoiseSpectrum(arrays["noise_groups"], arrays["noise_power"],
                              arrays["noise_total_power"], arrays["noise_counts"])
        if noise.noise_power.shape != (len(noise.groups), box // 2 + 1):
            raise InputError(f"{path}: corrupt index file (noise spectrum "
                             f"{noise.noise_power.shape})")
        # the weights the gallery was built with (build_reference_set)
        weights = coefficient_weights(noise.pooled(), disc, config.weighting)[0]
    gallery = Gallery(
        rot_tilt_deg=arrays["rot_tilt_deg"],
        psi_deg=arrays["psi_deg"],
        shifts_yx_px=arrays["shifts_yx_px"],
        coeffs=torch.as_tensor(coeffs, device=device),
        disc=disc,
        metric=config.metric,
        weights=weights,
    )
    if faiss_bytes is not None:
        populated = index_from_faiss(
            gallery, _faiss_index(path, faiss_bytes, gallery.n_poses), factory,
            nprobe=manifest.get("nprobe"), recall=manifest.get("recall"),
            bytes_per_pose=len(faiss_bytes) / max(1, gallery.n_poses), device=device,
            gpu_float16=config.gpu_float16)
    elif factory != "Flat":
        raise InputError(f"{path}: corrupt index file (factory {factory} but no faiss.index)")
    else:
        populated = PopulatedIndex(gallery, factory, recall=manifest.get("recall"))
    reference = MapData(arrays["reference"].astype(np.float32, copy=False), pixel_size, path)
    return ReferenceSet(config, reference, pixel_size, box, sampling, disc, gallery, populated,
                        source=str(path), timings={}, noise=noise)


_CACHE: dict[tuple, object] = {}
#: Number of index files this process has read (the Dask tests check one per worker).
load_count = 0


def load_reference_index_cached(path: str | Path, *, device: str = "cpu"):
    """:func:`load_reference_index`, once per process for an unchanged file.

    Dask workers call this for every chunk of particles; the file is read only
    the first time (keyed by resolved path, size, modification time and device).
    """
    global load_count
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError:
        return load_reference_index(p, device=device)  # raises the clear error
    key = (str(p), st.st_size, st.st_mtime_ns, device)
    if key not in _CACHE:
        _CACHE.clear()  # one index per process at a time (memory)
        _CACHE[key] = load_reference_index(p, device=device)
        load_count += 1
    return _CACHE[key]
