"""The selectors' example embeddings are cached in SQLite by (model, text); a user's own text never is."""
from __future__ import annotations

import numpy as np

from retrievers import HashingEmbedder
from retrievers.db import open_db
from retrievers.embed import ExampleCache, encode_examples


class Counting(HashingEmbedder):
    def __init__(self, dim: int = 64):
        super().__init__(dim)
        self.texts: list[str] = []

    def encode(self, texts):
        self.texts += list(texts)
        return super().encode(texts)


def rows(db) -> int:
    return db.execute("SELECT count(*) FROM example_vectors").fetchone()[0]


def test_examples_are_embedded_once_per_install_and_come_back_equal(tmp_path):
    inner = Counting()
    cache = ExampleCache(inner, open_db(tmp_path / "examples.db"))
    texts = ["hi, how are you?", "book me a taxi", "hi, how are you?"]
    first = encode_examples(cache, texts)
    assert np.allclose(first, HashingEmbedder(64).encode(texts)) and first.flags.writeable
    again = ExampleCache(Counting(), open_db(tmp_path / "examples.db"))  # a restart: a new process's objects
    assert np.array_equal(encode_examples(again, texts), first) and again.inner.texts == []
    assert encode_examples(again, ["book me a taxi", "a new example"]).shape == (2, 64)
    assert again.inner.texts == ["a new example"]  # only what the cache lacked


def test_a_users_text_is_never_stored_and_another_model_never_reads_these_vectors(tmp_path):
    db = open_db(tmp_path / "examples.db")
    cache = ExampleCache(Counting(), db)
    cache.encode(["my secret message"])  # a turn's query: straight through
    assert rows(db) == 0
    encode_examples(cache, ["an example"])
    other = ExampleCache(Counting(dim=32), db)  # another model (its name differs): its own vectors
    assert encode_examples(other, ["an example"]).shape == (1, 32) and other.inner.texts == ["an example"]
    assert encode_examples(HashingEmbedder(64), ["x"]).shape == (1, 64)  # an embedder without a cache: encode


def test_another_data_directory_in_the_same_process_embeds_nothing_again_and_still_stores_them(tmp_path):
    texts = ["an example only these two caches see", "and a second one"]
    first = ExampleCache(Counting(), open_db(tmp_path / "a.db"))
    vecs = encode_examples(first, texts)
    assert first.inner.texts == texts
    second = ExampleCache(Counting(), open_db(tmp_path / "b.db"))  # a second bot, its own data directory
    assert np.array_equal(encode_examples(second, texts), vecs) and second.inner.texts == []
    assert rows(second.db) == 2  # written to its own file too: its next start reads them from there
