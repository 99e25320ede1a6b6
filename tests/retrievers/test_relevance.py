"""Hybrid search's fitted fusion and the relevance floor: what reaches the prompt, and what the trace says when nothing
does."""
from __future__ import annotations

import shutil

import pytest

from retrievers import HashingEmbedder, KnowledgeBase, starter_kb_dir
from retrievers.kb import FALLBACK_FUSION, FUSION_DEFAULTS, STOPWORDS, Fusion, default_fusion, expand_paths, fts_query

PLANTS = "# Photosynthesis\n\nPlants make food from sunlight, water and carbon dioxide in their leaves.\n"


def add(kb, folder, docs: dict[str, str]) -> None:
    for name, text in docs.items():
        (folder / name).write_text(text)
        kb.add(folder / name)


def test_each_embedder_gets_its_fitted_fusion(db, hashing):
    assert KnowledgeBase(db, hashing).fusion == FUSION_DEFAULTS["hashing-256"] == default_fusion("hashing-256")
    assert default_fusion("all-MiniLM-L6-v2") == FUSION_DEFAULTS["all-MiniLM-L6-v2"]
    minilm = FUSION_DEFAULTS["all-MiniLM-L6-v2"]
    assert 0 < minilm.bm25_weight < 1 and minilm.floor is not None  # both sources count, and there is a floor
    # an embedder nobody fitted: MiniLM's weights, and no floor (its cosines have another scale)
    assert KnowledgeBase(db, HashingEmbedder(64)).fusion == FALLBACK_FUSION
    assert FALLBACK_FUSION.floor is None and FALLBACK_FUSION.bm25_weight == minilm.bm25_weight


def test_hybrid_score_is_the_fitted_mix_of_cosine_and_bm25(db, hashing, tmp_path):
    kb = KnowledgeBase(db, hashing)
    add(kb, tmp_path, {"a.txt": "Zebras have black and white stripes.", "b.txt": "Horses run fast on the plains.",
                       "c.txt": "Stripes on a shirt.", "d.txt": "Coffee grows on shrubs."})
    query = "why do zebras have stripes?"
    fusion = kb.fusion
    cosine = {p.source: p.score for p in kb.search(query, k=4, mode="dense")}
    bm25 = {p.source: p.score for p in kb.search(query, k=4, mode="bm25")}
    hybrid = kb.search(query, k=4)
    assert [p.source for p in hybrid] == sorted(cosine, key=lambda s: -fusion.score(cosine[s], bm25.get(s)))
    for p in hybrid:
        expected = (1 - fusion.bm25_weight) * cosine[p.source] + fusion.bm25_weight * (
            bm25.get(p.source, 0.0) / (bm25.get(p.source, 0.0) + fusion.bm25_half))
        assert p.score == pytest.approx(expected, abs=1e-6)
    assert hybrid[0].source == "kb:a.txt#0"


def test_the_weight_moves_the_ranking_between_words_and_meaning(db, hashing, tmp_path):
    kb = KnowledgeBase(db, hashing)
    # a.txt shares only stopwords with the query (a high hashed cosine, no BM25); b.txt shares the one content word
    add(kb, tmp_path, {"a.txt": "What is it that you do with all the time?", "b.txt": "Zebra."})
    query = "what is it that you do with the zebra"
    assert kb.search(query, k=1, mode="bm25")[0].source == "kb:b.txt#0"
    assert kb.search(query, k=1, mode="dense")[0].source == "kb:a.txt#0"
    assert kb.search(query, k=1, fusion=Fusion(0.0, 10.0))[0].source == "kb:a.txt#0"
    assert kb.search(query, k=1, fusion=Fusion(1.0, 10.0))[0].source == "kb:b.txt#0"


def test_bm25_ignores_stopwords_so_small_talk_matches_no_words(db, hashing, tmp_path):
    assert fts_query("Hi! How are you?", STOPWORDS) == ""
    assert fts_query("How do plants make food?", STOPWORDS) == '"plants" OR "make" OR "food"'
    assert fts_query("How are you?") == '"how" OR "are" OR "you"'  # the plain builder keeps every word
    kb = KnowledgeBase(db, hashing)
    add(kb, tmp_path, {"how.txt": "How are you doing? This is how you make tea."})
    assert kb.search("hi, how are you?", mode="bm25") == []
    assert kb.search("how to make tea", mode="bm25")[0].source == "kb:how.txt#0"


def test_fetch_drops_passages_below_the_floor_and_says_why(db, hashing, tmp_path):
    from app.knowledge import Knowledge

    knowledge = Knowledge(db, hashing)
    add(knowledge.kb, tmp_path, {"plants.md": PLANTS, "tea.md": "# Tea\n\nTea is brewed from the leaves of a shrub.\n"})
    query = "how do plants make food from sunlight?"
    scores = [p.score for p in knowledge.kb.search(query, k=3)]
    assert len(scores) == 2 and scores[0] > scores[1]
    weights = knowledge.kb.fusion

    knowledge.kb.fusion = Fusion(weights.bm25_weight, weights.bm25_half, floor=None)
    got = knowledge.fetch("kb", query, "", [])
    assert len(got.passages) == 2 and got.note == {}

    between = (scores[0] + scores[1]) / 2
    knowledge.kb.fusion = Fusion(weights.bm25_weight, weights.bm25_half, floor=between)
    got = knowledge.fetch("kb", query, "", [])
    assert [p.source for p in got.passages] == ["kb:plants.md#0"]
    assert got.fields == {"knowledge": ["Plants make food from sunlight, water and carbon dioxide in their leaves."]}
    assert got.note == {"floor": between, "dropped_below_floor": 1}

    knowledge.kb.fusion = Fusion(weights.bm25_weight, weights.bm25_half, floor=scores[0] + 0.01)
    got = knowledge.fetch("kb", query, "", [])
    assert got.passages == [] and got.fields == {"knowledge": []} and got.error is None
    assert got.note == {"floor": scores[0] + 0.01, "dropped_below_floor": 2,
                        "reason": f"no passage above the relevance floor ({scores[0] + 0.01:.2f})"}


