"""B4: how close to the machine.

Measures the GEMM rate (large float32 torch matmul) and the memory bandwidth
(large copy), then the exact search's achieved FLOP rate (its GEMM part: 2·n·m·d
per block) and the PQ fast-scan's achieved code-scan bandwidth, as fractions.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.common import write_results


def gemm_rate(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def bandwidth(n_bytes: int = 512 * 1024**2, repeats: int = 5) -> float:
    src = torch.empty(n_bytes // 4)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return 2 * n_bytes * repeats / (time.perf_counter() - t0)  # read + write


def exact_search_rate(n_queries: int = 2000, n_refs: int = 200_000, dim: int = 276) -> float:
    """FLOP/s of the exact search's scoring step (GEMM + top-k) on vectors of our shape."""
    from swiftalign.search import merge_topk

    q = torch.randn(n_queries, dim)
    r = torch.randn(n_refs, dim)
    t0 = time.perf_counter()
    best_d = best_i = None
    for start in range(0, n_refs, 20000):
        block = r[start : start + 20000]
        d = (q * q).sum(1, keepdim=True) + (block * block).sum(1)[None] - 2 * q @ block.T
        dk, ik = torch.topk(d, 20, dim=1, largest=False)
        best_d, best_i = merge_topk(best_d, best_i, dk, ik + start, 20)
    return 2 * n_queries * n_refs * dim / (time.perf_counter() - t0)


def folded_exact_search_rate(n_queries: int = 1000, n_images: int = 16_225,
                             n_shifts: int = 29, n_coeff: int = 138) -> float:
    """FLOP/s of the production exact search (:func:`swiftalign.search._exact_search`).

    A random Fourier-disc gallery of the demo's shape (16,225 rotated images × 29
    shifts = 470,525 poses, 138 coefficients): reference vectors regenerated per
    block, shifts folded into the queries, one ``addmm`` + top-k per block.
    Counted as ``2·n·poses·dim`` (the useful work).
    """
    from swiftalign.fourier import make_disc, normalise_vectors
    from swiftalign.gallery import Gallery
    from swiftalign.sampling import shift_grid_px
    from swiftalign.search import _exact_search

    disc = make_disc(48, 4.88 / 25.0)  # the demo disc: 138 coefficients
    assert disc.n_coeff == n_coeff, disc.n_coeff
    gen = torch.Generator().manual_seed(0)
    shifts = shift_grid_px(8.0, 2.56)[:n_shifts]  # the demo shift grid: 29
    gallery = Gallery(rot_tilt_deg=np.zeros((n_images, 2)), psi_deg=np.zeros((n_images, 1)),
                      shifts_yx_px=shifts, coeffs=torch.randn(n_images, n_coeff,
                                                              dtype=torch.complex64,
                                                              generator=gen),
                      disc=disc, metric="cosine")
    queries = normalise_vectors(torch.randn(n_queries, disc.dim, generator=gen), "cosine")
    t0 = time.perf_counter()
    _exact_search(gallery, queries, 20, ctf_disc=None, budget=2 * 1024**3)
    return 2 * n_queries * gallery.n_poses * disc.dim / (time.perf_counter() - t0)


def pq_scan_bandwidth(n_codes: int = 2_000_000, m: int = 64, n_queries: int = 500) -> float:
    """Bytes of PQ codes scanned per second by a 4-bit fast-scan flat PQ index."""
    import faiss

    d = 2 * m
    x = np.random.default_rng(0).standard_normal((n_codes, d)).astype(np.float32)
    index = faiss.index_factory(d, f"PQ{m}x4fs")
    index.train(x[:20000])
    index.add(x)
    t0 = time.perf_counter()
    index.search(x[:n_queries], 10)
    elapsed = time.perf_counter() - t0
    return n_queries * n_codes * m / 2 / elapsed


def main() -> str:
    g = gemm_rate()
    bw = bandwidth()
    ex = exact_search_rate()
    folded = folded_exact_search_rate()
    pq = pq_scan_bandwidth()
    rows = [
        {"quantity": "GEMM rate (float32 matmul 2048³)", "value": g / 1e9, "unit": "GFLOP/s",
         "fraction": 1.0},
        {"quantity": "memory bandwidth (512 MB copy, read+write)", "value": bw / 1e9,
         "unit": "GB/s", "fraction": 1.0},
        {"quantity": "exact search scoring (GEMM + top-k, d = 276)", "value": ex / 1e9,
         "unit": "GFLOP/s", "fraction": ex / g},
        {"quantity": "exact search as run (folded shifts, 1,000 × 470,525 poses, d = 276)",
         "value": folded / 1e9, "unit": "GFLOP/s", "fraction": folded / g},
        {"quantity": "PQ64x4fs code scan (2 M codes × 500 queries)", "value": pq / 1e9,
         "unit": "GB/s of codes", "fraction": pq / bw},
    ]
    cols = [("quantity", "quantity", ""), ("value", "value", ".1f"), ("unit", "unit", ""),
            ("fraction", "fraction of machine", ".2f")]
    return write_results("b4_roofline", rows, cols)


if __name__ == "__main__":
    print(main())
