"""The CUDA path gives the CPU's answers (skipped without CUDA; run on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swiftalign.alignment import AlignConfig, align_particles, ctf_params_from_table
from swiftalign.evaluate import symmetric_angular_error_deg
from swiftalign.fsc import fsc_curve
from swiftalign.io import ParticleImages, read_particles
from swiftalign.reconstruction import reconstruct
from swiftalign.symmetry import symmetry_matrices

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_reconstruction_on_gpu_equals_cpu(noisy_dataset):
    star, truth = noisy_dataset
    table = read_particles(star)
    euler = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    maps = {}
    with ParticleImages(table) as images:
        for device in ("cpu", "cuda"):
            maps[device] = reconstruct(images, euler, table.origins_shift_px(),
                                       ctf=ctf_params_from_table(table), pixel_size_angstrom=4.88,
                                       symmetry_group=symmetry_matrices("C4"), device=device)
    assert fsc_curve(maps["cpu"], maps["cuda"])[1:].min() > 0.999


def test_alignment_on_gpu_finds_the_cpu_poses(noisy_dataset):
    star, truth = noisy_dataset
    table = read_particles(star)
    rows = np.arange(100)
    from importlib.resources import files

    from swiftalign.io import read_map

    ref = read_map(str(files("swiftalign") / "data" / "trpv1_volume.mrc"))
    res = {}
    with ParticleImages(table) as images:
        for device in ("cpu", "cuda"):
            res[device] = align_particles(table, images, ref, AlignConfig(
                resolution_angstrom=25.0, symmetry="C4", device=device), rows=rows)
    diff = symmetric_angular_error_deg(res["cpu"].euler_deg[:, 0], res["cuda"].euler_deg[:, 0],
                                       "C4")
    assert np.mean(diff < 1.0) >= 0.95  # same poses up to float rounding ties
    true_e = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()[rows]
    err = symmetric_angular_error_deg(res["cuda"].euler_deg[:, 0], true_e, "C4")
    assert np.median(err) <= res["cuda"].sampling.angular_step_deg
