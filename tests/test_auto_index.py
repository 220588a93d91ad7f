"""``--index auto`` chooses by the measured cost model (README B1/B2)."""

import pytest

from swiftalign.search import auto_index_factory, resolve_factory, search_cost_s

DEMO_POSES = 470_525  # TRPV1, 48 px, 25 Å
DIM = 276


def test_cost_model_reproduces_the_measured_b2_times():
    # B2 (2 idle cores): exact query 47.94 s for 1,000 particles at 7,480,956 poses,
    # 3.01 s / 9.24 s for 1,000 / 4,000 at 470,525; IVF-PQ build 128.9 s and 8.1 s
    assert search_cost_s(7_480_956, DIM, 1000, exact=True) == pytest.approx(47.94, rel=0.05)
    assert search_cost_s(DEMO_POSES, DIM, 1000, exact=True) == pytest.approx(3.01, rel=0.05)
    assert search_cost_s(DEMO_POSES, DIM, 4000, exact=True) == pytest.approx(9.24, rel=0.05)
    assert search_cost_s(7_480_956, DIM, 0, exact=False) == pytest.approx(128.9, rel=0.05)
    assert search_cost_s(DEMO_POSES, DIM, 1000, exact=False) == pytest.approx(8.1 + 0.41,
                                                                               rel=0.05)


def test_auto_is_exact_below_the_crossover_and_ivfpq_above():
    # 2,000 particles: building the index (8 s) costs more than the exact search (~5 s)
    assert auto_index_factory(DEMO_POSES, DIM, 2000) == "Flat"
    assert auto_index_factory(DEMO_POSES, DIM, 4000) == "Flat"
    assert auto_index_factory(DEMO_POSES, DIM, 5000).startswith("IVF512,")
    assert auto_index_factory(DEMO_POSES, DIM, 20_000).startswith("IVF512,")
    assert auto_index_factory(DEMO_POSES, DIM, None).startswith("IVF512,")  # built for reuse
    assert auto_index_factory(150_000, DIM, 100_000) == "Flat"  # small sets stay exact
    # the crossover falls towards 3,400 particles for very large reference sets
    assert auto_index_factory(7_480_956, DIM, 3000) == "Flat"
    assert auto_index_factory(7_480_956, DIM, 4000).startswith("IVF2048_HNSW32,")
    # fewer candidates to re-score make the index cheaper per particle
    assert resolve_factory("auto", DEMO_POSES, DIM, 4000, rerank=20) != "Flat"
    assert resolve_factory("auto", DEMO_POSES, DIM, 4000, rerank=100) == "Flat"
