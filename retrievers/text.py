"""Streaming text extraction and paragraph-aware chunking for the knowledge base.

Readers yield ``Block``s (a paragraph of plain text, with the title and URL of the record it belongs to) while reading a
file in pieces, so a 50 MB file is never held whole. :func:`chunk_blocks` packs consecutive paragraphs of one record
into passages of about ``target`` words (never more than ``max_words``), carrying the last sentence or so of each
passage into the next as overlap.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Iterable, Iterator

from .base import RetrieverError

READ_BLOCK = 1 << 16
TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | JSONL_SUFFIXES


@dataclass(frozen=True)
class Block:
    """One paragraph of plain text. ``record`` numbers the JSONL line it came from (0 for other files)."""

    text: str
    title: str = ""
    url: str = ""
    record: int = 0


def sniff_text(path: Path) -> None:
    """Raise RetrieverError unless the file's first bytes look like UTF-8 text."""
    with path.open("rb") as f:
        head = f.read(8192)
    if not head.strip():
        raise RetrieverError(f"{path} is empty: there is no text to add.")
    if head.startswith(b"%PDF"):
        raise RetrieverError(f"{path} is a PDF, which the knowledge base cannot read: convert it to text first.")
    if b"\x00" in head:
        raise RetrieverError(f"{path} is not a text file (it contains binary data).")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a multi-byte character cut at the block's end
            raise RetrieverError(f"{path} is not UTF-8 text (bad byte at offset {e.start}).") from None


def read_blocks(path: Path, kind: str, on_bytes=None) -> Iterator[Block]:
    """Yield the paragraphs of ``path`` read as ``kind`` ("text", "markdown", "html" or "jsonl")."""
    with path.open("r", encoding="utf-8-sig", errors="strict", newline=None) as f:
        lines = _counting_lines(f, on_bytes)
        try:
            if kind == "jsonl":
                yield from _jsonl_blocks(path, lines)
            elif kind == "html":
                yield from _html_blocks(f, on_bytes)
            else:
                yield from _text_blocks(lines, markdown=kind == "markdown", default_title=path.stem)
        except UnicodeDecodeError:
            raise RetrieverError(f"{path} is not UTF-8 text.") from None


