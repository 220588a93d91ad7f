"""Streaming alignment: particle batches aligned as they appear (while the microscope collects).

:class:`FolderWatcher` yields STAR files of a folder once they are complete;
:func:`align_stream` aligns any iterable of STAR files against a persisted
index (:mod:`swiftalign.index_file`), appending every batch to one output STAR
file that is rewritten atomically after each batch.

Rules
-----
- A STAR file is *complete* when it parses, its size and modification time and
  those of every stack it names are unchanged over one scan interval, and every
  stack opens with as many images as its header says (a stack still being
  written is shorter than its header and is refused by the MRC reader).
  Hidden files (``.name``) and the output itself are ignored.
- A batch is never aligned twice, even after a restart: the processed files
  (resolved path, size, modification time, particles written) are recorded in
  ``OUTPUT_batches.json`` next to the output, written after the output STAR.
  On a restart, rows of the output beyond the recorded batches (a batch whose
  record was not written) are dropped and that batch is aligned again.
- A batch that cannot be aligned (bad STAR, wrong pixel size …) is recorded as
  failed with its error and skipped; the stream goes on.
- :class:`FolderWatcher` stops after ``idle_timeout_s`` seconds without a new
  complete file, or when the stop file (default ``DIR/swiftalign.stop``) exists
  (after one more scan: files complete by then are still aligned).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from swiftalign.errors import InputError, SwiftalignError

__all__ = ["FolderWatcher", "BatchSummary", "StreamSummary", "align_stream", "batches_record_path"]

log = logging.getLogger(__name__)

STOP_FILE = "swiftalign.stop"


def _signature(star: Path, angpix: float | None) -> tuple | None:
    """Sizes and times of a STAR file and its stacks, or None when it cannot be read yet."""
    from swiftalign.io.star import parse_image_name, read_particles

    try:
        st = star.stat()
        table = read_particles(star, angpix=angpix)
        stacks = sorted({str(parse_image_name(n, star.parent)[1]) for n in table.image_names()})
        sig = [(str(star), st.st_size, st.st_mtime_ns)]
        for s in stacks:
            ss = os.stat(s)
            sig.append((s, ss.st_size, ss.st_mtime_ns))
        return tuple(sig)
    except (SwiftalignError, ValueError, OSError, KeyError, IndexError):
        return None


def _opens(star: Path, angpix: float | None) -> str | None:
    """None when every image of the STAR file can be opened, else the reason."""
    from swiftalign.io.particles import ParticleImages
    from swiftalign.io.star import read_particles

    try:
        with ParticleImages(read_particles(star, angpix=angpix)):
            return None
    except (SwiftalignError, ValueError, OSError) as exc:
        return str(exc)


class FolderWatcher:
    """Iterate over the STAR files of a folder as they become complete (each once).

    Parameters
    ----------
    folder : str or Path
        Folder to scan (not recursive).
    pattern : str
        Glob of the STAR files (``*.star``).
    interval_s : float
        Seconds between scans; a file must be unchanged over one interval.
    idle_timeout_s : float, optional
        Stop after this many seconds without a new complete file (``None``: never).
    stop_file : str or Path, optional
        Stop when this file exists (default ``folder/swiftalign.stop``).
    exclude : iterable of Path
        Files never to pick up (e.g. the output STAR).
    angpix : float, optional
        Pixel size for STAR files that have none (Å).
    """

    def __init__(self, folder: str | Path, *, pattern: str = "*.star", interval_s: float = 2.0,
                 idle_timeout_s: float | None = None, stop_file: str | Path | None = None,
                 exclude: Iterable[str | Path] = (), angpix: float | None = None) -> None:
        self.folder = Path(folder)
        self.pattern = pattern
        self.interval_s = float(interval_s)
        self.idle_timeout_s = idle_timeout_s
        self.stop_file = Path(stop_file) if stop_file is not None else self.folder / STOP_FILE
        self.exclude = {Path(p).resolve() for p in exclude}
        self.angpix = angpix
        self.skip: Callable[[Path], bool] = lambda p: False
        self._seen: dict[Path, tuple | None] = {}
        self._done: set[Path] = set()
        self._waiting: dict[Path, str] = {}

    def _candidates(self) -> list[Path]:
        out = []
        for p in sorted(self.folder.glob(self.pattern)):
            r = p.resolve()
            if p.name.startswith(".") or r in self.exclude or r in self._done or not p.is_file():
                continue
            if p.name.endswith(tuple(f"_top{k}.star" for k in range(2, 100))):
                continue
            out.append(r)
        return out

    def _scan(self) -> list[Path]:
        """Files complete now (unchanged since the previous scan and openable)."""
        ready = []
        for p in self._candidates():
            if self.skip(p):  # e.g. recorded as processed by an earlier run
                self._done.add(p)
                ready.append(p)
                continue
            sig = _signature(p, self.angpix)
            previous = self._seen.get(p)
            self._seen[p] = sig
            if sig is None or sig != previous:
                continue
            reason = _opens(p, self.angpix)
            if reason is None:
                self._done.add(p)
                self._waiting.pop(p, None)
                ready.append(p)
            elif self._waiting.get(p) != reason:
                self._waiting[p] = reason
                log.info("waiting for %s: %s", p.name, reason)
        return ready

    def __iter__(self) -> Iterator[Path]:
        last_new = time.monotonic()
        while True:
            stopping = self.stop_file.exists()
            for p in self._scan():
                yield p
                last_new = time.monotonic()
            if stopping:  # one more scan: files complete now are still aligned
                log.info("stop file %s found: stopping", self.stop_file)
                time.sleep(self.interval_s)
                yield from self._scan()
                break
            if self.idle_timeout_s is not None and time.monotonic() - last_new > self.idle_timeout_s:
                log.info("no new complete STAR file for %.0f s: stopping", self.idle_timeout_s)
                break
            time.sleep(self.interval_s)
        for p, reason in self._waiting.items():
            log.warning("%s was not aligned (incomplete: %s)", p, reason)


@dataclass
class BatchSummary:
    """One aligned batch and the running totals.

    Attributes
    ----------
    star : str
        The batch's STAR file.
    n_particles : int
        Particles aligned in it (0 when it failed).
    seconds : float
        Time spent on it.
    mean_score : float
        Mean ``rlnSwiftalignScore`` of the batch.
    total_particles, total_batches : int
        Running totals in the output (this run and earlier ones).
    error : str or None
        Why it failed.
    """

    star: str
    n_particles: int
    seconds: float
    mean_score: float
    total_particles: int
    total_batches: int
    error: str | None = None

    def describe(self) -> str:
        """One line for the console."""
        name = Path(self.star).name
        if self.error:
            return f"batch {name} skipped: {self.error}"
        rate = self.n_particles / max(self.seconds, 1e-9)
        return (f"batch {self.total_batches}: {name}, {self.n_particles} particles in "
                f"{self.seconds:.1f} s ({rate:.0f}/s), mean score {self.mean_score:.3f}; "
                f"total {self.total_particles} particles")


@dataclass
class StreamSummary:
    """The stream so far: batches aligned in this run, skipped, and the totals."""

    output: str
    batches: list[BatchSummary] = field(default_factory=list)
    skipped_known: int = 0
    total_particles: int = 0
    total_batches: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        """One line for the console."""
        new = [b for b in self.batches if b.error is None]
        failed = len(self.batches) - len(new)
        n = sum(b.n_particles for b in new)
        text = (f"aligned {n} particles in {len(new)} new batches in {self.seconds:.1f} s; "
                f"{self.total_particles} particles from {self.total_batches} batches in "
                f"{self.output}")
        if self.skipped_known:
            text += f" ({self.skipped_known} batches done before, not re-aligned)"
        if failed:
            text += f"; {failed} failed (see {Path(self.output).stem}_batches.json)"
        return text


def batches_record_path(output: str | Path) -> Path:
    """``OUTPUT_batches.json``: the record of processed batches next to the output."""
    output = Path(output)
    return output.with_name(output.stem + "_batches.json")


def _load_state(output: Path, record_path: Path, index_created: str) -> tuple[dict, list]:
    """The batch record and the output blocks already written (restart)."""
    import starfile

    if not record_path.exists():
        if output.exists():
            raise InputError(f"{output} exists but has no batch record {record_path.name}: give "
                             "another -o (a watch appends to its own output)")
        return {"output": str(output), "index_created": index_created, "batches": []}, []
    try:
        record = json.loads(record_path.read_text())
        batches = record["batches"]
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"{record_path}: unreadable batch record ({exc})") from None
    if record.get("index_created") != index_created:
        raise InputError(f"{output} was aligned against another index (record "
                         f"{record_path.name}); give another -o")
    n_done = sum(b.get("n_written", 0) for b in batches)
    if n_done == 0:
        return record, []
    if not output.exists():
        raise InputError(f"{record_path} records {n_done} aligned particles but {output} is "
                         "missing; remove the record to start again")
    blocks = starfile.read(output, always_dict=True)
    particles = blocks["particles"]
    if len(particles) < n_done:
        raise InputError(f"{output} holds {len(particles)} particles, fewer than the "
                         f"{n_done} recorded in {record_path.name}")
    if len(particles) > n_done:
        log.warning("%s: dropping %d rows of a batch whose record was not written (it is "
                    "aligned again)", output, len(particles) - n_done)
    return record, [(blocks["optics"], particles.iloc[:n_done].reset_index(drop=True))]


def align_stream(
    star_files: Iterable[str | Path],
    index,
    config,
    output: str | Path,
    *,
    angpix: float | None = None,
    max_bad_fraction: float = 0.01,
    on_batch: Callable[[BatchSummary], None] | None = None,
) -> StreamSummary:
    """Align STAR files one after another against a persisted index, appending to one output.

    Parameters
    ----------
    star_files : iterable of str or Path
        Batches in order (a list, a generator, or a :class:`FolderWatcher`, whose
        ``skip`` is set so that recorded batches are not waited for).
    index : str, Path or swiftalign.alignment.ReferenceSet
        Index file (read once) or a reference set with a populated index.
    config : swiftalign.alignment.AlignConfig
        Run parameters (reference-defining fields equal to the index's).
    output : str or Path
        Output STAR file, rewritten atomically after each batch; the record of
        processed batches is ``OUTPUT_batches.json`` (:func:`batches_record_path`).
    angpix : float, optional
        Pixel size for STAR files that have none (Å).
    max_bad_fraction : float
        See :func:`swiftalign.io.particles.open_usable_particles`.
    on_batch : callable, optional
        Called with a :class:`BatchSummary` after each batch (running summary).

    Returns
    -------
    StreamSummary

    Raises
    ------
    InputError
        Unreadable index; an output that exists without a record, a record
        from another index or one that does not match the output.
    """
    from swiftalign.alignment import align_particles, resolve_device
    from swiftalign.index_file import load_reference_index
    from swiftalign.io.json_file import write_json
    from swiftalign.io.particles import open_usable_particles
    from swiftalign.io.star import (
        merge_particle_blocks,
        particle_blocks,
        read_particles,
        write_star_blocks,
    )

    t_start = time.perf_counter()
    output = Path(output)
    refset = index if not isinstance(index, str | Path) else load_reference_index(
        index, device=resolve_device(config.device))
    created = str(getattr(refset, "source", ""))
    if isinstance(index, str | Path):
        from swiftalign.index_file import read_manifest

        created = read_manifest(index).get("created", created)
    record_path = batches_record_path(output)
    record, parts = _load_state(output, record_path, created)
    known = {b["star"]: b for b in record["batches"]}
    if isinstance(star_files, FolderWatcher):
        star_files.skip = lambda p: str(p) in known
        star_files.exclude |= {output.resolve(), record_path.resolve()}
    summary = StreamSummary(output=str(output))
    summary.total_batches = sum(1 for b in record["batches"] if b.get("n_written"))
    summary.total_particles = sum(b.get("n_written", 0) for b in record["batches"])
    for star in star_files:
        star = Path(star).resolve()
        if str(star) in known:
            st = star.stat() if star.exists() else None
            b = known[str(star)]
            if st is not None and (st.st_size, st.st_mtime_ns) != (b["size"], b["mtime_ns"]):
                log.warning("%s changed after it was aligned; not aligned again (copy it to a "
                            "new name to align it)", star)
            summary.skipped_known += 1
            continue
        t0 = time.perf_counter()
        entry = {"star": str(star), "size": None, "mtime_ns": None}
        try:
            st = star.stat()
            entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
            table = read_particles(star, angpix=angpix)
            table, images = open_usable_particles(table, max_bad_fraction=max_bad_fraction)
            try:
                result = align_particles(table, images, refset, config)
            finally:
                images.close()
            blocks = particle_blocks(output, table, box_size=result.box_size,
                                     updates=result.star_columns())
            parts_new = [*parts, (blocks["optics"], blocks["particles"])]
            optics, particles = merge_particle_blocks(parts_new)
            write_star_blocks(output, {"optics": optics, "particles": particles})
            parts = [(optics, particles)]
            score = float(np.mean(result.score[:, 0]))
            entry.update(n_written=len(table), mean_score=score, error=None)
            summary.total_particles += len(table)
            summary.total_batches += 1
        except (SwiftalignError, ValueError, OSError, pd.errors.ParserError) as exc:
            log.error("%s: not aligned: %s", star, exc)
            entry.update(n_written=0, mean_score=None, error=str(exc))
            score = float("nan")
        entry["seconds"] = time.perf_counter() - t0
        record["batches"].append(entry)
        known[str(star)] = entry
        write_json(record_path, {**record, "total_particles": summary.total_particles})
        batch = BatchSummary(str(star), entry["n_written"], entry["seconds"], score,
                             summary.total_particles, summary.total_batches, entry["error"])
        summary.batches.append(batch)
        log.info(batch.describe())
        if on_batch is not None:
            on_batch(batch)
    summary.seconds = time.perf_counter() - t_start
    return summary
