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
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