def kind_for(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in HTML_SUFFIXES:
        return "html"
    if suffix in {".md", ".markdown"}:
        return "markdown"
    return "text"


def _counting_lines(f: IO[str], on_bytes) -> Iterator[str]:
    for line in f:
        if on_bytes:
            on_bytes(len(line.encode("utf-8")))
        yield line


_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _text_blocks(lines: Iterable[str], *, markdown: bool, default_title: str) -> Iterator[Block]:
    """Paragraphs are separated by blank lines; in Markdown a leading ``# `` heading is the title, other headings
    become short paragraphs of their own, and fenced code is kept as text without its fences."""
    title: str | None = None
    para: list[str] = []

    def flush() -> Iterator[Block]:
        nonlocal title
        text = " ".join(" ".join(para).split())
        para.clear()
        if text:
            title = title if title is not None else default_title
            yield Block(text, title)

    for line in lines:
        if markdown and _FENCE.match(line):
            yield from flush()
            continue
        heading = _HEADING.match(line) if markdown else None
        if heading:
            yield from flush()
            if title is None and heading.group(1) == "#":
                title = heading.group(2)
            else:
                para.append(heading.group(2))
                yield from flush()
        elif line.strip():
            para.append(line.strip())
        else:
            yield from flush()
    yield from flush()


_SKIP_TAGS = {"script", "style", "noscript", "template", "svg", "head"}
_BLOCK_TAGS = {
    "p", "div", "br", "li", "ul", "ol", "tr", "td", "th", "table", "section", "article", "header", "footer", "main",
    "aside", "nav", "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dd", "dt", "dl", "hr", "figure",
    "figcaption", "form", "body", "html",
}


class _TextHTMLParser(HTMLParser):
    """Collects visible text, breaking paragraphs at block-level tags; remembers the <title>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.skip_depth = 0
        self.in_title = False
        self.title = ""
        self.buf: list[str] = []
        self.paragraphs: list[str] = []

    def _break(self):
        text = " ".join("".join(self.buf).split())
        self.buf.clear()
        if text:
            self.paragraphs.append(text)

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        elif tag in _SKIP_TAGS:
            self.skip_depth += 1
        elif tag in _BLOCK_TAGS:
            self._break()

    def handle_startendtag(self, tag, attrs):
        if tag in _BLOCK_TAGS:
            self._break()

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        elif tag in _SKIP_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in _BLOCK_TAGS:
            self._break()

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        elif not self.skip_depth:
            self.buf.append(data)


def _html_blocks(f: IO[str], on_bytes) -> Iterator[Block]:
    parser = _TextHTMLParser()
    done = False
    while not done:
        piece = f.read(READ_BLOCK)
        if on_bytes and piece:
            on_bytes(len(piece.encode("utf-8")))
        if piece:
            parser.feed(piece)
        else:
            parser.close()
            parser._break()
            done = True
        title = " ".join(parser.title.split())
        for text in parser.paragraphs:
            yield Block(text, title)
        parser.paragraphs.clear()


def _jsonl_blocks(path: Path, lines: Iterable[str]) -> Iterator[Block]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RetrieverError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise RetrieverError(f'{path}:{lineno}: each line must be a JSON object with a "text" string.')
        title = record.get("title") or ""
        url = record.get("url") or ""
        if not isinstance(title, str) or not isinstance(url, str):
            raise RetrieverError(f'{path}:{lineno}: "title" and "url" must be strings.')
        for para in re.split(r"\n\s*\n", record["text"]):
            text = " ".join(para.split())
            if text:
                yield Block(text, title.strip(), url.strip(), record=lineno)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _pieces(text: str, max_words: int) -> list[str]:
    """Split a paragraph longer than ``max_words`` at sentence ends (or, failing that, between words)."""
    words = text.split()
    if len(words) <= max_words:
        return [text]
    out: list[str] = []
    cur: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        s_words = sentence.split()
        while len(s_words) > max_words:  # one enormous "sentence"
            if cur:
                out.append(" ".join(cur))
                cur = []
            out.append(" ".join(s_words[:max_words]))
            s_words = s_words[max_words:]
        if cur and len(cur) + len(s_words) > max_words:
            out.append(" ".join(cur))
            cur = []
        cur.extend(s_words)
    if cur:
        out.append(" ".join(cur))
    return out


def _overlap_tail(text: str, overlap: int, partial: bool = True) -> str:
    """The last whole sentences of ``text`` within ``overlap`` words, else (if ``partial``) its last ``overlap`` words."""
    if overlap <= 0:
        return ""
    sentences = _SENTENCE_END.split(text)
    tail: list[str] = []
    n = 0
    for sentence in reversed(sentences[1:]):  # never the whole passage
        k = len(sentence.split())
        if n + k > overlap:
            break
        tail.insert(0, sentence)
        n += k
    if tail or not partial:
        return " ".join(tail)
    return " ".join(text.split()[-overlap:])


@dataclass(frozen=True)
class Chunk:
    text: str
    title: str
    url: str
    record: int


def chunk_blocks(blocks: Iterable[Block], target: int = 160, max_words: int = 200, overlap: int = 30) -> Iterator[Chunk]:
    """Pack paragraphs into passages of ~``target`` words (at most ``max_words``), with ``overlap`` words carried over.

    Passages never span two JSONL records.
    """
    cur: list[str] = []
    cur_words = 0
    fresh = 0  # words in ``cur`` that are not overlap from the previous passage
    key: tuple | None = None

    def emit() -> Chunk:
        return Chunk("\n\n".join(cur), key[0], key[1], key[2])

    for block in blocks:
        block_key = (block.title, block.url, block.record)
        if key is not None and block_key != key:
            if fresh:
                yield emit()
            cur, cur_words, fresh = [], 0, 0
        key = block_key
        for piece in _pieces(block.text, max_words):
            n = len(piece.split())
            if cur_words + n > max_words:
                if fresh:
                    yield emit()
                    tail = _overlap_tail(cur[-1], min(overlap, max_words - n))
                else:  # only overlap so far: shrink it so the passage stays within max_words
                    tail = _overlap_tail(" ".join(cur), max_words - n, partial=False)
                cur = [tail] if tail else []
                cur_words, fresh = len(tail.split()), 0
            cur.append(piece)
            cur_words += n
            fresh += n
            if cur_words >= target:
                yield emit()
                tail = _overlap_tail(piece, overlap)
                cur = [tail] if tail else []
                cur_words, fresh = len(tail.split()), 0
    if fresh:
        yield emit()
