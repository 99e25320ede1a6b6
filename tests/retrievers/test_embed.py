"""Embedders: the real all-MiniLM-L6-v2 from the installed package, and the hashing stand-in."""
from __future__ import annotations

import numpy as np

from retrievers.embed import HashingEmbedder, default_embedder, from_blobs, minilm_path, to_blob


def test_minilm_is_loaded_from_the_package_and_shared(minilm):
    assert (minilm_path() / "model.safetensors").is_file()
    assert default_embedder() is minilm


def test_minilm_vectors_are_unit_float32_and_meaningful(minilm):
    vecs = minilm.encode(["A cat sat on the mat.", "A kitten rested on the rug.", "Stock markets fell sharply."])
    assert vecs.dtype == np.float32 and vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    sims = vecs @ vecs.T
    assert sims[0, 1] > sims[0, 2] + 0.2
    assert np.allclose(minilm.encode(["A cat sat on the mat."])[0], vecs[0], atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_a_message_embedded_twice_is_embedded_once(minilm, monkeypatch):
    """The steps of one turn embed the same message; the second asks the model for nothing, and a caller that
    changes the returned array does not change the kept one."""
    text = "Anyway, I need a taxi to the station at nine."
    first = minilm.encode([text])
    calls = []
    model = minilm._model
    monkeypatch.setattr(model, "encode", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    again = minilm.encode([text])
    assert calls == [] and np.array_equal(first, again)
    again[0, 0] += 1.0
    assert np.array_equal(minilm.encode([text]), first)


def test_hashing_embedder_is_deterministic_and_unit_length():
    a, b = HashingEmbedder(), HashingEmbedder()
    x = a.encode(["owls hunt at night", "owls hunt", "", "tax returns"])
    assert np.array_equal(x, b.encode(["owls hunt at night", "owls hunt", "", "tax returns"]))
    assert np.allclose(np.linalg.norm(x[[0, 1, 3]], axis=1), 1.0) and not x[2].any()
    assert x[0] @ x[1] > x[0] @ x[3]


def test_blobs_round_trip():
    vecs = HashingEmbedder(8).encode(["a", "b"])
    assert np.array_equal(from_blobs([to_blob(v) for v in vecs], 8), vecs)
    assert from_blobs([], 8).shape == (0, 8)
