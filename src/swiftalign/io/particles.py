"""Particle images behind a STAR file's ``rlnImageName`` column.

All stacks are opened (memory-mapped) and every ``N@stack`` reference is
checked against its stack's header before any long work; images are then read
in batches.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from swiftalign.errors import MrcFileError, StarFileError
from swiftalign.io.mrc import open_stack
from swiftalign.io.star import parse_image_name
from swiftalign.io.table import ParticleTable

__all__ = ["ParticleImages", "clip_hot_pixels", "open_usable_particles"]

#: Pixels further than this many robust standard deviations from the median are clipped.
HOT_PIXEL_SIGMA = 8.0


def clip_hot_pixels(images: np.ndarray, *, n_sigma: float = HOT_PIXEL_SIGMA) -> np.ndarray:
    """Clip outlier pixels (detector hot pixels) of each image.

    Parameters
    ----------
    images : np.ndarray
        `(b, h, w)` images.
    n_sigma : float
        Clip at median ± ``n_sigma`` · 1.4826 · MAD of each image.

    Returns
    -------
    np.ndarray
        `(b, h, w)` float32 (modified in place).
    """
    flat = images.reshape(len(images), -1)
    med = np.median(flat, axis=1, keepdims=True)
    mad = np.median(np.abs(flat - med), axis=1, keepdims=True) * 1.4826
    mad = np.where(mad > 0, mad, np.std(flat, axis=1, keepdims=True))
    np.clip(flat, med - n_sigma * mad, med + n_sigma * mad, out=flat)
    return images


def _release_pages(data: np.ndarray) -> None:
    """Drop the pages of a memory-mapped stack from this process's resident set.

    The images were copied out; the pages stay in the page cache, but no longer
    count in the process's RSS, which so stays bounded whatever the stack size
    (``MADV_DONTNEED`` on a read-only shared file mapping loses nothing).
    """
    mm = getattr(data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):  # closed or not madvisable: nothing to release
        pass


class ParticleImages:
    """Random access to the images of a :class:`ParticleTable`.

    Parameters
    ----------
    table : ParticleTable
        Particles whose ``rlnImageName`` entries point at MRC stacks.
    stack_override : Path, optional
        Read every image from this stack instead of the file named in the STAR
        (index kept), e.g. when the STAR names a stack that was renamed.

    Raises
    ------
    StarFileError, MrcFileError
        A stack is missing or unreadable, an index is beyond its stack, or
        images have different box sizes.
    """

    def __init__(self, table: ParticleTable, *, stack_override: Path | None = None) -> None:
        self.table = table
        star_dir = table.path.parent
        names = table.image_names()
        self._index = np.empty(len(names), dtype=np.int64)
        self._stack_id = np.empty(len(names), dtype=np.int64)
        paths: dict[Path, int] = {}
        for i, name in enumerate(names):
            try:
                idx, p = parse_image_name(name, star_dir)
            except StarFileError as exc:
                raise StarFileError(f"{table.path}: particle {i + 1}: {exc}") from None
            if stack_override is not None:
                p = Path(stack_override)
            self._index[i] = idx
            self._stack_id[i] = paths.setdefault(p, len(paths))
        self.stack_paths = list(paths)
        self._stacks = []
        box = None
        for sid, p in enumerate(self.stack_paths):
            if not p.exists():
                first = int(np.argmax(self._stack_id == sid))
                where = ""
                if table.path.suffix.lower() == ".cs":  # cryoSPARC: blob/path, two folders tried
                    where = (f" (cryoSPARC blob/path, looked up from {star_dir} and "
                             f"{star_dir.parent})")
                raise MrcFileError(
                    f"{table.path}: particle {first + 1} rlnImageName {names[first]!r}: "
                    f"stack {p} does not exist{where}"
                )
            mrc = open_stack(p)
            self._stacks.append(mrc)
            data = mrc.data
            n_images = 1 if data.ndim == 2 else data.shape[0]
            shape = data.shape[-2:]
            if shape[0] != shape[1]:
                raise MrcFileError(f"{p}: images are not square ({shape[1]}x{shape[0]})")
            if box is None:
                box = int(shape[0])
            elif box != shape[0]:
                raise MrcFileError(
                    f"{p}: box size {shape[0]} differs from {self.stack_paths[0]} ({box})"
                )
            sel = self._stack_id == sid
            too_far = sel & (self._index >= n_images)
            if too_far.any():
                i = int(np.argmax(too_far))
                raise MrcFileError(
                    f"{table.path}: particle {i + 1} rlnImageName {names[i]!r}: index "
                    f"{self._index[i] + 1} is beyond stack {p}, which holds {n_images} images"
                )
        if box is None:
            raise MrcFileError(f"{table.path}: no particle images")
        self.box_size: int = int(box)

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        """Close every memory-mapped stack."""
        for s in self._stacks:
            s.close()
        self._stacks = []

    def __enter__(self) -> ParticleImages:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scan(self, *, max_bad_fraction: float = 0.01, batch_size: int = 1024) -> np.ndarray:
        """Find unusable particles before any long work.

        A particle is unusable when it has a non-finite pixel (NaN, ±Inf) or no
        contrast at all (constant, e.g. all zeros). They are reported (a warning
        naming stack and image) and left out; a pure-noise particle is kept.

        Parameters
        ----------
        max_bad_fraction : float
            Stop when more than this fraction of the particles is unusable.

        Returns
        -------
        np.ndarray
            `(n,)` bool, True for usable particles.

        Raises
        ------
        MrcFileError
            More than ``max_bad_fraction`` unusable particles (names the first ones).
        """
        import warnings

        n = len(self)
        good = np.ones(n, dtype=bool)
        reasons: list[str] = []
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(n, start + batch_size))
            data = self._gather(rows)
            finite = np.isfinite(data).all(axis=(1, 2))
            with np.errstate(invalid="ignore", over="ignore"):
                spread = np.where(finite, np.ptp(np.where(np.isfinite(data), data, 0), axis=(1, 2)), 0)
            bad = ~finite | (spread <= 0)
            for j in np.nonzero(bad)[0]:
                row = int(rows[j])
                why = "non-finite pixels" if not finite[j] else "constant image"
                reasons.append(f"{self._describe(row)}: {why}")
            good[rows[bad]] = False
        n_bad = int((~good).sum())
        if n_bad:
            listing = "; ".join(reasons[:5]) + (" …" if n_bad > 5 else "")
            if n_bad > max_bad_fraction * n:
                raise MrcFileError(
                    f"{n_bad} of {n} particles are unusable (more than "
                    f"{max_bad_fraction:.1%}): {listing}"
                )
            warnings.warn(f"leaving out {n_bad} of {n} unusable particles: {listing}",
                          stacklevel=2)
        return good

    def _describe(self, row: int) -> str:
        return (f"{self.stack_paths[self._stack_id[row]]} image {self._index[row] + 1} "
                f"(STAR {self.table.path.name} particle {row + 1})")

    def _gather(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.box_size, self.box_size), dtype=np.float32)
        sids = self._stack_id[indices]
        for sid in np.unique(sids):
            rows = np.nonzero(sids == sid)[0]
            data = self._stacks[sid].data
            if data.ndim == 2:
                out[rows] = data
            else:
                idx = self._index[indices[rows]]
                order = np.argsort(idx)
                out[rows[order]] = data[idx[order]]
            _release_pages(data)
        return out

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Read particles by row number.

        Parameters
        ----------
        indices : np.ndarray
            `(b,)` row numbers in the STAR table.

        Returns
        -------
        np.ndarray
            `(b, N, N)` float32 images.

        Raises
        ------
        MrcFileError
            An image has non-finite pixels (names stack, image number and STAR row).
        """
        indices = np.asarray(indices, dtype=np.int64)
        out = self._gather(indices)
        finite = np.isfinite(out).all(axis=(1, 2))
        if not finite.all():
            row = int(indices[int(np.argmax(~finite))])
            raise MrcFileError(f"{self._describe(row)} has non-finite pixels")
        return clip_hot_pixels(out)

    def batches(self, rows: np.ndarray, batch_size: int,
                device: str = "cpu") -> Iterator[tuple[slice, np.ndarray, torch.Tensor]]:
        """Read ``rows`` in consecutive batches as tensors (the one stack reader of the kernels).

        Parameters
        ----------
        rows : np.ndarray
            `(m,)` STAR rows, read in this order.
        batch_size : int
            Images per batch.
        device : str
            Torch device of the yielded images.

        Yields
        ------
        positions : slice
            Positions of the batch within ``rows``.
        batch_rows : np.ndarray
            `(b,)` the STAR rows of the batch.
        images : torch.Tensor
            `(b, N, N)` float32 images (:meth:`read`: checked and hot pixels clipped).

        Raises
        ------
        MrcFileError
            See :meth:`read`.
        """
        import torch

        rows = np.asarray(rows)
        for start in range(0, len(rows), batch_size):
            positions = slice(start, min(len(rows), start + batch_size))
            yield positions, rows[positions], torch.as_tensor(self.read(rows[positions]),
                                                              device=device)


def open_usable_particles(
    table: ParticleTable, *, max_bad_fraction: float = 0.01
) -> tuple[ParticleTable, ParticleImages]:
    """Open a table's images, scan them and leave out unusable particles.

    Returns
    -------
    (ParticleTable, ParticleImages)
        The usable particles (rows renumbered, every column and name kept) and
        their images.

    Raises
    ------
    StarFileError, MrcFileError
        See :class:`ParticleImages` and :meth:`ParticleImages.scan`.
    """
    images = ParticleImages(table)
    good = images.scan(max_bad_fraction=max_bad_fraction)
    if good.all():
        return table, images
    images.close()
    kept = table.subset(good)
    return kept, ParticleImages(kept)
