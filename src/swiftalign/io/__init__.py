"""Input and output: MRC maps and stacks, RELION STAR and cryoSPARC .cs particle tables."""

from swiftalign.io.cryosparc import read_cryosparc
from swiftalign.io.mrc import MapData, open_stack, read_map, write_map, write_stack
from swiftalign.io.particles import ParticleImages
from swiftalign.io.star import ParticleTable, read_particles, write_particles

__all__ = [
    "MapData",
    "ParticleImages",
    "ParticleTable",
    "open_stack",
    "read_cryosparc",
    "read_map",
    "read_particles",
    "write_map",
    "write_particles",
    "write_stack",
]
