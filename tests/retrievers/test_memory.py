"""Long-term memory: per-user facts, de-duplicated, never shared between users."""
from __future__ import annotations

import pytest

from retrievers import LongTermMemory, RetrieverError


@pytest.fixture
def memory(db, hashing):
    return LongTermMemory(db, hashing)


def test_add_list_and_dedup(memory):
    added = memory.add("alice", ["I have two cats.", "i have two CATS!", "  I work   as a nurse. ", ""], source_turn="t1")
    assert [(f.user_id, f.text, f.source_turn) for f in added] == [
        ("alice", "I have two cats.", "t1"), ("alice", "I work as a nurse.", "t1"),
    ]
    assert memory.add("alice", ["I have two cats"]) == []  # already known
    assert [f.text for f in memory.list("alice")] == ["I have two cats.", "I work as a nurse."]
    assert [f.id for f in memory.list("alice")] == [f.id for f in added]


def test_users_never_see_each_other(memory):
    memory.add("alice", ["I have two cats."])
    memory.add("bob", ["I have two cats.", "I hate cats."])  # the same fact is kept separately per user
    alice = memory.search("cats", k=10, user="alice")
    assert [p.text for p in alice] == ["I have two cats."]
    assert all(p.meta["user"] == "alice" for p in alice)
    assert {p.text for p in memory.for_user("bob").search("cats", 10)} == {"I hate cats.", "I have two cats."}
    assert memory.search("cats", user="carol") == []


def test_forget_one_or_all_scoped_to_the_user(memory):
    [cats, nurse] = memory.add("alice", ["I have two cats.", "I work as a nurse."])
    [bob_fact] = memory.add("bob", ["I have a dog."])
    assert memory.forget("bob", cats.id) == 0  # not bob's
    assert memory.forget("alice", bob_fact.id) == 0
    assert memory.forget("alice", cats.id) == 1
    assert [f.text for f in memory.list("alice")] == ["I work as a nurse."]
    assert memory.forget("alice") == 1
    assert memory.list("alice") == []
    assert [f.text for f in memory.list("bob")] == ["I have a dog."]


def test_passages_point_at_the_fact(memory):
    [fact] = memory.add("alice", ["I have two cats."])
    [p] = memory.search("cats", user="alice")
    assert (p.source, p.meta["id"]) == (f"memory:{fact.id}", fact.id)


@pytest.mark.parametrize("user", ["", "   ", None, "x" * 201])
def test_bad_user_ids_are_refused(memory, user):
    with pytest.raises(RetrieverError):
        memory.add(user, ["fact"])
    with pytest.raises(RetrieverError):
        memory.list(user)


def test_search_requires_a_user(memory):
    with pytest.raises(TypeError):
        memory.search("cats")  # no default user: a forgotten argument must not leak everyone's facts


def test_minilm_ranks_by_meaning_and_drops_paraphrases(db, minilm):
    memory = LongTermMemory(db, minilm)
    memory.add("alice", ["I have two cats.", "I work night shifts as a nurse at the hospital.", "My favourite food is sushi."])
    assert memory.search("What is your job?", k=1, user="alice")[0].text == "I work night shifts as a nurse at the hospital."
    assert memory.search("Do you have any pets?", k=1, user="alice")[0].text == "I have two cats."
    assert memory.add("alice", ["I have 2 cats."]) == []  # a near-identical paraphrase
