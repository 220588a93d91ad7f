"""RELION STAR particle tables (through ``starfile``).

Reads RELION 3.0 single-table files and 3.1+ files with a ``data_optics`` block
(any block order, several optics groups) into a :class:`ParticleTable` whose
per-particle optics (pixel size, voltage, Cs, amplitude contrast, box size) are
resolved once here. Writes RELION 3.1+ files that keep every input column.

Rules
-----
- Pixel size: optics ``rlnImagePixelSize`` (3.1+); else per-particle
  ``rlnDetectorPixelSize`` (µm) · 1e4 / ``rlnMagnification`` (3.0); else
  ``angpix`` given by the user; else an error asking for ``--angpix``.
  A user ``angpix`` overrides the file only where the file has none.
- Per-particle optics columns in a 3.1 file that contradict their optics group:
  the optics group wins, with a warning.
- Shifts: ``rlnOriginXAngst/YAngst`` (Å) win over ``rlnOriginX/Y`` (px) when
  both are present and disagree (warning).
"""

from __future__ import annotations

import functools
import io as _io
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from swiftalign.errors import StarFileError
from swiftalign.io.atomic import atomic_write
from swiftalign.io.checks import require_regular_file
from swiftalign.io.table import ParticleTable

__all__ = [
    "ParticleTable",
    "read_particles",
    "write_particles",
    "particle_blocks",
    "merge_particle_blocks",
    "write_star_blocks",
    "parse_image_name",
]

_OPTICS_FIELDS = {
    "rlnVoltage": "voltage_kv",
    "rlnSphericalAberration": "cs_mm",
    "rlnAmplitudeContrast": "amplitude_contrast",
}


#: RELION labels whose values must be numbers (checked with file line numbers on reading).
NUMERIC_LABELS = frozenset({
    "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnVoltage",
    "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnMagnification",
    "rlnDetectorPixelSize", "rlnOriginX", "rlnOriginY", "rlnOriginXAngst", "rlnOriginYAngst",
    "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnRandomSubset", "rlnClassNumber",
    "rlnOpticsGroup", "rlnImageSize", "rlnImageDimensionality", "rlnCtfBfactor",
    "rlnCtfScalefactor", "rlnCoordinateX", "rlnCoordinateY", "rlnCtfMaxResolution",
    "rlnCtfFigureOfMerit",
})

_TOKEN = re.compile(r"'[^']*'|\"[^\"]*\"|\S+")


@dataclass
class _LoopRows:
    """Where a loop's rows are in the file: labels and the line number of every row."""

    labels: list[str]
    lines: list[int]


def _scan_loops(path: Path, text: str) -> dict[str, _LoopRows]:
    """Check every loop row's number of values; record row line numbers per block.

    Raises
    ------
    StarFileError
        ``FILE line N: …`` for a row with more or fewer values than the loop has labels.
    """
    loops: dict[str, _LoopRows] = {}
    block, state, current = None, "", None
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            if state == "rows" and not s:
                state = ""
            continue
        if s.startswith("data_"):
            block, state = s[5:], ""
            continue
        if s.startswith("loop_"):
            if (block or "") in loops:
                raise StarFileError(
                    f"{path} line {lineno}: a second loop in block 'data_{block}' (one loop per "
                    "block is supported)"
                )
            current = _LoopRows([], [])
            loops[block or ""] = current
            state = "labels"
            continue
        if s.startswith("_"):
            if state in ("labels",) and current is not None:
                label = s.split()[0].lstrip("_")
                if label in current.labels:
                    raise StarFileError(f"{path} line {lineno}: block 'data_{block}' has the "
                                        f"label '_{label}' twice")
                current.labels.append(label)
            else:
                state = ""
            continue
        if state in ("labels", "rows") and current is not None and current.labels:
            state = "rows"
            n_values = len(_TOKEN.findall(s))
            if n_values != len(current.labels):
                missing = (f"; no value for '{current.labels[n_values]}'"
                           if n_values < len(current.labels) else "")
                raise StarFileError(
                    f"{path} line {lineno}: {n_values} values but block 'data_{block}' has "
                    f"{len(current.labels)} columns{missing} ({s[:60]!r})"
                )
            current.lines.append(lineno)
    return loops


