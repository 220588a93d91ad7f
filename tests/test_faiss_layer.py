"""The thin FAISS layer (issue 12): frozen index records, populate fills a copy, the size is
measured once, tensors reach FAISS through its torch interop with numpy's results."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from swiftalign import search
from swiftalign.alignment import AlignConfig, build_reference_set, index_settings

CONFIG = AlignConfig(resolution_angstrom=25.0, symmetry="C4", angular_step_deg=15.0,
                     max_shift_px=2.0, index="IVF16,PQ16x4fs", local_rounds=0, weighting="none")


@pytest.fixture(scope="module")
def built(trpv1_map):
    gallery = build_reference_set(trpv1_map, CONFIG, pixel_size_angstrom=4.88).gallery
    settings = index_settings(CONFIG)
    trained = search.train_index(gallery, settings)
    queries = search._augmented_vectors(gallery, 64, np.random.default_rng(3), None)
    return gallery, settings, trained, queries


def test_populate_fills_a_copy_and_measures_the_size_once(built, monkeypatch):
    gallery, settings, trained, queries = built
    a = search.populate_index(trained, gallery, settings)
    b = search.populate_index(trained, gallery, settings)
    # the trained index stays empty: it serves any number of galleries
    assert trained.faiss_index.ntotal == 0 and trained.n_train > 0
    assert a.faiss_index is not b.faiss_index and a.faiss_index.ntotal == gallery.n_poses
    assert a.bytes_per_pose == search.serialize_index(a).nbytes / gallery.n_poses > 0
    assert a.timings["train"] == trained.train_seconds and a.nprobe is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.nprobe = 1  # type: ignore[misc]

    def no_serialising(*args, **kwargs):
        raise AssertionError("index serialised at query time")

    monkeypatch.setattr(search, "_serialized_nbytes", no_serialising)
    monkeypatch.setattr(search, "serialize_index", no_serialising)
    got = search.query_index(a, queries, k=3, settings=settings)
    again = search.query_index(b, queries, k=3, settings=settings)
    np.testing.assert_array_equal(got.ids, again.ids)
    np.testing.assert_array_equal(got.distances, again.distances)
    assert got.bytes_per_pose == a.bytes_per_pose and got.nprobe == a.nprobe
    # the index finds the exact nearest pose of nearly every held-out vector
    _, exact = search._exact_search(gallery, queries, 1, ctf_disc=None, budget=2**28)
    assert np.mean(got.ids[:, 0] == exact[:, 0].numpy()) >= 0.9
    # an nprobe override holds for its query only
    search.query_index(a, queries, k=3, settings=dataclasses.replace(settings, nprobe=1))
    assert search._ivf(a.faiss_index).nprobe == 1
    np.testing.assert_array_equal(search.query_index(a, queries, k=3, settings=settings).ids,
                                  got.ids)
    assert search._ivf(a.faiss_index).nprobe == a.nprobe != 1


def test_torch_tensors_give_numpys_results(built):
    gallery, settings, trained, queries = built
    index = search.populate_index(trained, gallery, settings).faiss_index
    x = search._faiss_input(index, queries)
    assert x.dtype == torch.float32 and x.is_contiguous() and x.shape == (64, index.d)
    assert index.d % 64 == 0 and index.d >= queries.shape[1]
    d_t, i_t = index.search(x, 20)
    d_n, i_n = index.search_numpy(np.ascontiguousarray(x.numpy()), 20)
    np.testing.assert_array_equal(i_t.numpy(), i_n)
    np.testing.assert_array_equal(d_t.numpy(), d_n)
