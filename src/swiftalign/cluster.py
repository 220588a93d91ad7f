"""Query a persisted index over a Dask cluster (``dask.distributed``, extra ``[cluster]``).

The particles are partitioned into chunks of consecutive rows; each chunk is
aligned on a worker against the index file, which each worker process reads
once and keeps (:func:`swiftalign.index_file.load_reference_index_cached`).
Results are gathered in input order. Every step of the alignment treats each
particle on its own (the index query, the exact re-scoring, the CTF re-scoring,
the local search), so the poses are those of the single-process run.

The image stacks and the index file must be readable at the same paths on every
worker (a shared filesystem); paths are made absolute before they are sent.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from swiftalign.alignment import AlignConfig, AlignmentResult
from swiftalign.io.star import ParticleTable

__all__ = ["align_on_cluster", "align_chunk"]

log = logging.getLogger(__name__)


def align_chunk(index_path: str, table: ParticleTable, config: dict) -> AlignmentResult:
    """Align one chunk of particles against an index file (runs on a worker).

    Parameters
    ----------
    index_path : str
        Absolute path of the index file (read once per worker process).
    table : ParticleTable
        The chunk's particles (absolute ``path``; images relative to it).
    config : dict
        ``AlignConfig.model_dump()``.

    Returns
    -------
    AlignmentResult
    """
    from swiftalign.alignment import align_particles, resolve_device
    from swiftalign.index_file import load_reference_index_cached
    from swiftalign.io.particles import ParticleImages

    cfg = AlignConfig(**config)
    refset = load_reference_index_cached(index_path, device=resolve_device(cfg.device))
    with ParticleImages(table) as images:
        return align_particles(table, images, refset, cfg)


def align_on_cluster(
    table: ParticleTable,
    index_path: str | Path,
    config: AlignConfig,
    *,
    scheduler: str | None = None,
    n_workers: int = 2,
    chunk_size: int = 1000,
    progress: Callable[[str, int, int], None] | None = None,
) -> AlignmentResult:
    """Align particles on a Dask cluster, chunk by chunk, against a persisted index.

    Parameters
    ----------
    table : ParticleTable
        Particles (already scanned for unusable images).
    index_path : str or Path
        Index file (``swiftalign index build``), readable by every worker.
    config : AlignConfig
        Run parameters (its reference-defining fields must match the index's).
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``, e.g. a
        ``dask_jobqueue.SLURMCluster``'s ``scheduler_address``). ``None``: a
        ``LocalCluster`` of ``n_workers`` processes with one thread each,
        closed at the end.
    n_workers : int
        Worker processes of the local cluster.
    chunk_size : int
        Particles per task.
    progress : callable, optional
        ``progress("chunks", done, total)``.

    Returns
    -------
    AlignmentResult
        In the order of ``table``.

    Raises
    ------
    ValueError
        ``chunk_size`` or ``n_workers`` below 1.
    ImportError
        Without ``dask.distributed`` (install ``swiftalign[cluster]``).
    """
    if chunk_size < 1 or n_workers < 1:
        raise ValueError(f"--chunk-size {chunk_size} and --workers {n_workers} must be >= 1")
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ImportError("--scheduler/--workers need dask.distributed: pip install "
                          "'swiftalign[cluster]'") from None
    index_path = str(Path(index_path).resolve())
    table = dataclasses.replace(table, path=Path(table.path).resolve())
    n = len(table)
    starts = list(range(0, n, chunk_size))
    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        log.info("aligning %d particles in %d chunks on %s", n, len(starts),
                 scheduler or f"a local cluster of {n_workers} workers")
        token = uuid.uuid4().hex[:8]
        cfg = config.model_dump()
        futures = [
            client.submit(align_chunk, index_path,
                          table.subset(np.arange(s, min(n, s + chunk_size))), cfg,
                          key=f"swiftalign-chunk-{token}-{i}", pure=False)
            for i, s in enumerate(starts)
        ]
        done = 0
        for _ in as_completed(futures):
            done += 1
            if progress is not None:
                progress("chunks", done, len(futures))
        parts = client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return AlignmentResult.concatenate(parts)
