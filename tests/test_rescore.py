"""The folded re-scoring of index candidates equals brute force over shifted references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swiftalign.fourier import make_disc, normalise_vectors
from swiftalign.gallery import Gallery
from swiftalign.sampling import shift_grid_px
from swiftalign.search import rescore


def _random_gallery(metric: str) -> Gallery:
    gen = torch.Generator().manual_seed(21)
    disc = make_disc(24, 0.3)
    n_dir, n_psi = 20, 10
    coeffs = torch.randn(n_dir * n_psi, disc.n_coeff, dtype=torch.complex64, generator=gen)
    return Gallery(rot_tilt_deg=np.zeros((n_dir, 2)), psi_deg=np.zeros((n_dir, n_psi)),
                   shifts_yx_px=shift_grid_px(2.0, 1.0), coeffs=coeffs, disc=disc,
                   metric=metric, weights=torch.rand(disc.n_coeff, generator=gen) + 0.5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("with_ctf", ["none", "shared", "per_particle"])
def test_folded_rescore_equals_brute_force(metric, with_ctf):
    g = _random_gallery(metric)
    gen = torch.Generator().manual_seed(22)
    ctf = {"none": None, "shared": torch.rand(g.disc.n_coeff, generator=gen) * 2 - 1,
           "per_particle": torch.rand(40, g.disc.n_coeff, generator=gen) * 2 - 1}[with_ctf]
    queries = normalise_vectors(torch.randn(40, g.disc.dim, generator=gen), metric)
    # candidates share images (several shifts of one image), with some invalid (−1) ids
    image = torch.randint(0, g.n_images, (40, 6), generator=gen)
    shift = torch.randint(0, g.n_shifts, (40, 6, 4), generator=gen)
    cand = (image[..., None] * g.n_shifts + shift).reshape(40, -1)
    cand[::7, 3] = -1
    if with_ctf == "per_particle":  # regenerated candidates, each with its particle's CTF
        vecs = g.vectors(cand.clamp_min(0), ctf_disc=ctf[:, None])
        brute = ((vecs.double() - queries.double()[:, None]) ** 2).sum(-1)
    else:
        every = g.vectors(torch.arange(g.n_poses), ctf_disc=ctf)
        brute = (torch.cdist(queries.double(), every.double()) ** 2).gather(1, cand.clamp_min(0))
    brute[cand < 0] = float("inf")
    want_d, order = torch.topk(brute, 5, dim=1, largest=False)
    # a small budget forces several chunks of particles
    d, i = rescore(g, queries, cand, 5, ctf_disc=ctf, budget=50_000)
    np.testing.assert_array_equal(i.numpy(), cand.gather(1, order).numpy())
    np.testing.assert_allclose(d.numpy(), want_d.numpy(), rtol=1e-4, atol=1e-4)