def _check_numeric(path: Path, name: str, block: pd.DataFrame, rows: _LoopRows | None) -> None:
    """Raise ``FILE line N: column C value V is not a number`` for a known numeric label."""
    for col in block.columns:
        if col not in NUMERIC_LABELS or block[col].dtype.kind in "fiub":
            continue
        as_num = pd.to_numeric(block[col], errors="coerce")
        bad = as_num.isna().to_numpy() & block[col].notna().to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            where = (f"line {rows.lines[i]}" if rows is not None and i < len(rows.lines)
                     else f"row {i + 1} of block 'data_{name}'")
            raise StarFileError(
                f"{path} {where}: column '{col}' has value {block[col].iloc[i]!r}, which is not "
                "a number"
            )
        block[col] = as_num


def _read_blocks(path: Path) -> dict[str, pd.DataFrame]:
    require_regular_file(path, "STAR file", error=StarFileError)
    raw = path.read_bytes()
    if b"\r" in raw:  # Windows / old-Mac line endings: parse as the LF original
        text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
        source: str | _io.StringIO | Path = text
    else:
        text = raw.decode("utf-8", errors="replace")
        source = path
    first_data = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("data_"):
            first_data = lineno
        else:
            raise StarFileError(
                f"{path}: not a STAR file (line {lineno}: {s[:60]!r} before any 'data_' block)"
            )
        break
    if first_data is None:
        raise StarFileError(f"{path}: not a STAR file (no 'data_' block)")
    loops = _scan_loops(path, text)  # labels and row lengths, before the parser sees them
    try:
        if isinstance(source, str):
            with tempfile.TemporaryDirectory() as tmpdir:
                tmp = Path(tmpdir) / path.name
                tmp.write_text(source)
                blocks = starfile.read(tmp, always_dict=True)
        else:
            blocks = starfile.read(source, always_dict=True)
    except Exception as exc:
        msg = " ".join(str(exc).split())
        raise StarFileError(f"{path}: cannot parse STAR file ({msg})") from exc
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            _check_numeric(path, name, block, loops.get(name))
    return blocks


def _find_particle_block(path: Path, blocks: dict) -> str:
    candidates = [
        name
        for name, b in blocks.items()
        if isinstance(b, pd.DataFrame) and "rlnImageName" in b.columns
    ]
    if not candidates:
        names = ", ".join(f"data_{n}" for n in blocks) or "none"
        where = "block 'data_particles' has" if "particles" in blocks else "no block has"
        raise StarFileError(f"{path}: {where} no label 'rlnImageName' (blocks: {names})")
    if "particles" in candidates:
        return "particles"
    return candidates[0]