def test_the_bot_answers_without_knowledge_when_nothing_clears_the_floor(settings, tiny_lm, tmp_path):
    from app.server import build_bot

    bot = build_bot(settings, lm=tiny_lm, embedder=HashingEmbedder())
    kb = bot.knowledge.kb
    (tmp_path / "plants.md").write_text(PLANTS)
    kb.add(tmp_path / "plants.md")
    question = "how do plants make food from sunlight?"
    score = kb.search(question, k=1)[0].score
    kb.fusion = Fusion(kb.fusion.bm25_weight, kb.fusion.bm25_half, floor=round(score - 0.01, 4))

    def turn(text):
        stream = bot.turn([{"role": "user", "content": text}], skill="wow", max_tokens=2)
        stream.text()
        reply = stream.reply
        return reply, next(s for s in reply.trace["steps"] if s["step"] == "retrieve")

    reply, retrieve = turn(question)  # above the floor: in the prompt and in the sources
    assert [p["source"] for p in reply.passages] == ["kb:plants.md#0"]
    assert "Plants make food from sunlight" in reply.prompt
    assert retrieve["floor"] == kb.fusion.floor and "reason" not in retrieve

    reply, retrieve = turn("hi! how are you?")  # small talk: below the floor, neither in the prompt nor the sources
    assert reply.passages == [] and reply.trace["passages"] == []
    assert "Plants make food" not in reply.prompt
    assert reply.prompt.rsplit("Knowledge:\n", 1)[1].split("Dialogue:\n")[0].strip() == ""
    assert retrieve["passages"] == [] and retrieve["dropped_below_floor"] == 1
    assert retrieve["reason"] == f"no passage above the relevance floor ({kb.fusion.floor:.2f})"


@pytest.fixture
def starter(db, minilm, tmp_path):
    folder = tmp_path / "starter_kb"
    shutil.copytree(starter_kb_dir(), folder)
    kb = KnowledgeBase(db, minilm)
    for path in expand_paths([folder]):
        kb.add(path)
    return kb


@pytest.mark.parametrize("message", ["hi! how are you?", "I love gardening", "thanks, that's good to know",
                                     "Hi! How are you today? What do you do for fun?", "lol ok"])
def test_small_talk_finds_nothing_above_the_floor_in_the_starter_kb(starter, message):
    assert starter.fusion.floor is not None
    assert all(p.score < starter.fusion.floor for p in starter.search(message, k=3)), message


@pytest.mark.parametrize("question, doc", [
    ("how do plants make food from sunlight?", "photosynthesis.md"),
    ("Which planet is the largest?", "solar-system.md"),
    ("How can I delete what the bot knows about me?", "memory-and-privacy.md"),
    ("How does rain form?", "water-cycle.md"),
    ("what is the difference between coffee and tea?", "coffee-and-tea.md"),
])
def test_real_questions_find_their_document_above_the_floor(starter, question, doc):
    top = starter.search(question, k=3)[0]
    assert top.meta["doc"] == f"starter_kb/{doc}" and top.score >= starter.fusion.floor, (question, top)


def test_the_evaluation_fits_on_one_half_and_reports_on_the_other():
    from app.evaluation.retrieval_eval import MIN_SPLIT, kb_recall, split_halves

    fit, report = split_halves(41)
    assert (len(fit), len(report)) == (20, 21) and not set(fit) & set(report) and split_halves(41) == (fit, report)
    words = ["owl", "kiwi", "zebra", "otter", "lynx", "bison", "heron", "moose", "gecko", "tapir", "koala", "llama",
             "panda", "camel", "eagle", "viper", "squid", "whale", "raven", "hyena", "lemur", "stoat", "finch", "okapi"]
    records = [{"meta": [[f"The {w} is an animal with a {w}-shaped habitat."]],
                "dialogue": [[f"Do you know anything about the {w}?", "Yes."]]} for w in words]
    out = kb_recall(records, None, HashingEmbedder(), starter_kb=True)
    assert (out["n"], out["fit_n"], out["report_n"], out["split_seed"]) == (24, 12, 12, 15)
    assert out["passages"] == 24 and out["starter_passages"] >= 9
    assert out["fusion"]["fitted"] and 0 <= out["fusion"]["bm25_weight"] <= 1 and out["fusion"]["floor"] is not None
    for key in ("kb_recall_at_5", "kb_recall_at_5_bm25", "kb_recall_at_5_dense"):
        assert 0 <= out[key] <= 1 and 0 <= out[f"{key}_fit"] <= 1
    assert out["kb_recall_at_5"] == 1.0  # each question names its animal
    few = kb_recall(records[: MIN_SPLIT - 1], None, HashingEmbedder())  # too few to fit: shipped fusion, all queries
    assert (few["fit_n"], few["report_n"], few["fusion"]["fitted"]) == (0, MIN_SPLIT - 1, False)
    assert "kb_recall_at_5_fit" not in few and few["starter_passages"] == 0
