"""Configuration sections shared by ``align``, ``index build`` and ``refine``.

Each section groups parameters by what they decide:

- :class:`SearchConfig`: what defines a reference set (gallery and index) and is
  stored in an index file; a prebuilt index fits a run when the sections are equal;
- :class:`NoiseConfig`: how the noise spectrum is measured (also stored in an index);
- :class:`CtfConfig`: how the CTF enters the search and the re-scoring;
- :class:`LocalConfig`: the local refinement after the global search;
- :class:`QueryConfig`: how an index is queried (per run);
- :class:`ComputeConfig`: where and within what memory it runs (never changes a result).

:class:`swiftalign.alignment.AlignConfig` and
:class:`swiftalign.refinement.RefineConfig` are built from these sections
(pydantic models inherit the fields), so their flat field names stay; a
section of a config is :func:`section`.
"""

from __future__ import annotations

import math
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from swiftalign.sampling import DEFAULT_MAX_SHIFT_PX

__all__ = ["ComputeConfig", "CtfConfig", "LocalConfig", "NoiseConfig", "QueryConfig",
           "SearchConfig", "differing_fields", "section"]

S = TypeVar("S", bound=BaseModel)


class SearchConfig(BaseModel):
    """What defines a reference set (gallery and index); stored in ``.swidx`` files."""

    model_config = ConfigDict(extra="forbid")

    resolution_angstrom: float = Field(gt=0, description="resolution limit Tmax (Å)")
    symmetry: str = "C1"
    angular_step_deg: float | None = Field(default=None, gt=0)
    psi_step_deg: float | None = Field(default=None, gt=0)
    shift_step_px: float | None = Field(default=None, gt=0)
    max_shift_px: float = Field(default=DEFAULT_MAX_SHIFT_PX, ge=0)
    perturbation_deg: float | None = Field(default=None, ge=0)
    ctf_mode: Literal["auto", "wiener", "reference", "none"] = "auto"
    weighting: Literal["none", "noise", "ssnr"] = "noise"
    transform: Literal["dft", "dct"] = "dft"
    index: str = "auto"
    target_recall: float = Field(default=0.95, gt=0, le=1)
    metric: Literal["l2", "cosine", "pearson"] = "cosine"
    seed: int = 0


class NoiseConfig(BaseModel):
    """How the noise spectrum of the weighting is measured (stored with an index)."""

    model_config = ConfigDict(extra="forbid")

    particle_diameter_angstrom: float | None = Field(
        default=None, gt=0, description="noise-estimation mask diameter (Å); default 0.8·box")


class CtfConfig(BaseModel):
    """How the CTF enters the search (Wiener constant, CTF groups) and the re-scoring."""

    model_config = ConfigDict(extra="forbid")

    wiener_constant: float = Field(default=0.1, gt=0)
    ctf_candidates: int = Field(
        default=20, ge=1, description="global candidates re-scored with each particle's CTF")
    ctf_group_phase_rad: float = Field(default=math.pi / 4, gt=0)


class LocalConfig(BaseModel):
    """The local refinement around each particle's global match."""

    model_config = ConfigDict(extra="forbid")

    local_rounds: int = Field(default=2, ge=0, description="local refinement rounds (0: off)")
    local_resolution_factor: float = Field(
        default=0.5, gt=0, le=1,
        description="the local refinement compares up to resolution × this factor (Nyquist-capped)")


class QueryConfig(BaseModel):
    """How an index is queried: per run, never stored with the index."""

    model_config = ConfigDict(extra="forbid")

    nprobe: int | None = Field(default=None, gt=0)
    rerank: int = Field(default=100, gt=0)
    k: int = Field(default=1, ge=1)


class ComputeConfig(BaseModel):
    """Where and within what memory a run computes; never changes its result."""

    model_config = ConfigDict(extra="forbid")

    device: str = "cpu"
    gpu_float16: bool = False
    max_memory_gb: float = Field(default=2.0, gt=0)


def section(config: BaseModel, kind: type[S]) -> S:
    """The ``kind`` section of a config built from sections (its fields' values)."""
    return kind(**{name: getattr(config, name) for name in kind.model_fields})


def differing_fields(a: BaseModel, b: BaseModel, kind: type[BaseModel]) -> list[str]:
    """Names of the fields of section ``kind`` whose values differ between ``a`` and ``b``."""
    return [name for name in kind.model_fields if getattr(a, name) != getattr(b, name)]
