"""Realistic simulated datasets: atomic model → density → CTF-modulated projections + noise.

The data B5 (and any benchmark at real sizes) runs on, built from public inputs in
``../shared/data`` (see its SOURCES.md):

- **density**: an atomic model (GroEL 1MNF, D7; CXCR4 8ZPM, C1) turned into a map with
  gemmi's electron-scattering density (``gemmi.DensityCalculatorE``, Peng 1996
  five-Gaussian factors with each atom's B-factor) on a grid twice as fine as the
  pixel size, then Fourier-cropped to the box (band-limited at Nyquist, no aliasing).
  The model is rotated into RELION's symmetry frame (``Cn``/``Dn``: n-fold axis on z;
  ``Dn``: a 2-fold on x; see :mod:`swiftalign.symmetry`) and its centre put on the box
  centre (pixel ``N // 2``). The n-fold axis is the principal axis of the Cα cloud whose
  moment differs most from the other two, the 2-fold the in-plane direction whose
  half-turn maps the Cα cloud best onto itself; the residual (median distance of each
  symmetry-mate Cα to the nearest Cα) is reported.
- **poses**: uniform on SO(3); shifts Gaussian (σ 3 px) redrawn beyond ``align``'s default
  range.
- **CTF**: defocus U/V/angle of particles drawn at random from the EMPIAR-10028 table
  (``cryodrgn_empiar10028/ctf.pkl``, a numpy pickle read with an unpickler that only
  rebuilds numpy arrays), 300 kV, Cs 2.0 mm, amplitude contrast 0.1 as in that table.
- **projections**: ``relion_project --ctf`` when installed (RELION's conventions are the
  specification), otherwise the package's projector, shift and CTF
  (:func:`swiftalign.projection.project`, :func:`swiftalign.ctf.ctf_rfft2`).
- **noise**: white Gaussian at the SNR of :mod:`swiftalign.simulate` (variance of each
  clean CTF-modulated image over the box / noise variance).

The set is written once under a folder named by its parameters and reused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CTF_TABLE = SHARED / "cryodrgn_empiar10028" / "ctf.pkl"
#: model name → (file, point group of the assembly)
MODELS = {"1MNF": ("models/1MNF.pdb.gz", "D7"), "8ZPM": ("models/8zpm.cif", "C1")}
VOLTAGE_KV, CS_MM, AMPLITUDE_CONTRAST = 300.0, 2.0, 0.1  # EMPIAR-10028's optics
SHIFT_SIGMA_PX = 3.0

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: "
                                         "only numpy arrays are allowed")
        return super().find_class(module, name)


def load_ctf_table(path: str | Path = CTF_TABLE) -> np.ndarray:
    """Per-particle CTF table of cryoDRGN's EMPIAR-10028 inputs.

    Parameters
    ----------
    path : str or Path
        ``ctf.pkl``: a pickled numpy array.

    Returns
    -------
    np.ndarray
        `(n, 9)` float64, columns [box px, pixel size Å, defocus U Å, defocus V Å,
        defocus angle °, voltage kV, Cs mm, amplitude contrast, phase shift °].

    Raises
    ------
    ValueError
        When the pickle holds anything but numpy arrays, or the array is not `(n, 9)`.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            table = _NumpyArrayUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(table, np.ndarray) or table.ndim != 2 or table.shape[1] != 9:
        shape = getattr(table, "shape", type(table).__name__)
        raise ValueError(f"{path}: expected an (n, 9) CTF array, got {shape}")
    return table.astype(np.float64)


def _principal_axis(xyz: np.ndarray) -> np.ndarray:
    """Unit axis of the `(n, 3)` cloud whose second moment differs most from the others."""
    w, v = np.linalg.eigh(np.cov(xyz.T))
    gaps = [abs(w[0] - w[1]), abs(w[2] - w[1])]  # w ascending: the lone one is 0 or 2
    return v[:, 0] if gaps[0] > gaps[1] else v[:, 2]


