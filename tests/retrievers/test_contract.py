"""One contract, every retriever (STYLE.md item 6): the same checks on kb, kg, web and memory."""
from __future__ import annotations

import pytest

from retrievers import KnowledgeBase, KnowledgeGraph, LongTermMemory, Passage, Retriever, WebSearch


def make_kb(db, hashing, tmp_path, **_):
    (tmp_path / "cats.md").write_text("# Cats\n\nCats purr and sleep most of the day.\n\nCats hunt mice at night.\n")
    (tmp_path / "dogs.txt").write_text("Dogs bark at the mail carrier.\n\nDogs love long walks in the park.\n")
    (tmp_path / "space.jsonl").write_text(
        '{"text": "Jupiter is the largest planet.", "title": "Jupiter"}\n'
        '{"text": "Saturn has bright rings of ice.", "title": "Saturn"}\n'
    )
    kb = KnowledgeBase(db, hashing)
    for name in ("cats.md", "dogs.txt", "space.jsonl"):
        kb.add(tmp_path / name)
    return kb


def make_kg(db, **_):
    kg = KnowledgeGraph(db)
    kg.add([
        ("GoldenEye", "directed_by", "Martin Campbell"),
        ("GoldenEye", "has_genre", "Spy film"),
        ("Casino Royale", "directed_by", "Martin Campbell"),
        ("Jupiter", "orbits", "the Sun"),
    ])
    return kg


def make_web(db, engines, **_):
    return WebSearch(db, backend="loopback", timeout=5)


def make_memory(db, hashing, **_):
    memory = LongTermMemory(db, hashing)
    memory.add("alice", ["I have two cats.", "I work as a nurse.", "Jupiter is my favourite planet."])
    memory.add("bob", ["I have a dog."])
    return memory.for_user("alice")


MAKERS = {"kb": make_kb, "kg": make_kg, "web": make_web, "memory": make_memory}
# a query each source can answer
QUERIES = {"kb": "cats", "kg": "GoldenEye", "web": "cats", "memory": "cats"}


@pytest.fixture(params=sorted(MAKERS))
def retriever(request, db, hashing, tmp_path):
    kwargs = {"db": db, "hashing": hashing, "tmp_path": tmp_path}
    if request.param == "web":
        kwargs["engines"] = request.getfixturevalue("engines")
    return MAKERS[request.param](**kwargs)


def test_is_a_retriever_with_its_name(retriever):
    assert isinstance(retriever, Retriever)
    assert retriever.name in {"kb", "kg", "web", "memory"}


def test_search_returns_passages_best_first_at_most_k(retriever):
    query = QUERIES[retriever.name]
    for k in (1, 2, 5):
        passages = retriever.search(query, k=k)
        assert 1 <= len(passages) <= k
        assert all(type(p) is Passage for p in passages)
        scores = [p.score for p in passages]
        assert scores == sorted(scores, reverse=True)
        for p in passages:
            assert isinstance(p.text, str) and p.text.strip()
            assert isinstance(p.source, str) and p.source
            assert isinstance(p.score, float)
            assert isinstance(p.title, str)
            assert isinstance(p.meta, dict)


def test_top_passage_is_relevant(retriever):
    top = retriever.search(QUERIES[retriever.name], k=1)[0]
    assert QUERIES[retriever.name].casefold() in (top.text + " " + top.title).casefold()


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_empty_query_returns_nothing(retriever, query):
    assert retriever.search(query, k=5) == []


def test_k_zero_returns_nothing(retriever):
    assert retriever.search(QUERIES[retriever.name], k=0) == []


@pytest.mark.parametrize(
    "query",
    ['"unbalanced quote', "cats AND (dogs OR", "NEAR(cats dogs)", "col:cats*", "^cats", "-", "'; DROP TABLE x; --",
     "🐈 кошки 猫", "[", "] [ , ,", "x" * 5000],
)
def test_awkward_queries_never_raise(retriever, query):
    passages = retriever.search(query, k=3)
    assert isinstance(passages, list) and len(passages) <= 3


def test_search_is_repeatable(retriever):
    query = QUERIES[retriever.name]
    assert retriever.search(query, k=3) == retriever.search(query, k=3)


def test_is_a_langchain_retriever_that_returns_the_same_passages(retriever):
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnableLambda

    query = QUERIES[retriever.name]
    lc = retriever.as_langchain(k=2)
    assert isinstance(lc, BaseRetriever)
    docs = lc.invoke(query)
    passages = retriever.search(query, k=2)
    assert [d.page_content for d in docs] == [p.text for p in passages]
    assert [d.metadata["source"] for d in docs] == [p.source for p in passages]
    assert [d.metadata["score"] for d in docs] == [p.score for p in passages]
    # in a chain, as a LangChain app would use it
    chain = lc | RunnableLambda(lambda ds: "\n".join(f"[{d.metadata['source']}] {d.page_content}" for d in ds))
    assert chain.invoke(query).startswith(f"[{passages[0].source}] {passages[0].text}")
    def texts(ds):
        return [(d.page_content, d.metadata["source"]) for d in ds]

    assert [texts(ds) for ds in lc.batch([query, query])] == [texts(docs), texts(docs)]
