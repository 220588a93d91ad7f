"""swiftalign: fast cryo-EM particle alignment by nearest-neighbour search.

Each particle is assigned a pose (rot, tilt, psi, in-plane shift) against a 3D
reference map by searching compressed low-frequency Fourier-coefficient vectors
of projected, rotated and shifted references stored in a FAISS index
(thesis "swiftalign", Xmipp, 2023).

Where each step lives:

- conventions   RELION Euler angles, origins, Fourier layout (the one place)
- io            MRC maps/stacks, the particle table, RELION STAR and cryoSPARC files
- fourier       disc extraction: images -> search vectors
- projection    reference projections (torch-fourier-slice)
- ctf           CTF and Wiener filter (torch-ctf)
- symmetry      point groups and asymmetric units
- sampling      angular/shift steps (thesis eq. 4.20-4.21), direction grids
- gallery       reference set: projections x in-plane rotations x shifts
- search        FAISS index build/populate/query, exact re-scoring
- configs       parameter sections (search, noise, CTF, local, query, compute)
- queries       particle images -> search vectors, noise spectra
- ctf_groups    defocus groups and CTF re-scoring of candidates
- local_search  local refinement around the global match
- alignment     the align workflow as stages (plan, queries, search, re-score, local)
- refinement    gold-standard refinement: setup, state, one iteration, outputs
- run_folder    a refinement's output folder (state.json, itNNN/, final/)
- simulate      synthetic datasets with ground truth
- evaluate      angular and shift errors against ground truth
- export        cryoSPARC .cs and ChimeraX .bild exports; selection: particle subsets
- api           the Python API re-exported here (align, refine, simulate, read_particles)

Python API (imported on first use, so that ``import swiftalign`` stays fast)::

    import swiftalign
    sim = swiftalign.simulate(swiftalign.demo_map_path(), output_dir="sim", n_particles=200)
    result = swiftalign.align(sim.particles, swiftalign.demo_map_path(), resolution_angstrom=30)
    result.poses                     # pandas DataFrame in RELION columns
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "AlignResult",
    "MapData",
    "ParticleTable",
    "RefineResult",
    "SimulatedDataset",
    "align",
    "demo_map_path",
    "read_map",
    "read_particles",
    "read_refinement",
    "refine",
    "simulate",
]

#: Public names defined in :mod:`swiftalign.api`, imported on first access by ``__getattr__``.
_API_NAMES = frozenset(__all__) - {"__version__"}

if TYPE_CHECKING:
    from swiftalign.api import (
        AlignResult,
        MapData,
        ParticleTable,
        RefineResult,
        SimulatedDataset,
        align,
        demo_map_path,
        read_map,
        read_particles,
        read_refinement,
        refine,
        simulate,
    )


def __getattr__(name: str):
    """The API names of :mod:`swiftalign.api`, imported on first access (PEP 562)."""
    if name in _API_NAMES:
        from swiftalign import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'swiftalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API_NAMES})