def _frame_from_axis(axis: np.ndarray, phi_deg: float) -> np.ndarray:
    """Rotation (rows x, y, z of the new frame) taking ``axis`` to z, then about z by ``phi_deg``."""
    z = axis / np.linalg.norm(axis)
    t = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = t - z * (t @ z)
    x /= np.linalg.norm(x)
    frame = np.stack([x, np.cross(z, x), z])
    return Rotation.from_euler("z", phi_deg, degrees=True).as_matrix() @ frame


def symmetry_residual_angstrom(xyz: np.ndarray, group: np.ndarray) -> float:
    """Median over the non-identity elements ``g`` of the median distance (Å) from each
    point of ``g·xyz`` to the nearest point of ``xyz`` (`(n, 3)`, centred); 0 for C1."""
    if len(group) == 1:
        return 0.0
    tree = cKDTree(xyz)
    return float(np.median([np.median(tree.query(xyz @ g.T)[0]) for g in group[1:]]))


def symmetry_frame(xyz: np.ndarray, symmetry: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Rotation and centre that put a model into RELION's frame for ``symmetry``.

    Parameters
    ----------
    xyz : np.ndarray
        `(n, 3)` atom (e.g. Cα) coordinates in Å.
    symmetry : str
        ``C1``, ``Cn`` or ``Dn``.

    Returns
    -------
    rotation : np.ndarray
        `(3, 3)` proper rotation ``R``: frame coordinates are ``R·(x − centre)``.
    centre : np.ndarray
        `(3,)` Å, the centroid.
    residual_angstrom : float
        :func:`symmetry_residual_angstrom` in the new frame.

    Raises
    ------
    ValueError
        For ``T``, ``O`` and ``I`` (not needed by the models here).
    """
    from swiftalign.symmetry import parse_symmetry, symmetry_matrices

    letter, order = parse_symmetry(symmetry)
    centre = xyz.mean(axis=0)
    centred = xyz - centre
    if letter not in "CD":
        raise ValueError(f"symmetry {symmetry}: only Cn and Dn models are placed automatically")
    if letter == "C" and order == 1:
        return np.eye(3), centre, 0.0
    axis = _principal_axis(centred)
    phi = 0.0
    if letter == "D":  # the 2-fold on x: scan one period (180°/n), coarse then fine
        sub = centred[:: max(1, len(centred) // 3000)]
        flip = np.diag([1.0, -1.0, -1.0])

        def score(p: float) -> float:  # mates of a subset against all points
            rot = _frame_from_axis(axis, p)
            return float(np.median(cKDTree(centred @ rot.T).query(sub @ rot.T @ flip.T)[0]))

        period = 180.0 / order
        coarse = np.arange(0.0, period, 0.5)
        best = coarse[np.argmin([score(p) for p in coarse])]
        fine = best + np.arange(-0.5, 0.5, 0.02)
        phi = float(fine[np.argmin([score(p) for p in fine])])
    rot = _frame_from_axis(axis, phi)
    return rot, centre, symmetry_residual_angstrom(centred @ rot.T, symmetry_matrices(symmetry))


def _read_model(path: Path):
    import gemmi

    st = gemmi.read_structure(str(path))
    st.remove_waters()
    st.remove_hydrogens()
    st.remove_alternative_conformations()
    del st[1:]  # first model only (NMR ensembles)
    return st


def _fourier_crop(volume: np.ndarray, box: int) -> np.ndarray:
    """Band-limit a `(M, M, M)` map (``M = 2·box``) to `(box, box, box)` by Fourier cropping,
    keeping the sample at fine index ``2·j`` as coarse index ``j``."""
    import scipy.fft

    m, h = volume.shape[0], box // 2
    spec = scipy.fft.rfftn(volume.astype(np.float32))
    keep = np.r_[0:h, m - (box - h):m]
    cropped = spec[keep][:, keep][:, :, : box // 2 + 1]
    return (scipy.fft.irfftn(cropped, s=(box, box, box)) * (box / m) ** 3).astype(np.float32)


def model_density(path: str | Path, box: int, pixel_size_angstrom: float, symmetry: str
                  ) -> tuple[np.ndarray, dict]:
    """Electron-scattering density of an atomic model in RELION's symmetry frame.

    Parameters
    ----------
    path : str or Path
        PDB or mmCIF model (waters, hydrogens, alternative conformations and
        models after the first are dropped).
    box : int
        Map side ``N`` (px).
    pixel_size_angstrom : float
        Voxel size (Å).
    symmetry : str
        The assembly's point group (``C1``, ``Cn``, ``Dn``).

    Returns
    -------
    volume : np.ndarray
        `(N, N, N)` float32 (z, y, x), centre of the model at voxel ``N // 2``.
    info : dict
        ``rotation`` applied, ``symmetry_residual_angstrom``, ``radius_angstrom`` (largest
        atom distance from the centre), ``atoms``.

    Raises
    ------
    ValueError
        When the model does not fit in the box.
    """
    import gemmi

    st = _read_model(Path(path))
    atoms = [(a.name, a.pos.tolist()) for ch in st[0] for res in ch for a in res]
    xyz = np.array([p for _, p in atoms])
    ca = np.array([p for name, p in atoms if name == "CA"])
    rot, centre, residual = symmetry_frame(ca if len(ca) >= 3 else xyz, symmetry)
    radius = float(np.linalg.norm(xyz - centre, axis=1).max())
    side = box * pixel_size_angstrom
    if 2 * radius >= side:
        raise ValueError(f"{path}: model diameter {2 * radius:.0f} Å does not fit in a "
                         f"{box} px × {pixel_size_angstrom} Å box ({side:.0f} Å)")
    offset = -rot @ centre + (box // 2) * pixel_size_angstrom
    st[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(rot.tolist()), gemmi.Vec3(*offset)))
    st.cell = gemmi.UnitCell(side, side, side, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    st.setup_cell_images()
    calc = gemmi.DensityCalculatorE()
    calc.grid.set_unit_cell(st.cell)  # d_min unset: gemmi keeps this grid (spacing Ts / 2)
    calc.grid.set_size(2 * box, 2 * box, 2 * box)
    calc.put_model_density_on_grid(st[0])
    fine = np.array(calc.grid, copy=False).transpose(2, 1, 0)  # gemmi (x, y, z) → (z, y, x)
    info = {"rotation": rot.tolist(), "symmetry_residual_angstrom": residual,
            "radius_angstrom": radius, "atoms": len(xyz)}
    return _fourier_crop(fine, box), info


@dataclass
class DatasetSpec:
    """Parameters of a realistic set (units in the names)."""

    model: str = "1MNF"
    n_particles: int = 5000
    box: int = 160
    pixel_size_angstrom: float = 1.6
    snr_db: float = -15.0
    seed: int = 0
    projector: str = "relion"  # "relion" (relion_project) or "package"

    @property
    def symmetry(self) -> str:
        """Point group of the model's assembly."""
        return MODELS[self.model][1]

    def folder_name(self) -> str:
        return (f"{self.model}_n{self.n_particles}_box{self.box}_ps{self.pixel_size_angstrom:g}"
                f"_snr{self.snr_db:g}_seed{self.seed}_{self.projector}")


def draw_truth(spec: DatasetSpec, ctf_table: np.ndarray) -> pd.DataFrame:
    """Ground truth of every particle: RELION columns (angles, origins, CTF).

    Returns
    -------
    pd.DataFrame
        `n` rows: rlnAngleRot/Tilt/Psi (°), rlnOriginXAngst/YAngst (Å),
        rlnDefocusU/V (Å), rlnDefocusAngle (°), from rows of ``ctf_table`` drawn
        with replacement.
    """
    from swiftalign.conventions import matrix_to_euler, shift_px_to_origin_angstrom
    from swiftalign.sampling import DEFAULT_MAX_SHIFT_PX

    n = spec.n_particles
    rng = np.random.default_rng(spec.seed)
    euler = matrix_to_euler(Rotation.random(n, random_state=rng).as_matrix().transpose(0, 2, 1))
    shift = rng.normal(0.0, SHIFT_SIGMA_PX, size=(n, 2))
    far = np.hypot(*shift.T) > DEFAULT_MAX_SHIFT_PX
    while far.any():  # redraw the shifts beyond the default search range
        shift[far] = rng.normal(0.0, SHIFT_SIGMA_PX, size=(int(far.sum()), 2))
        far = np.hypot(*shift.T) > DEFAULT_MAX_SHIFT_PX
    ctf = ctf_table[rng.integers(0, len(ctf_table), n)]
    origin = shift_px_to_origin_angstrom(shift, spec.pixel_size_angstrom)
    return pd.DataFrame({
        "rlnAngleRot": euler[:, 0], "rlnAngleTilt": euler[:, 1], "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": origin[:, 0], "rlnOriginYAngst": origin[:, 1],
        "rlnDefocusU": ctf[:, 2], "rlnDefocusV": ctf[:, 3], "rlnDefocusAngle": ctf[:, 4],
    })


def write_star(path: Path, truth: pd.DataFrame, spec: DatasetSpec, stack_name: str) -> None:
    """RELION 3.1 particle STAR (optics + particles, alternating rlnRandomSubset 1/2)."""
    n = len(truth)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
        "rlnVoltage": [VOLTAGE_KV], "rlnSphericalAberration": [CS_MM],
        "rlnAmplitudeContrast": [AMPLITUDE_CONTRAST],
        "rlnImagePixelSize": [spec.pixel_size_angstrom], "rlnImageSize": [spec.box],
        "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(n)]})
    for col in truth.columns:
        particles[col] = truth[col].to_numpy()
    particles["rlnOpticsGroup"] = 1
    particles["rlnRandomSubset"] = np.arange(n) % 2 + 1
    starfile.write({"optics": optics, "particles": particles}, path, overwrite=True)


def _project_relion(volume_path: Path, ang_star: Path, out_root: Path) -> Path:
    """``relion_project --ctf`` at the poses and CTFs of ``ang_star``; returns the stack."""
    proc = subprocess.run(["relion_project", "--i", str(volume_path), "--o", str(out_root),
                           "--ang", str(ang_star), "--ctf"], capture_output=True, text=True)
    stack = out_root.with_suffix(".mrcs")
    if proc.returncode != 0 or not stack.exists():
        raise RuntimeError(f"relion_project failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return stack


def _project_package(volume: np.ndarray, truth: pd.DataFrame, spec: DatasetSpec,
                     out: Path, batch: int = 256) -> Path:
    """The package's projector, shift and CTF at the truth; streamed to ``out``."""
    import torch
    from torch_fourier_shift import fourier_shift_image_2d

    from swiftalign.conventions import (
        centred_irfft2,
        centred_rfft2,
        euler_to_matrix,
        origin_angstrom_to_shift_px,
    )
    from swiftalign.ctf import CtfParams, ctf_rfft2
    from swiftalign.projection import project

    n, box, ps = len(truth), spec.box, spec.pixel_size_angstrom
    euler = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    shift = origin_angstrom_to_shift_px(
        truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(), ps)
    ones = np.ones(n)
    ctf = CtfParams(truth["rlnDefocusU"].to_numpy(), truth["rlnDefocusV"].to_numpy(),
                    truth["rlnDefocusAngle"].to_numpy(), VOLTAGE_KV * ones, CS_MM * ones,
                    AMPLITUDE_CONTRAST * ones, 0.0 * ones)
    vol = torch.as_tensor(volume)
    with mrcfile.new_mmap(out, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
        for start in range(0, n, batch):
            sl = slice(start, min(n, start + batch))
            mats = torch.as_tensor(euler_to_matrix(euler[sl]), dtype=torch.float32)
            proj = fourier_shift_image_2d(project(vol, mats),
                                          torch.as_tensor(shift[sl], dtype=torch.float32))
            c = ctf_rfft2(ctf.subset(sl), pixel_size_angstrom=ps, box_size=box)
            mrc.data[sl] = centred_irfft2(centred_rfft2(proj) * c, (box, box)).numpy()
        mrc.voxel_size = ps
    return out


def add_noise(clean: Path, out: Path, snr_db: float, seed: int, batch: int = 512) -> None:
    """White Gaussian noise at ``snr_db`` per image (variance of the clean image / noise
    variance), streamed from ``clean`` to ``out`` through a temporary file."""
    rng = np.random.default_rng([seed, 5])
    snr = 10.0 ** (snr_db / 10.0)
    tmp = out.with_name(f".{out.name}.tmp")
    src = mrcfile.mmap(clean, mode="r", permissive=True)
    try:
        n, box = src.data.shape[0], src.data.shape[-1]
        with mrcfile.new_mmap(tmp, shape=(n, box, box), mrc_mode=2, overwrite=True) as dst:
            for start in range(0, n, batch):
                img = np.asarray(src.data[start:start + batch], dtype=np.float32)
                sigma = np.sqrt(img.var(axis=(1, 2), keepdims=True) / snr)
                dst.data[start:start + batch] = img + sigma * rng.standard_normal(
                    img.shape, dtype=np.float32)
            dst.voxel_size = src.voxel_size
    finally:
        src.close()
    os.replace(tmp, out)


@dataclass
class Dataset:
    """A built set: files and ground truth."""

    folder: Path
    star: Path
    truth_map: Path
    spec: DatasetSpec
    info: dict

    def truth(self) -> tuple[np.ndarray, np.ndarray]:
        """True Euler angles `(n, 3)` (°) and shifts `(n, 2)` (y, x px)."""
        p = starfile.read(self.star, always_dict=True)["particles"]
        euler = p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
        shift = -p[["rlnOriginYAngst", "rlnOriginXAngst"]].to_numpy() / self.spec.pixel_size_angstrom
        return euler, shift


def build_dataset(root: Path, spec: DatasetSpec) -> Dataset:
    """Build (or reuse) the set described by ``spec`` under ``root/spec.folder_name()``.

    Files: ``truth.mrc`` (the density), ``particles.star`` + ``particles.mrcs`` (noisy,
    ground truth in the pose columns), ``dataset.json`` (the spec, model placement and
    build time). A folder without ``dataset.json`` is rebuilt.
    """
    from swiftalign.io import write_map

    folder = root / spec.folder_name()
    done = folder / "dataset.json"
    star, truth_map = folder / "particles.star", folder / "truth.mrc"
    if done.exists():
        return Dataset(folder, star, truth_map, spec, json.loads(done.read_text())["model"])
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model_file = SHARED / MODELS[spec.model][0]
    volume, info = model_density(model_file, spec.box, spec.pixel_size_angstrom, spec.symmetry)
    write_map(truth_map, volume, spec.pixel_size_angstrom)
    truth = draw_truth(spec, load_ctf_table())
    write_star(folder / "poses.star", truth, spec, "clean.mrcs")
    if spec.projector == "relion":
        clean = _project_relion(truth_map, folder / "poses.star", folder / "clean")
    else:
        clean = _project_package(volume, truth, spec, folder / "clean.mrcs")
    add_noise(clean, folder / "particles.mrcs", spec.snr_db, spec.seed)
    clean.unlink()
    for extra in (folder / "clean.star", folder / "poses.star"):
        extra.unlink(missing_ok=True)
    write_star(star, truth, spec, "particles.mrcs")
    done.write_text(json.dumps({"spec": asdict(spec), "model": info}, indent=2))
    return Dataset(folder, star, truth_map, spec, info)
