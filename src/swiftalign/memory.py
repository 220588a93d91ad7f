"""Memory and disk budgets of a job, computed and checked before any long work.

``align`` holds, whatever the number of particles, the rotated gallery, the map's
oversampled spectrum (local stage), a batch of images being transformed, one chunk of
particles (global and local search vectors, candidates) and the exact-search
workspace; the particles go through query → search → CTF re-scoring → local stage
chunk by chunk, so that the sum stays within ``--max-memory``
(:func:`plan_align_memory`). ``refine`` adds the galleries of the other repetitions
during the alignment and, during the reconstruction, the two half-set grids of
:class:`swiftalign.reconstruction.HalfMapAccumulator` and their symmetrised copy
(:func:`reconstruction_bytes`); its outputs must fit on the disk
(:func:`refine_disk_bytes`, :func:`check_free_disk`). Not counted: the interpreter and
its libraries (torch, FAISS, numpy), about 0.5–0.7 GB resident (README "Memory").
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swiftalign.errors import InputError

__all__ = ["AlignMemory", "MIN_CHUNK_PARTICLES", "check_device_memory", "check_free_disk",
           "check_refine_resources",
           "image_batch_bytes", "per_particle_bytes", "plan_align_memory", "reconstruction_bytes",
           "refine_disk_bytes", "volume_spectrum_bytes"]

#: The smallest chunk of particles a job must be able to hold besides its references.
MIN_CHUNK_PARTICLES = 64
#: The smallest exact-search workspace (bytes) worth running with.
MIN_SEARCH_BYTES = 32 * 1024**2
#: Images read and transformed at once by the stack readers of the kernels.
IMAGE_BATCH = 512

GB = 1024**3


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / GB:.2f} GB"


def volume_spectrum_bytes(box_size: int) -> int:
    """Bytes of a map's oversampled spectrum (:class:`swiftalign.projection.VolumeSpectrum`).

    The `(2N, 2N, N + 1)` complex64 transform, its cached real/imaginary layout and the
    padded map it comes from (transient).
    """
    n = int(box_size)
    return 3 * 32 * n**3


def image_batch_bytes(box_size: int) -> int:
    """Bytes of one batch of :data:`IMAGE_BATCH` images and their transforms (float32)."""
    n = int(box_size)
    return IMAGE_BATCH * n * n * 4 * 4


def reconstruction_bytes(box_size: int) -> int:
    """Bytes of a class's reconstruction (:class:`~swiftalign.reconstruction.HalfMapAccumulator`).

    Two `(3, 2N, 2N, N + 1)` float32 grids, their symmetrised copy and a few `(N, N, N)`
    float64 maps (half, full, filtered, mask).
    """
    n = int(box_size)
    grid = 3 * (2 * n) * (2 * n) * (n + 1) * 4
    return 3 * grid + 8 * n**3 * 8


def refine_disk_bytes(box_size: int, n_particles: int, n_classes: int, iterations: int) -> int:
    """Bytes a refinement writes (estimate).

    Per iteration and class four `(N, N, N)` float32 maps (half1, half2, map,
    map_unfiltered) and the particle STAR files (~1 kB a particle); twice more for
    ``final/`` and the postprocessed maps.
    """
    maps = 4 * int(box_size) ** 3 * 4 * n_classes
    per_iteration = maps + 1024 * int(n_particles) + 2 * 1024**2  # plots, fsc.star, logs
    return (int(iterations) + 2) * per_iteration


def check_free_disk(folder: Path, needed_bytes: int, what: str) -> None:
    """Refuse when ``folder``'s file system has less free space than ``needed_bytes``.

    A folder that does not exist yet is measured at its nearest existing parent.

    Raises
    ------
    InputError
        Naming the folder, the bytes needed and the bytes free.
    """
    probe = Path(folder).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed_bytes > free:
        raise InputError(f"{folder}: {what} needs about {_gb(needed_bytes)} of disk, but only "
                         f"{_gb(free)} is free on {probe}")


@dataclass(frozen=True)
class AlignMemory:
    """How an alignment divides ``--max-memory`` (bytes).

    Attributes
    ----------
    budget_bytes : int
        ``--max-memory``.
    resident_bytes : int
        Held whatever the particle count: galleries, map spectrum, image batch, and
        whatever the caller holds besides (``extra_resident_bytes``).
    per_particle_bytes : int
        Held per particle of a chunk.
    chunk_particles : int
        Particles aligned at once.
    search_bytes : int
        Workspace of the exact search (what remains).
    """

    budget_bytes: int
    resident_bytes: int
    per_particle_bytes: int
    chunk_particles: int
    search_bytes: int

    @property
    def peak_bytes(self) -> int:
        """The most the alignment holds: resident + one chunk + search workspace."""
        return self.resident_bytes + self.chunk_particles * self.per_particle_bytes \
            + self.search_bytes


def plan_align_memory(*, budget_bytes: int, gallery_bytes: float, box_size: int,
                      per_particle_bytes: int, n_particles: int, extra_resident_bytes: int = 0,
                      chunk_particles: int | None = None, what: str = "align") -> AlignMemory:
    """Chunk size and search workspace of an alignment within ``budget_bytes``.

    The resident part (gallery, :func:`volume_spectrum_bytes`, :func:`image_batch_bytes`,
    ``extra_resident_bytes``) is taken first; of the rest, at most half goes to one chunk
    of particles and the remainder to the exact-search workspace.

    Parameters
    ----------
    budget_bytes : int
        ``--max-memory`` (bytes).
    gallery_bytes : float
        Bytes of the rotated gallery (estimated before it is built).
    box_size : int
        ``N`` (px).
    per_particle_bytes : int
        Bytes held per particle of a chunk.
    n_particles : int
        Particles to align.
    extra_resident_bytes : int
        Held by the caller besides (e.g. the other repetitions' galleries of ``refine``).
    chunk_particles : int, optional
        Force this chunk size (tests); default from the budget.
    what : str
        Job named in the error.

    Returns
    -------
    AlignMemory

    Raises
    ------
    InputError
        When the resident part, :data:`MIN_CHUNK_PARTICLES` particles and
        :data:`MIN_SEARCH_BYTES` do not fit, naming every size.
    """
    resident = int(gallery_bytes) + volume_spectrum_bytes(box_size) + image_batch_bytes(
        box_size) + int(extra_resident_bytes)
    available = int(budget_bytes) - resident
    smallest = min(MIN_CHUNK_PARTICLES, max(n_particles, 1)) * per_particle_bytes
    if available < smallest + MIN_SEARCH_BYTES:
        parts = [f"gallery {_gb(gallery_bytes)}",
                 f"map spectrum {_gb(volume_spectrum_bytes(box_size))}",
                 f"image batch {_gb(image_batch_bytes(box_size))}"]
        if extra_resident_bytes:
            parts.append(f"other galleries {_gb(extra_resident_bytes)}")
        raise InputError(
            f"{what} needs {_gb(resident)} ({', '.join(parts)}) plus at least "
            f"{_gb(smallest + MIN_SEARCH_BYTES)} for a chunk of particles and the search, more "
            f"than --max-memory {budget_bytes / GB:g} GB: raise --max-memory, or use a coarser "
            "--resolution or a larger --angular-step")
    chunk = max(1, (available // 2) // max(per_particle_bytes, 1))
    if chunk_particles is not None:
        chunk = chunk_particles
    chunk = int(min(max(n_particles, 1), chunk))
    search = max(MIN_SEARCH_BYTES, available - chunk * per_particle_bytes)
    return AlignMemory(int(budget_bytes), resident, int(per_particle_bytes), chunk, int(search))


def per_particle_bytes(*, dim: int, local_dim: int, n_vectors: int, n_candidates: int, k: int,
                       local_weight_coeffs: int = 0) -> int:
    """Bytes held per particle of an alignment chunk.

    Parameters
    ----------
    dim : int
        Length of a global search vector (float32).
    local_dim : int
        Length of a local-search vector (0: no local stage).
    n_vectors : int
        Global vectors per particle (2 with Wiener correction: corrected and raw).
    n_candidates : int
        Candidates kept from the global search (ids int64, distances float32, copies)
        and, with a CTF (``n_vectors`` 2), regenerated as vectors for the re-scoring.
    k : int
        Matches returned (poses, shifts, distances, scores in float64).
    local_weight_coeffs : int
        Per-particle local weights (several optics groups), float32.

    Returns
    -------
    int
    """
    rescore = 8 * dim * n_candidates if n_vectors > 1 else 0  # candidate vectors, products
    return (4 * dim * n_vectors + 4 * local_dim + 4 * local_weight_coeffs
            + 36 * n_candidates + 48 * k + rescore)


def check_refine_resources(setup, out_dir: Path, *, iterations: int) -> AlignMemory:
    """Refuse a refinement that cannot fit ``--max-memory`` or the disk, before any work.

    The alignment at the finest global resolution the run can reach
    (``max(--max-resolution, Nyquist, --global-resolution)``) holds one gallery per
    repetition; the reconstruction holds :func:`reconstruction_bytes` and the
    references; the outputs take :func:`refine_disk_bytes`.

    Parameters
    ----------
    setup : swiftalign.refinement.RefineSetup
        The run's fixed inputs.
    out_dir : Path
        Output folder.
    iterations : int
        Iterations still to run.

    Returns
    -------
    AlignMemory
        The alignment's budget at that resolution (chunk, search workspace).

    Raises
    ------
    InputError
        Naming the sizes that do not fit.
    """
    from swiftalign.alignment import AlignConfig, gallery_bytes_estimate, plan_reference_set
    from swiftalign.fourier import make_disc

    config, box, ps = setup.config, setup.box_size, setup.pixel_size_angstrom
    budget = int(config.max_memory_gb * GB)
    t_align = max(config.max_resolution_angstrom or 0.0, setup.nyquist_angstrom)  # finest reached
    t_global = max(t_align, config.global_resolution_angstrom)
    acfg = AlignConfig(resolution_angstrom=t_global, symmetry=setup.symmetry,
                       max_shift_px=config.max_shift_px, ctf_mode=config.ctf_mode,
                       weighting=config.weighting, index=config.index, metric=config.metric,
                       max_memory_gb=config.max_memory_gb)
    sampling, disc = plan_reference_set(acfg, ps, box)
    gallery = gallery_bytes_estimate(sampling, disc, setup.symmetry)
    local = make_disc(box, min(ps / t_align, 0.5))
    n_half = int(max((setup.halves == h).sum() for h in (1, 2)))
    n_groups = len(np.unique(setup.table.optics_group))
    per = per_particle_bytes(dim=disc.dim, local_dim=local.dim,
                             n_vectors=1 if setup.ctf is None else 2,
                             n_candidates=acfg.ctf_candidates, k=1,
                             local_weight_coeffs=local.n_coeff if n_groups > 1 else 0)
    memory = plan_align_memory(budget_bytes=budget, gallery_bytes=gallery, box_size=box,
                               per_particle_bytes=per, n_particles=n_half,
                               extra_resident_bytes=int((config.repetitions - 1) * gallery),
                               what=f"refine at {t_global:g} Å ({config.repetitions} repetitions)")
    references = 2 * setup.n_classes * box**3 * 8
    recon = reconstruction_bytes(box) + references + image_batch_bytes(box)
    if recon > budget:
        raise InputError(
            f"refine: the reconstruction of a {box}-px box needs {_gb(recon)} (two "
            f"(3, {2 * box}, {2 * box}, {box + 1}) float32 grids and their symmetrised copy "
            f"{_gb(reconstruction_bytes(box))}, references {_gb(references)}), more than "
            f"--max-memory {config.max_memory_gb:g} GB: raise --max-memory")
    from swiftalign.alignment import resolve_device

    check_device_memory(resolve_device(config.device), reconstruction_bytes(box),
                        f"refine: the reconstruction of a {box}-px box")
    check_free_disk(out_dir, refine_disk_bytes(box, len(setup.table), setup.n_classes,
                                               iterations), f"refine ({iterations} iterations)")
    return memory


def check_device_memory(device: str, needed_bytes: int, what: str) -> None:
    """Refuse work whose smallest footprint exceeds the free memory of a CUDA device.

    Nothing to check on the CPU (``--max-memory`` bounds it).

    Raises
    ------
    InputError
        Naming the device, the bytes needed and the bytes free.
    """
    if not str(device).startswith("cuda"):
        return
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    if needed_bytes > free:
        raise InputError(f"{what} needs at least {_gb(needed_bytes)} on {device}, which has "
                         f"{_gb(free)} free of {_gb(total)}: use a smaller box or "
                         "--device cpu")
