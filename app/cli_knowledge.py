"""``fsb kb``, ``fsb kg`` and ``fsb memory``: the knowledge sources from the command line.

The main ``fsb`` group (``app/cli.py``) adds these with ``cli.add_command(kb)`` and so on. Each command resolves
``Settings`` once (``ctx.obj`` when the main group put it there), opens the database at ``settings.db_path``, and
turns :class:`~retrievers.RetrieverError` into a ``click.ClickException`` here, at the edge.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click

from retrievers.db import open_db
from app.settings import Settings


def _settings(ctx: click.Context) -> Settings:
    obj = ctx.obj if ctx is not None else None
    return obj if isinstance(obj, Settings) else Settings.load()


def _db(ctx: click.Context):
    return open_db(_settings(ctx).db_path)


def _passages_out(passages, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([asdict(p) for p in passages], ensure_ascii=False, indent=2))
        return
    if not passages:
        click.echo("No results.")
    for i, p in enumerate(passages, start=1):
        head = f"{i}. [{p.score:.4f}] {p.source}"
        if p.title:
            head += f"  ({p.title})"
        click.echo(head)
        click.echo("   " + p.text.replace("\n", "\n   "))


# -- kb -------------------------------------------------------------------------------------------------------------


@click.group()
def kb():
    """The knowledge base: your own documents (text, Markdown, HTML, JSONL)."""


@kb.command("add")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.pass_context
def kb_add(ctx, paths):
    """Add files, or every supported file in a folder. Unchanged files are skipped; changed ones replaced.

    Try the shipped starter documents: fsb kb add "$(python -c 'import retrievers; print(retrievers.starter_kb_dir())')"
    """
    from retrievers import KnowledgeBase, RetrieverError, default_embedder
    from retrievers.kb import expand_paths

    knowledge = KnowledgeBase(_db(ctx), default_embedder())
    files = expand_paths(paths)
    if not files:
        raise click.ClickException("No supported files found (text, Markdown, HTML or JSONL).")
    total = 0
    for f in files:
        try:
            total += f.path.stat().st_size
        except OSError:
            pass
    failures = []
    results = []
    with click.progressbar(length=max(total, 1), label="Adding", file=sys.stderr, show_pos=False) as bar:
        for f in files:
            try:
                results.append(knowledge.add(f, progress=bar.update))
            except RetrieverError as e:
                failures.append(str(e))
    for r in results:
        click.echo(f"{r.status:9}  {r.name}  ({r.chunks} passages)")
    for message in failures:
        click.echo(f"error      {message}", err=True)
    if failures:
        raise click.ClickException(f"{len(failures)} of {len(files)} file(s) could not be added.")


@kb.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def kb_list(ctx, as_json):
    """List the files in the knowledge base, by the names their passages' sources use."""
    from retrievers import KnowledgeBase, default_embedder

    docs = KnowledgeBase(_db(ctx), default_embedder()).list()
    if as_json:  # names only, as sources show them: no absolute server path
        click.echo(json.dumps([{k: v for k, v in asdict(d).items() if k != "path"} for d in docs], indent=2))
        return
    if not docs:
        click.echo("The knowledge base is empty. Add files with: fsb kb add PATH...")
    for d in docs:
        click.echo(f"{d.name}  {d.chunks} passages  {d.title!r}  added {d.added}")


@kb.command("remove")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.pass_context
def kb_remove(ctx, paths):
    """Remove files (by path, or by the name `fsb kb list` shows) from the knowledge base; the files are not touched."""
    from retrievers import KnowledgeBase, RetrieverError, default_embedder

    knowledge = KnowledgeBase(_db(ctx), default_embedder())
    missing = []
    for p in paths:
        try:
            removed = knowledge.remove(p)
        except RetrieverError as e:
            raise click.ClickException(str(e)) from None
        if removed:
            click.echo(f"removed  {p}")
        else:
            missing.append(p)
    if missing:
        raise click.ClickException("Not in the knowledge base: " + ", ".join(missing))


@kb.command("search")
@click.argument("query")
@click.option("--k", "k", default=5, show_default=True, type=click.IntRange(1, 100), help="How many passages.")
@click.option("--mode", type=click.Choice(["hybrid", "bm25", "dense"]), default="hybrid", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def kb_search(ctx, query, k, mode, as_json):
    """Search the knowledge base."""
    from retrievers import KnowledgeBase, RetrieverError, default_embedder

    try:
        passages = KnowledgeBase(_db(ctx), default_embedder()).search(query, k, mode=mode)
    except RetrieverError as e:
        raise click.ClickException(str(e)) from None
    _passages_out(passages, as_json)


# -- kg -------------------------------------------------------------------------------------------------------------


@click.group()
def kg():
    """The knowledge graph: subject, relation, object triples."""


@kg.command("add")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=str))
@click.pass_context
def kg_add(ctx, files):
    """Load triples from TSV (subject<TAB>relation<TAB>object) or JSONL files."""
    from retrievers import KnowledgeGraph, RetrieverError

    graph = KnowledgeGraph(_db(ctx))
    for f in files:
        try:
            n = graph.add_file(f)
        except RetrieverError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"{f}: {n} new triples")
    click.echo(f"{graph.count()} triples in the knowledge graph.")


@kg.command("search")
@click.argument("entity")
@click.option("--k", "k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def kg_search(ctx, entity, k, as_json):
    """Triples about ENTITY (fuzzy), or matching triples written like [A, relation, B]."""
    from retrievers import KnowledgeGraph

    _passages_out(KnowledgeGraph(_db(ctx)).search(entity, k), as_json)


# -- memory ---------------------------------------------------------------------------------------------------------


@click.group()
def memory():
    """What the bot remembers about each user."""


@memory.command("list")
@click.argument("user")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def memory_list(ctx, user, as_json):
    """List the facts kept about USER."""
    from retrievers import LongTermMemory, RetrieverError, default_embedder

    try:
        facts = LongTermMemory(_db(ctx), default_embedder()).list(user)
    except RetrieverError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps([asdict(f) for f in facts], ensure_ascii=False, indent=2))
        return
    if not facts:
        click.echo(f"Nothing is kept about {user}.")
    for f in facts:
        click.echo(f"{f.id}\t{f.created}\t{f.text}")


@memory.command("forget")
@click.argument("user")
@click.argument("fact_id", required=False, type=int, metavar="[ID]")
@click.pass_context
def memory_forget(ctx, user, fact_id):
    """Delete one fact (ID, from `fsb memory list`) or everything kept about USER."""
    from retrievers import LongTermMemory, RetrieverError, default_embedder

    try:
        n = LongTermMemory(_db(ctx), default_embedder()).forget(user, fact_id)
    except RetrieverError as e:
        raise click.ClickException(str(e)) from None
    if fact_id is not None and n == 0:
        raise click.ClickException(f"{user} has no fact with id {fact_id}.")
    click.echo(f"Forgot {n} fact{'s' if n != 1 else ''} about {user}.")