def _optics_from_groups(path: Path, pname: str, particles: pd.DataFrame,
                        optics: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per-particle optics `(n,)` from the optics block (3.1+); the optics group wins."""
    n = len(particles)
    resolved: dict[str, np.ndarray] = {}
    groups = optics["rlnOpticsGroup"].astype(int).to_numpy()
    if "rlnOpticsGroup" in particles:
        pg = particles["rlnOpticsGroup"].astype(int).to_numpy()
    elif len(optics) == 1:
        pg = np.full(n, groups[0])
    else:
        raise StarFileError(
            f"{path}: {len(optics)} optics groups but block 'data_{pname}' has no label "
            "'rlnOpticsGroup'"
        )
    lookup = {g: i for i, g in enumerate(groups)}
    missing = sorted(set(pg.tolist()) - set(lookup))
    if missing:
        raise StarFileError(
            f"{path}: block 'data_{pname}' label 'rlnOpticsGroup' value {missing[0]} has no "
            "row in block 'data_optics'"
        )
    rows = np.array([lookup[g] for g in pg])
    for col, key in list(_OPTICS_FIELDS.items()) + [("rlnImagePixelSize", "pixel_size")]:
        if col in optics:
            vals = optics[col].to_numpy(np.float64)[rows]
            if col in particles:
                per = particles[col].to_numpy(np.float64)
                bad = ~np.isclose(per, vals, rtol=1e-4)
                if bad.any():
                    i = int(np.argmax(bad))
                    warnings.warn(
                        f"{path}: particle {i + 1} has {col}={per[i]} but its optics group "
                        f"{pg[i]} says {vals[i]}; the optics group wins",
                        stacklevel=3,
                    )
            resolved[key] = vals
    if "pixel_size" not in resolved and "rlnDetectorPixelSize" in optics and (
        "rlnMagnification" in optics
    ):
        resolved["pixel_size"] = (
            optics["rlnDetectorPixelSize"].to_numpy(np.float64)
            * 1e4
            / optics["rlnMagnification"].to_numpy(np.float64)
        )[rows]
    return resolved


def _optics_from_particles(path: Path, pname: str, particles: pd.DataFrame,
                           has_optics: bool, resolved: dict[str, np.ndarray],
                           angpix: float | None) -> None:
    """Complete ``resolved`` from particle columns, ``angpix`` and defaults; check it is finite."""
    n = len(particles)
    for col, key in _OPTICS_FIELDS.items():
        if key not in resolved and col in particles:
            resolved[key] = particles[col].to_numpy(np.float64)
    if "pixel_size" not in resolved:
        if "rlnImagePixelSize" in particles:
            resolved["pixel_size"] = particles["rlnImagePixelSize"].to_numpy(np.float64)
        elif "rlnDetectorPixelSize" in particles and "rlnMagnification" in particles:
            resolved["pixel_size"] = (
                particles["rlnDetectorPixelSize"].to_numpy(np.float64)
                * 1e4
                / particles["rlnMagnification"].to_numpy(np.float64)
            )
    if "pixel_size" not in resolved or not np.all(resolved["pixel_size"] > 0):
        if angpix is None:
            blocks_named = " or ".join(f"'data_{b}'" for b in (["optics"] if has_optics
                                                                else []) + [pname])
            raise StarFileError(
                f"{path}: no pixel size (block {blocks_named} has no label 'rlnImagePixelSize', "
                "nor 'rlnDetectorPixelSize' with 'rlnMagnification'); pass --angpix"
            )
        resolved["pixel_size"] = np.full(n, float(angpix))
    defaults = {"voltage_kv": 300.0, "cs_mm": 2.7, "amplitude_contrast": 0.1}
    for key, default in defaults.items():
        if key not in resolved:
            resolved[key] = np.full(n, default)
    for key, vals in resolved.items():
        if not np.all(np.isfinite(vals)):
            i = int(np.argmax(~np.isfinite(vals)))
            raise StarFileError(f"{path}: particle {i + 1} has non-finite {key} ({vals[i]})")


def read_particles(path: str | Path, *, angpix: float | None = None) -> ParticleTable:
    """Read a particle file: RELION STAR, or cryoSPARC ``.cs`` (the one dispatch point).

    A ``.cs`` suffix (or a file starting with the ``.npy`` magic bytes) is read by
    :func:`swiftalign.io.cryosparc.read_cryosparc`; anything else as STAR.

    Parameters
    ----------
    path : str or Path
        RELION 3.0 or 3.1+ STAR file, or cryoSPARC ``.cs`` file.
    angpix : float, optional
        Pixel size in Å/px to use where the file gives none.

    Returns
    -------
    ParticleTable

    Raises
    ------
    StarFileError
        Not a regular file, not a STAR (or .cs) file, no particles, a malformed row
        (names file, line, column and value), a missing label (names block and
        label), or no pixel size and no ``angpix``.
    """
    from swiftalign.io.cryosparc import is_cryosparc_file, read_cryosparc

    path = require_regular_file(path, "particle file (STAR or .cs)", error=StarFileError)
    if is_cryosparc_file(path):
        return read_cryosparc(path, angpix=angpix)
    if angpix is not None and not angpix > 0:
        raise StarFileError(f"--angpix {angpix}: the pixel size must be positive (Å/px)")
    blocks = _read_blocks(path)
    pname = _find_particle_block(path, blocks)
    particles = blocks[pname]
    if not isinstance(particles, pd.DataFrame) or len(particles) == 0:
        raise StarFileError(f"{path}: no particles in {path} (block 'data_{pname}' has no rows)")
    particles = particles.reset_index(drop=True)
    optics = blocks.get("optics") if pname != "optics" else None
    if optics is not None and not isinstance(optics, pd.DataFrame):
        optics = pd.DataFrame([optics])
    others = {k: v for k, v in blocks.items() if k not in (pname, "optics")}

    resolved: dict[str, np.ndarray] = {}
    if optics is not None and len(optics) and "rlnOpticsGroup" not in optics:
        raise StarFileError(f"{path}: block 'data_optics' has no label 'rlnOpticsGroup'")
    if optics is not None and "rlnOpticsGroup" in optics and len(optics):
        optics = optics.reset_index(drop=True)
        resolved = _optics_from_groups(path, pname, particles, optics)
    _optics_from_particles(path, pname, particles, optics is not None, resolved, angpix)
    return ParticleTable(
        particles=particles,
        optics=optics,
        path=path,
        pixel_size_angstrom=resolved["pixel_size"],
        voltage_kv=resolved["voltage_kv"],
        cs_mm=resolved["cs_mm"],
        amplitude_contrast=resolved["amplitude_contrast"],
        other_blocks=others,
        particle_block_name=pname,
    )


_IMAGE_NAME = re.compile(r"^\s*(\d+)@(.+?)\s*$")


def parse_image_name(name: str, star_dir: Path) -> tuple[int, Path]:
    """Split ``N@stack.mrcs`` into a 0-based index and a path resolved from ``star_dir``.

    Raises
    ------
    StarFileError
        When ``name`` is not of the form ``N@path`` with N ≥ 1.
    """
    m = _IMAGE_NAME.match(name)
    if not m or int(m.group(1)) < 1:
        raise StarFileError(f"rlnImageName {name!r} is not of the form N@stack.mrcs (N >= 1)")
    return int(m.group(1)) - 1, _resolve_stack(m.group(2), str(star_dir), os.getcwd())


@functools.lru_cache(maxsize=4096)
def _resolve_stack(stack: str, star_dir: str, cwd: str) -> Path:
    """A relative stack path resolved.

    From the STAR file's folder when it exists there; else, as RELION
    writes them (relative to the project folder), from the working directory or a folder above
    the STAR file (e.g. ``Refine3D/job010/run_data.star`` naming ``Extract/job005/…``).
    """
    p = Path(stack)
    if p.is_absolute():
        return p
    first = Path(star_dir) / p
    if first.exists():
        return first
    for base in (Path(cwd), *Path(star_dir).resolve().parents):
        if (base / p).exists():
            return base / p
    return first


def _optics_for_output(table: ParticleTable, box_size: int) -> tuple[pd.DataFrame, np.ndarray]:
    """An optics block and per-particle group numbers (3.0 inputs get groups built)."""
    if table.optics is not None and "rlnOpticsGroup" in table.optics:
        optics = table.optics.copy()
        if "rlnOpticsGroup" in table.particles:
            groups = table.particles["rlnOpticsGroup"].astype(int).to_numpy()
        else:
            groups = np.full(len(table), int(optics["rlnOpticsGroup"].iloc[0]))
        if "rlnImagePixelSize" not in optics:
            ps = {g: table.pixel_size_angstrom[groups == g][0] for g in np.unique(groups)}
            optics["rlnImagePixelSize"] = [
                ps.get(int(g), np.nan) for g in optics["rlnOpticsGroup"]
            ]
        if "rlnImageSize" not in optics:
            optics["rlnImageSize"] = box_size
        if "rlnImageDimensionality" not in optics:
            optics["rlnImageDimensionality"] = 2
        return optics, groups
    keys = np.stack(
        [table.pixel_size_angstrom, table.voltage_kv, table.cs_mm, table.amplitude_contrast],
        axis=1,
    ).round(6)
    uniq, groups0 = np.unique(keys, axis=0, return_inverse=True)
    groups = groups0.reshape(-1) + 1
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": [f"opticsGroup{i + 1}" for i in range(len(uniq))],
            "rlnOpticsGroup": np.arange(1, len(uniq) + 1),
            "rlnVoltage": uniq[:, 1],
            "rlnSphericalAberration": uniq[:, 2],
            "rlnAmplitudeContrast": uniq[:, 3],
            "rlnImagePixelSize": uniq[:, 0],
            "rlnImageSize": box_size,
            "rlnImageDimensionality": 2,
        }
    )
    return optics, groups


def project_relative(found: Path, cwd: str) -> str:
    """``found`` as RELION names it: relative to the project folder ``cwd``, or absolute.

    The relative name is lexical (a symlinked folder keeps its name, as RELION
    writes it) when it opens the same file from ``cwd``; otherwise (``..``
    through a symlink) it is taken between the real paths, as the kernel
    resolves ``..``; absolute when no relative name reaches the file.
    """
    target = found if found.is_absolute() else Path(cwd) / found
    if not target.exists():
        return str(found)  # the stack is missing: the name is left as it was

    def opens_target(name: str) -> bool:
        try:
            return os.path.samefile(Path(cwd) / name, target)
        except OSError:
            return False

    for name in (os.path.relpath(target, cwd),
                 os.path.relpath(os.path.realpath(target), os.path.realpath(cwd))):
        if opens_target(name):
            return name
    return os.path.realpath(target)


def _project_image_names(names: pd.Series, source_dir: Path) -> pd.Series:
    """Relative ``N@stack`` names rewritten as RELION writes them, from the project folder.

    Relative to the project folder (the working directory), wherever the output
    STAR file goes; absolute names kept.

    Each stack is found as the reader finds it (:func:`parse_image_name`: the input STAR's
    folder, then the working directory and the folders above the STAR file).
    """
    cwd = os.getcwd()
    cache: dict[str, str] = {}

    def rewrite(name: str) -> str:
        m = _IMAGE_NAME.match(name)
        if not m or Path(m.group(2)).is_absolute():
            return name
        stack = m.group(2)
        if stack not in cache:
            found = _resolve_stack(stack, str(source_dir), cwd)
            cache[stack] = project_relative(found, cwd) if found.exists() else stack
        return f"{m.group(1)}@{cache[stack]}"

    return names.map(rewrite)


def particle_blocks(
    path: str | Path,
    table: ParticleTable,
    *,
    box_size: int,
    updates: dict[str, np.ndarray] | None = None,
    keep: np.ndarray | None = None,
    project_names: bool = True,
) -> dict[str, pd.DataFrame]:
    """The STAR blocks :func:`write_particles` writes to ``path``, without writing them.

    ``optics``, ``particles`` and any other input blocks.

    Raises
    ------
    ValueError
        Non-finite values in a numeric column.
    """
    path = Path(path)
    particles = table.particles.copy()
    if "rlnImageName" in particles and project_names:
        particles["rlnImageName"] = _project_image_names(
            particles["rlnImageName"].astype(str), table.path.parent)
    optics, groups = _optics_for_output(table, box_size)
    particles["rlnOpticsGroup"] = groups
    for name, values in (updates or {}).items():
        particles[name] = np.asarray(values)
    if updates and "rlnOriginXAngst" in updates:
        particles = particles.drop(columns=["rlnOriginX", "rlnOriginY"], errors="ignore")
    if keep is not None:
        particles = particles[np.asarray(keep, bool)].reset_index(drop=True)
    for col in particles.columns:
        if particles[col].dtype.kind == "f":
            if not np.isfinite(particles[col].to_numpy()).all():
                raise ValueError(f"refusing to write non-finite values in column {col}")
    blocks = {"optics": optics, "particles": particles}
    for name, block in table.other_blocks.items():
        blocks.setdefault(name, block)
    return blocks


def write_star_blocks(path: str | Path, blocks: dict[str, pd.DataFrame]) -> None:
    """Write STAR blocks atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        starfile.write(blocks, tmp, overwrite=True)


def merge_particle_blocks(
    parts: list[tuple[pd.DataFrame, pd.DataFrame]],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate several (optics, particles) block pairs into one pair.

    Optics groups with identical optics (every column but the group number and
    name) are merged; others get new group numbers, and the particles'
    ``rlnOpticsGroup`` follows. Particle columns missing from some parts are
    dropped (with a warning), so that every row has every column.

    Parameters
    ----------
    parts : list of (pd.DataFrame, pd.DataFrame)
        Optics and particle blocks as :func:`particle_blocks` makes them.

    Returns
    -------
    (pd.DataFrame, pd.DataFrame)
        One optics block and one particle block, rows in the order given.
    """
    groups: dict[tuple, int] = {}
    optics_rows: list[pd.Series] = []
    out: list[pd.DataFrame] = []
    for optics, particles in parts:
        mapping = {}
        for _, row in optics.iterrows():
            key = tuple(sorted((c, str(row[c])) for c in optics.columns
                               if c not in ("rlnOpticsGroup", "rlnOpticsGroupName")))
            if key not in groups:
                groups[key] = len(groups) + 1
                new = row.copy()
                new["rlnOpticsGroup"] = groups[key]
                if "rlnOpticsGroupName" in new:
                    new["rlnOpticsGroupName"] = f"opticsGroup{groups[key]}"
                optics_rows.append(new)
            mapping[int(row["rlnOpticsGroup"])] = groups[key]
        p = particles.copy()
        p["rlnOpticsGroup"] = p["rlnOpticsGroup"].astype(int).map(mapping)
        out.append(p)
    common = [c for c in out[0].columns if all(c in p for p in out)]
    dropped = sorted({c for p in out for c in p.columns} - set(common))
    if dropped:
        warnings.warn(f"columns not in every batch are left out: {', '.join(dropped)}",
                      stacklevel=2)
    optics = pd.DataFrame(optics_rows).reset_index(drop=True)
    optics["rlnOpticsGroup"] = optics["rlnOpticsGroup"].astype(int)
    particles = pd.concat([p[common] for p in out], ignore_index=True)
    return optics, particles


def write_particles(
    path: str | Path,
    table: ParticleTable,
    *,
    box_size: int,
    updates: dict[str, np.ndarray] | None = None,
    keep: np.ndarray | None = None,
    project_names: bool = True,
) -> None:
    """Write a RELION 3.1+ particle STAR file atomically.

    Every input column is kept (relative image names are written as RELION
    writes them, relative to the project folder, i.e. the working directory,
    wherever ``path`` is; absolute names stay absolute); ``updates`` adds or replaces columns (e.g.
    ``rlnAngleRot``…, ``rlnOriginXAngst``…). Pixel-unit origins
    (``rlnOriginX/Y``) are dropped when Å origins are written, so a file never
    carries two disagreeing shifts.

    Parameters
    ----------
    path : str or Path
        Output file; written to a temporary name, then renamed.
    table : ParticleTable
        The particles as read.
    box_size : int
        Particle box size in px (for the optics block).
    updates : dict of str to np.ndarray, optional
        `(n,)` columns to add or replace.
    keep : np.ndarray, optional
        `(n,)` bool mask of particles to write.
    project_names : bool
        False: image names are written as they are in ``table`` (a dataset that
        names its stacks relative to its own folder, e.g. ``simulate``).
    """
    write_star_blocks(path, particle_blocks(path, table, box_size=box_size, updates=updates,
                                            keep=keep, project_names=project_names))
