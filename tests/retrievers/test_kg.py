"""The knowledge graph: loading files, fuzzy entities, and the KG-path parser's output."""
from __future__ import annotations

import json

import pytest

from retrievers import KnowledgeGraph, RetrieverError
from retrievers.kg import entity_key, parse_paths

TRIPLES = [
    ("GoldenEye", "directed_by", "Martin Campbell"),
    ("GoldenEye", "written_by", "Michael France"),
    ("GoldenEye", "has_genre", "Spy film"),
    ("Casino Royale", "directed_by", "Martin Campbell"),
    ("Zodiac (Crime Fiction Film)", "starred_actors", "Adam Trese"),
    ("Washington, D.C.", "capital_of", "United States"),
    ("Beyoncé", "genre", "R&B"),
]


@pytest.fixture
def kg(db):
    graph = KnowledgeGraph(db)
    graph.add(TRIPLES)
    return graph


def texts(passages):
    return [p.text for p in passages]


def test_add_file_tsv_with_header_and_comments(db, tmp_path):
    path = tmp_path / "facts.tsv"
    path.write_text("subject\trelation\tobject\n# a comment\n\nGoldenEye\tdirected_by\tMartin Campbell\n"
                    "Martin Campbell\t~directed_by\tCasino Royale\n")
    graph = KnowledgeGraph(db)
    assert graph.add_file(path) == 2
    assert graph.add_file(path) == 0  # duplicates ignored
    assert sorted(tuple(r) for r in db.execute("SELECT subject, relation, object FROM kg_triples")) == [
        ("Casino Royale", "directed_by", "Martin Campbell"),
        ("GoldenEye", "directed_by", "Martin Campbell"),
    ]


def test_add_file_jsonl_objects_and_lists(db, tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"subject": "A", "relation": "r", "object": "B"}) + "\n" + json.dumps(["B", "r", "C"]) + "\n")
    assert KnowledgeGraph(db).add_file(path) == 2


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.tsv", "A\tr\tB\nonly two\tfields\n", r"bad.tsv:2: expected subject, relation and object separated by tabs"),
        ("bad.tsv", "A\tr\tB\nA\t\tB\n", r"bad.tsv:2:"),
        ("bad.jsonl", '["A", "r", "B"]\n{oops\n', r"bad.jsonl:2: not valid JSON"),
        ("bad.jsonl", '{"subject": "A", "relation": "r"}\n', r"bad.jsonl:1: expected"),
        ("empty.tsv", "# nothing\n", "holds no triples"),
    ],
)
def test_malformed_files_store_nothing(db, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    graph = KnowledgeGraph(db)
    with pytest.raises(RetrieverError, match=message):
        graph.add_file(path)
    assert graph.count() == 0


def test_missing_and_non_regular_files(db, tmp_path):
    graph = KnowledgeGraph(db)
    with pytest.raises(RetrieverError, match="no such file"):
        graph.add_file(tmp_path / "nope.tsv")
    with pytest.raises(RetrieverError, match="not a regular file"):
        graph.add_file(tmp_path)


def test_entity_key_ignores_case_punctuation_and_accents():
    assert entity_key("  Washington,  D.C. ") == "washington d c"
    assert entity_key("BEYONCÉ") == entity_key("beyonce")


@pytest.mark.parametrize("spelling", ["GoldenEye", "goldeneye", "Golden-Eye!", "golden eye", "Goldeneyes", "Goldneye"])
def test_lookup_matches_close_spellings(kg, spelling):
    assert texts(kg.lookup(spelling)) == [
        "GoldenEye directed by Martin Campbell",
        "GoldenEye written by Michael France",
        "GoldenEye has genre Spy film",
    ]


def test_lookup_finds_entity_as_object_and_by_name_without_parenthetical(kg):
    assert texts(kg.lookup("martin campbell")) == [
        "GoldenEye directed by Martin Campbell",
        "Casino Royale directed by Martin Campbell",
    ]
    assert texts(kg.lookup("Zodiac")) == ["Zodiac (Crime Fiction Film) starred actors Adam Trese"]
    assert kg.lookup("Completely Unknown Thing") == []


@pytest.mark.parametrize(
    "text",
    [
        "[GoldenEye, written_by, Michael France]",
        "[Michael France, ~written_by, GoldenEye]",
        '[["GoldenEye", "written_by", "Michael France"]]',
        '["GoldenEye", "written_by", "Michael France"]',
        "GoldenEye | written_by | Michael France",
        "GoldenEye\twritten_by\tMichael France",
        "goldeneye, written by, michael france",
        "  [Goldeneye ,  Written_By ,Michael France ]  ",
    ],
)
def test_lookup_paths_reads_many_forms(kg, text):
    assert kg.lookup_paths(text)[0].text == "GoldenEye written by Michael France"
    assert kg.lookup_paths(text)[0].meta == {
        "subject": "GoldenEye", "relation": "written_by", "object": "Michael France", "id": 2,
    }


def test_lookup_paths_several_triples_on_one_line(kg):
    found = kg.lookup_paths("[Martin Campbell, ~directed_by, GoldenEye] [GoldenEye, has_genre, Spy film]", k=2)
    assert texts(found) == ["GoldenEye directed by Martin Campbell", "GoldenEye has genre Spy film"]
    assert found[0].source == "kg" and found[0].score == 1.0


def test_lookup_paths_commas_inside_names(kg):
    assert texts(kg.lookup_paths("[Washington, D.C., capital_of, United States]", k=1)) == [
        "Washington, D.C. capital of United States"
    ]


def test_lookup_paths_partial_and_unknown(kg):
    # the parser invented an object: the right subject and relation still come first
    assert kg.lookup_paths("[GoldenEye, directed_by, Steven Spielberg]")[0].text == "GoldenEye directed by Martin Campbell"
    assert kg.lookup_paths("[GoldenEye, directed_by]")[0].text == "GoldenEye directed by Martin Campbell"
    assert kg.lookup_paths("[Nobody, knows, Nothing]") == []
    assert kg.lookup_paths("no brackets and nonsense") == []


def test_lookup_paths_finds_an_entity_that_only_ends_triples(db):
    graph = KnowledgeGraph(db)
    graph.add([("Titanic", "starred_actors", "Leonardo DiCaprio"), ("The Revenant", "starred_actors", "Leonardo DiCaprio"),
               ("Inception", "starred_actors", "Leonardo DiCaprio"), ("Inception", "directed_by", "Christopher Nolan")])
    found = texts(graph.lookup_paths("[Leonardo DiCaprio, ~starred_actors, The Revenant]", k=5))
    assert found[0] == "The Revenant starred actors Leonardo DiCaprio"  # the triple the path names comes first
    assert set(found[1:]) == {"Titanic starred actors Leonardo DiCaprio", "Inception starred actors Leonardo DiCaprio"}


def test_parse_paths_is_forgiving():
    assert parse_paths("") == []
    assert parse_paths("[A, r, B]\n\n[A, r, B] [C; s; D]") == [("A", "r", "B"), ("C", "s", "D")]
    assert parse_paths("[Zodiac (Film), starred_actors, Adam Trese]") == [("Zodiac (Film)", "starred_actors", "Adam Trese")]
    assert parse_paths("[A]") == []


def test_search_handles_entities_questions_and_paths(kg):
    assert kg.search("casino royale", k=1)[0].text == "Casino Royale directed by Martin Campbell"
    assert kg.search("Who starred in Zodiac?", k=1)[0].text == "Zodiac (Crime Fiction Film) starred actors Adam Trese"
    assert kg.search("[Casino Royale, directed_by, Martin Campbell]", k=1)[0].score == 1.0
