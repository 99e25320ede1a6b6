"""Reading files into paragraphs and packing them into passages."""
from __future__ import annotations

import pytest

from retrievers.base import RetrieverError
from retrievers.text import Block, chunk_blocks, read_blocks, sniff_text


def blocks(path, kind):
    return list(read_blocks(path, kind))


def test_markdown_title_headings_and_paragraphs(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# Cats\n\nCats purr.\nThey   sleep.\n\n## Food\n\nFish.\n\n```\ncode line\n```\n")
    assert blocks(path, "markdown") == [
        Block("Cats purr. They sleep.", "Cats"),
        Block("Food", "Cats"),
        Block("Fish.", "Cats"),
        Block("code line", "Cats"),
    ]


def test_plain_text_takes_the_file_name_as_title(tmp_path):
    path = tmp_path / "dogs.txt"
    path.write_text("\ufeffDogs bark.\n\n\n# not a heading in plain text\n")
    assert blocks(path, "text") == [Block("Dogs bark.", "dogs"), Block("# not a heading in plain text", "dogs")]


def test_html_keeps_visible_text_only(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(
        "<html><head><title>Dogs &amp; Cats</title><style>p {color: red}</style>"
        "<script>alert('x')</script></head><body><h1>Pets</h1><p>Dogs <b>bark</b> &lt;loudly&gt;.</p>"
        "<div>Cats<br>purr</div><!-- hidden --><noscript>enable js</noscript></body></html>"
    )
    assert blocks(path, "html") == [
        Block("Pets", "Dogs & Cats"),
        Block("Dogs bark <loudly>.", "Dogs & Cats"),
        Block("Cats", "Dogs & Cats"),
        Block("purr", "Dogs & Cats"),
    ]


def test_jsonl_records_keep_title_and_url(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "One.\\n\\nTwo.", "title": "T", "url": "https://x.org"}\n\n{"text": "Three."}\n')
    assert blocks(path, "jsonl") == [
        Block("One.", "T", "https://x.org", 1),
        Block("Two.", "T", "https://x.org", 1),
        Block("Three.", "", "", 3),
    ]


@pytest.mark.parametrize(
    "line, message",
    [("{not json", "docs.jsonl:2: not valid JSON"), ('{"title": "no text"}', 'docs.jsonl:2: each line must be'),
     ('["a list"]', "docs.jsonl:2: each line must be"), ('{"text": "x", "url": 3}', 'docs.jsonl:2: "title" and "url"')],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(RetrieverError, match=message):
        blocks(path, "jsonl")


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"  \n\n", "is empty"), (b"%PDF-1.7 ...", "is a PDF"), (b"\x89PNG\r\n\x1a\n\x00\x00", "binary"),
     (b"caf\xe9 au lait" * 3, "not UTF-8")],
)
def test_sniff_rejects_what_is_not_text(tmp_path, content, message):
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    with pytest.raises(RetrieverError, match=message):
        sniff_text(path)


def words(n, start=0):
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_chunks_pack_paragraphs_to_target_with_overlap():
    paragraphs = [Block(words(60, i * 60) + ".", "T") for i in range(10)]  # 600 words
    chunks = list(chunk_blocks(paragraphs, target=160, max_words=200, overlap=30))
    sizes = [len(c.text.split()) for c in chunks]
    assert all(s <= 200 for s in sizes)
    assert all(s >= 120 for s in sizes[:-1])
    # every word of the input is in some chunk
    all_words = set(" ".join(c.text for c in chunks).replace(".", "").split())
    assert all_words == set(words(600).split())
    # consecutive chunks overlap: the next starts with the end of the previous
    for a, b in zip(chunks, chunks[1:]):
        n = a.text.split()[-30:].index(b.text.split()[0])
        assert b.text.split()[: 30 - n] == a.text.split()[-30 + n :]


def test_paragraph_breaks_are_kept_inside_a_chunk():
    chunks = list(chunk_blocks([Block("First one.", "T"), Block("Second one.", "T")], target=160))
    assert [c.text for c in chunks] == ["First one.\n\nSecond one."]


def test_a_long_paragraph_is_split_at_sentences():
    sentences = [f"Sentence number {i} has exactly seven words." for i in range(60)]  # 420 words
    chunks = list(chunk_blocks([Block(" ".join(sentences), "T")], target=160, max_words=200, overlap=30))
    assert len(chunks) >= 3
    for c in chunks:
        assert len(c.text.split()) <= 200
        assert c.text.startswith("Sentence number") and c.text.endswith("words.")


def test_a_giant_sentence_without_punctuation_is_cut_by_words():
    chunks = list(chunk_blocks([Block(words(1000), "T")], target=160, max_words=200, overlap=0))
    assert [len(c.text.split()) for c in chunks] == [200] * 5


def test_chunks_never_mix_records():
    chunks = list(chunk_blocks([Block("A.", "one", record=1), Block("B.", "two", record=2)]))
    assert [(c.text, c.title, c.record) for c in chunks] == [("A.", "one", 1), ("B.", "two", 2)]
