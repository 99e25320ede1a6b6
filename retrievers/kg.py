"""The knowledge graph: ``subject, relation, object`` triples, looked up by entity or by the KG-path parser's output.

Entities are matched on a normalised key (case-folded, accents and punctuation dropped, whitespace collapsed), on the
same key without a trailing parenthetical ("Zodiac (Crime Fiction Film)" is also "zodiac"), and failing both on close
spellings (difflib ratio >= ``fuzzy_cutoff``). A relation written ``~rel`` is the inverse of ``rel``: ``[A, ~rel, B]``
is stored and matched as ``[B, rel, A]``, as in OpenDialKG.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator

import sqlite_utils

from .base import LangChainRetrievable, Passage, RetrieverError
from .db import write
from .schema import ensure_schema

Triple = tuple[str, str, str]

_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)
_PAREN = re.compile(r"\s*\([^()]*\)\s*$")


def entity_key(name: str) -> str:
    """Case-, accent- and punctuation-insensitive key: ``"Martin  Campbell!"`` -> ``"martin campbell"``."""
    text = unicodedata.normalize("NFKD", name.casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return " ".join(_PUNCT.sub(" ", text).split())


def _alt_keys(name: str) -> set[str]:
    keys = {entity_key(name)}
    stripped = _PAREN.sub("", name)
    if stripped and stripped != name:
        keys.add(entity_key(stripped))
    for key in list(keys):
        if key.startswith("the "):
            keys.add(key[4:])
    keys |= {key.replace(" ", "") for key in keys}  # "Golden-Eye" and "GoldenEye"
    keys.discard("")
    return keys


def relation_key(relation: str) -> str:
    return entity_key(relation.lstrip("~"))


def canonical(subject: str, relation: str, obj: str) -> Triple:
    """Strip whitespace and turn an inverse ``~rel`` around."""
    subject, relation, obj = subject.strip(), relation.strip(), obj.strip()
    if relation.startswith("~"):
        return obj, relation[1:].strip(), subject
    return subject, relation, obj


def triple_text(subject: str, relation: str, obj: str) -> str:
    return f"{subject} {relation.replace('_', ' ')} {obj}"




def parse_paths(text: str) -> list[tuple[str, ...]]:
    """Read triples from the KG-path parser's output, forgivingly.

    Accepts ``[A, rel, B]`` groups (several per line, or a JSON list of lists), ``A | rel | B``, ``A \\t rel \\t B``,
    and ``A, rel, B`` lines. Names containing commas survive when the relation is in the middle:
    ``[Washington, D.C., capital_of, United States]`` is resolved later against known relations. Two-part groups
    ``[A, rel]`` are kept (any object). Returns tuples of 2 or more stripped parts, in order, without duplicates.
    """
    text = text.strip()
    if not text:
        return []
    groups: list[list[str]] = []
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        data = None
    if isinstance(data, list):
        items = data if data and all(isinstance(x, list) for x in data) else [data]
        for item in items:
            if all(isinstance(x, str) for x in item):
                groups.append(list(item))
    else:
        for line in text.splitlines():
            found = [m.group(1) for m in re.finditer(r"\[([^\[\]]*)\]", line)]
            if not found and line.strip():
                found = [line.strip().strip("[]")]
            for group in found:
                for sep in ("\t", "|", ";", ","):
                    if sep in group:
                        groups.append(group.split(sep))
                        break
    out: list[tuple[str, ...]] = []
    for group in groups:
        parts = tuple(p.strip().strip("\"'") for p in group)
        parts = tuple(p for p in parts if p)
        if len(parts) >= 2 and parts not in out:
            out.append(parts)
    return out


class KnowledgeGraph(LangChainRetrievable):
    """Triples in SQLite, searchable by entity name (fuzzy) or by parsed triples.

    Args:
        db: the open database.
        fuzzy_cutoff: the smallest difflib ratio for a close spelling to count as the same entity.

    Example:
        >>> kg = KnowledgeGraph(open_db(None))
        >>> kg.add([("GoldenEye", "directed_by", "Martin Campbell")])
        1
        >>> kg.lookup_paths("[Martin Campbell, ~directed_by, Goldeneye]")[0].text
        'GoldenEye directed by Martin Campbell'
    """

    name = "kg"

    def __init__(self, db: sqlite_utils.Database, *, fuzzy_cutoff: float = 0.82):
        self.db = db
        self.fuzzy_cutoff = fuzzy_cutoff
        self._index_version: tuple | None = None
        self._entities: dict[str, set[str]] = {}  # alternative key -> stored keys
        self._relations: set[str] = set()
        ensure_schema(db)

    # -- loading --------------------------------------------------------------------------------------------------

    def add(self, triples: Iterable[Triple], source: str = "") -> int:
        """Store triples (duplicates ignored); returns how many were new. All or nothing."""
        rows = []
        for subject, relation, obj in triples:
            s, r, o = canonical(subject, relation, obj)
            if not (s and r and o):
                raise RetrieverError(f"A triple needs a subject, a relation and an object: {(subject, relation, obj)!r}")
            rows.append((s, r, o, entity_key(s), entity_key(o), source))
        with write(self.db):
            before = self.db.conn.total_changes
            self.db.conn.executemany(
                "INSERT OR IGNORE INTO kg_triples (subject, relation, object, subject_key, object_key, source) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            return self.db.conn.total_changes - before

    def add_file(self, path: str | os.PathLike) -> int:
        """Load a TSV (``subject<TAB>relation<TAB>object``; ``#`` comments and a header line allowed) or JSONL file
        (``{"subject", "relation", "object"}`` objects or ``[s, r, o]`` lists). Returns the number of new triples.

        Raises:
            RetrieverError: the file is missing, not a regular file, or a line is malformed (naming file:line);
                nothing is stored then.
        """
        p = Path(path).expanduser()
        try:
            resolved = p.resolve(strict=True)
        except (OSError, RuntimeError):
            raise RetrieverError(f"{p}: no such file.") from None
        if not resolved.is_file():
            raise RetrieverError(f"{p} is not a regular file.")
        try:
            triples = list(self._read(resolved))
        except UnicodeDecodeError:
            raise RetrieverError(f"{p} is not UTF-8 text.") from None
        if not triples:
            raise RetrieverError(f"{p} holds no triples.")
        return self.add(triples, source=str(resolved))

    def _read(self, path: Path) -> Iterator[Triple]:
        jsonl = path.suffix.lower() in {".jsonl", ".ndjson", ".json"}
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                where = f"{path}:{lineno}"
                if jsonl:
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise RetrieverError(f"{where}: not valid JSON ({e.msg}).") from None
                    if isinstance(item, dict):
                        item = [item.get("subject"), item.get("relation"), item.get("object")]
                    if not (isinstance(item, list) and len(item) == 3 and all(isinstance(x, str) and x.strip() for x in item)):
                        raise RetrieverError(
                            f'{where}: expected {{"subject", "relation", "object"}} or [subject, relation, object].'
                        )
                    yield tuple(item)
                else:
                    parts = [x.strip() for x in line.rstrip("\n").split("\t")]
                    if len(parts) != 3 or not all(parts):
                        raise RetrieverError(
                            f"{where}: expected subject, relation and object separated by tabs, got {len(parts)} field(s)."
                        )
                    if lineno == 1 and [x.casefold() for x in parts] == ["subject", "relation", "object"]:
                        continue
                    yield tuple(parts)

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM kg_triples").fetchone()[0]

    # -- lookup ---------------------------------------------------------------------------------------------------

    def _refresh_index(self) -> None:
        version = self.db.execute("SELECT count(*), coalesce(max(id), 0) FROM kg_triples").fetchone()
        if version == self._index_version:
            return
        entities: dict[str, set[str]] = {}
        relations: set[str] = set()
        for subject, relation, obj in self.db.execute("SELECT subject, relation, object FROM kg_triples"):
            for name in (subject, obj):
                stored = entity_key(name)
                for alt in _alt_keys(name):
                    entities.setdefault(alt, set()).add(stored)
            relations.add(relation_key(relation))
        self._entities, self._relations, self._index_version = entities, relations, version

    def match_entity(self, name: str) -> dict[str, float]:
        """Stored entity keys that ``name`` may refer to, with a similarity in (0, 1]."""
        self._refresh_index()
        key = entity_key(name)
        if not key:
            return {}
        out: dict[str, float] = {}
        for alt in _alt_keys(name) | {key}:
            for stored in self._entities.get(alt, ()):
                out[stored] = 1.0 if stored == key else max(out.get(stored, 0), 0.95)
        if out:
            return out
        for close in difflib.get_close_matches(key, self._entities.keys(), n=5, cutoff=self.fuzzy_cutoff):
            ratio = difflib.SequenceMatcher(None, key, close).ratio()
            for stored in self._entities[close]:
                out[stored] = max(out.get(stored, 0), ratio * 0.9)
        return out

    def _triples_about(self, keys: Iterable[str]) -> list[dict]:
        keys = list(keys)
        if not keys:
            return []
        marks = ",".join("?" * len(keys))
        return list(
            self.db.query(
                f"SELECT id, subject, relation, object, subject_key, object_key FROM kg_triples "
                f"WHERE subject_key IN ({marks}) OR object_key IN ({marks}) ORDER BY id",
                keys + keys,
            )
        )

    def lookup(self, entity: str, k: int = 10) -> list[Passage]:
        """Triples whose subject or object is ``entity`` (fuzzily), subject matches first."""
        matches = self.match_entity(entity)
        scored = []
        for row in self._triples_about(matches):
            s = matches.get(row["subject_key"], 0.0)
            o = matches.get(row["object_key"], 0.0) * 0.9
            scored.append((max(s, o), row))
        return self._passages(scored, k)

    def lookup_paths(self, triples_text: str, k: int = 10) -> list[Passage]:
        """Triples matching the KG-path parser's output (see :func:`parse_paths`), best matches first.

        Each parsed ``[A, rel, B]`` scores the stored triples about A or B by how well subject, relation and object
        agree (a triple stored the other way round scores a little lower, one that only ends in A or B lower still);
        a parsed group with no known entity adds nothing.
        """
        self._refresh_index()
        best: dict[int, tuple[float, dict]] = {}
        for parts in parse_paths(triples_text):
            s, r, o = self._split(parts)
            if r.startswith("~"):
                s, r, o = o, r[1:], s
            rk = relation_key(r)
            s_match = self.match_entity(s) if s else {}
            o_match = self.match_entity(o) if o else {}
            for row in self._triples_about(set(s_match) | set(o_match)):
                rel_sim = _similarity(rk, relation_key(row["relation"]))
                forward = s_match.get(row["subject_key"], 0) * (0.5 + 0.5 * o_match.get(row["object_key"], 0))
                backward = 0.9 * o_match.get(row["subject_key"], 0) * (0.5 + 0.5 * s_match.get(row["object_key"], 0))
                # a named entity that is only the stored triple's object ("what else was Leonardo DiCaprio in?"
                # against [Titanic, starred_actors, Leonardo DiCaprio]) still finds it, below the triples it heads
                by_object = 0.5 * max(s_match.get(row["object_key"], 0), o_match.get(row["object_key"], 0))
                best_match = max(forward, backward, by_object)
                score = best_match * (0.5 + 0.5 * rel_sim) if rk else best_match * 0.5
                if score > best.get(row["id"], (0.0,))[0]:
                    best[row["id"]] = (score, row)
        return self._passages(best.values(), k)

    def _split(self, parts: tuple[str, ...]) -> tuple[str, str, str]:
        """Subject, relation, object from 2+ parts; with more than 3, the relation is a part we know as one."""
        if len(parts) == 2:
            return parts[0], parts[1], ""
        if len(parts) == 3:
            return parts
        for i in range(1, len(parts) - 1):
            if relation_key(parts[i]) in self._relations:
                return ", ".join(parts[:i]), parts[i], ", ".join(parts[i + 1:])
        return parts[0], parts[1], ", ".join(parts[2:])

    def search(self, query: str, k: int = 5) -> list[Passage]:
        """Triples for ``query``: parsed triples if it looks like the KG-path parser's output, else an entity name,
        else the entities named inside a longer question."""
        if not query or not query.strip() or k <= 0:
            return []
        if re.search(r"[\[\]\t|]", query):
            return self.lookup_paths(query, k)
        hits = self.lookup(query, k)
        if hits:
            return hits
        return self._lookup_mentions(query, k)

    def _lookup_mentions(self, text: str, k: int) -> list[Passage]:
        """Entities named exactly (by key) in a longer text, longest mentions first."""
        self._refresh_index()
        words = entity_key(text).split()
        scored: dict[int, tuple[float, dict]] = {}
        for n in range(min(8, len(words)), 0, -1):
            for i in range(len(words) - n + 1):
                gram = " ".join(words[i:i + n])
                if gram not in self._entities:
                    continue
                weight = n / len(words)
                for row in self._triples_about(self._entities[gram]):
                    score = 0.5 + 0.5 * weight
                    if score > scored.get(row["id"], (0.0,))[0]:
                        scored[row["id"]] = (score, row)
        return self._passages(scored.values(), k)

    @staticmethod
    def _passages(scored: Iterable[tuple[float, dict]], k: int) -> list[Passage]:
        ranked = sorted(scored, key=lambda x: (-x[0], x[1]["id"]))[:k]
        return [
            Passage(
                triple_text(row["subject"], row["relation"], row["object"]),
                "kg",
                round(float(score), 6),
                meta={"subject": row["subject"], "relation": row["relation"], "object": row["object"], "id": row["id"]},
            )
            for score, row in ranked
            if score > 0
        ]


def _similarity(a: str, b: str) -> float:
    if a == b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b).ratio()
