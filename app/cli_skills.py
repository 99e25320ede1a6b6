"""``fsb skills`` (list, check, show) and ``fsb eval skill``: the skill files from the command line.

The groups are plain click groups that `app.cli` adds to ``fsb``; settings come from ``ctx.obj`` when it is a
`Settings`, else from ``Settings.load()``. Domain errors (`SkillError`, `EvalError`) become click errors here.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import click
import jinja2
import yaml

from .settings import Settings
from .skills import Skill, SkillError, load_dir


def _settings(ctx: click.Context, **overrides) -> Settings:
    base = ctx.obj if isinstance(ctx.obj, Settings) else Settings.load()
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "skills_dir" in changes:
        changes["skills_dir"] = Path(changes["skills_dir"]).expanduser()
    return base.replace(**changes) if changes else base


def _skills(settings: Settings) -> dict[str, Skill]:
    _folder(settings)
    report = load_dir(settings.skills_dir)
    for err in report.errors:
        click.echo(f"warning: {err}", err=True)
    return report.skills


def _folder(settings: Settings) -> Path:
    """The skill folder, or a clear error (a mistyped FSB_SKILLS_DIR used to list nothing and exit 0)."""
    if not settings.skills_dir.is_dir():
        raise click.ClickException(f"{settings.skills_dir}: not a folder (set FSB_SKILLS_DIR or --dir to the folder "
                                   f"that holds the skill files)")
    return settings.skills_dir


def _skill(settings: Settings, name: str) -> Skill:
    skills = _skills(settings)
    if name not in skills:
        raise click.ClickException(f"unknown skill {name!r}; known: {', '.join(sorted(skills)) or 'none'} "
                                   f"(in {settings.skills_dir})")
    return skills[name]


def _maybe_skill(settings: Settings, name: str) -> Skill | None:
    return _skills(settings).get(name)


def live_problems(skill: Skill) -> list[SkillError]:
    """Problems a live turn would hit that the examples cannot show: a field the template needs with no default.

    A turn brings only the dialogue (and what the retriever or parser adds), so every other field the template uses
    must have a value under ``defaults:``.
    """
    sample = skill.examples[0].get("dialogue") or [["", ""]]
    first_user = next((str(t[0]) for t in sample if t and t[0]), "") or "-"
    fields = {"dialogue": [[first_user, ""]]}
    try:
        skill.render_query(fields)
    except jinja2.UndefinedError as exc:
        return [SkillError(skill.path, _defaults_line(skill), f"a live turn cannot render: {exc.message}; give the "
                                                               f"field a value under defaults:")]
    except SkillError as exc:
        return [exc]
    except Exception as exc:  # noqa: BLE001 - any template failure is the author's to fix
        return [SkillError(skill.path, _defaults_line(skill), f"a live turn cannot render: {exc}")]
    return []


def _defaults_line(skill: Skill) -> int:
    try:
        lines = Path(skill.path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return 1
    for key in ("defaults:", "template:"):
        for i, line in enumerate(lines, 1):
            if line.startswith(key):
                return i
    return 1


# ------------------------------------------------------------------------------------------------ fsb skills
@click.group()
def skills() -> None:
    """Skill files: list them, validate them, show a rendered prompt."""


@skills.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON list of objects")
@click.option("--dir", "skills_dir", type=click.Path(file_okay=False), help="skill folder [env FSB_SKILLS_DIR]")
@click.pass_context
def skills_list(ctx, as_json, skills_dir) -> None:
    """Every loaded skill: name, kind, retriever, query skill, examples, description."""
    settings = _settings(ctx, skills_dir=skills_dir)
    rows = [{"name": s.name, "kind": s.kind, "retriever": s.retriever, "query_skill": s.query_skill,
             "dataset": s.dataset, "examples": len(s.examples), "target": s.target, "description": s.description,
             "path": s.path} for s in sorted(_skills(settings).values(), key=lambda s: (s.kind, s.name))]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        via = f" <- {r['query_skill']}" if r["query_skill"] else ""
        click.echo(f"{r['name']:<18} {r['kind']:<9} {r['retriever'] + via:<20} {r['examples']:>2} ex  "
                   f"{r['description']}")


@skills.command("check")
@click.option("--dir", "skills_dir", type=click.Path(file_okay=False), help="skill folder [env FSB_SKILLS_DIR]")
@click.pass_context
def skills_check(ctx, skills_dir) -> None:
    """Validate every skill file; print each problem as file:line: message and exit 1 if there is any."""
    settings = _settings(ctx, skills_dir=skills_dir)
    directory = _folder(settings)
    report = load_dir(directory)
    problems = list(report.errors)
    for skill in report.skills.values():
        problems.extend(live_problems(skill))
    for err in sorted(problems, key=lambda e: (e.path, e.line)):
        click.echo(str(err))
    if problems:
        raise SystemExit(1)
    click.echo(f"{len(report.skills)} skills OK")


def _parse_fields(pairs: tuple[str, ...]) -> dict:
    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r}: expected key=value", param_hint="--field")
        try:
            fields[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            fields[key.strip()] = value
    return fields


def token_counter(settings: Settings) -> tuple[Callable[[str], int], str]:
    """The settings model's tokenizer (without loading its weights where possible), and its name."""
    if settings.model == "tiny":
        from .lm.tiny import build_tokenizer, default_corpus

        tok = build_tokenizer(default_corpus())
    else:
        from transformers import AutoTokenizer

        path = settings.model
        if path.startswith("embedded:"):
            from .lm.embedded import ensure_checkpoint

            path = str(ensure_checkpoint(settings.models_dir))
        tok = AutoTokenizer.from_pretrained(path)
    return (lambda text: len(tok(text, add_special_tokens=False).input_ids)), settings.model


@skills.command("show")
@click.argument("name")
@click.option("--dialogue", "messages", multiple=True,
              help="a message; repeat to alternate user / bot, ending on the user (default: the first example's)")
@click.option("--field", "field_pairs", multiple=True, help="key=value (value read as YAML: lists work); repeatable")
@click.option("--model", help="whose tokenizer counts tokens: 'tiny', a model id or path [env FSB_MODEL]")
@click.option("--budget", type=int, help="prompt token budget [default: context_tokens from the settings]")
@click.option("--dir", "skills_dir", type=click.Path(file_okay=False), help="skill folder [env FSB_SKILLS_DIR]")
@click.pass_context
def skills_show(ctx, name, messages, field_pairs, model, budget, skills_dir) -> None:
    """Print the prompt NAME renders for a dialogue, and its token count."""
    settings = _settings(ctx, model=model, skills_dir=skills_dir)
    skill = _skill(settings, name)
    fields = _parse_fields(field_pairs)
    if messages:
        msgs = list(messages) + ([""] if len(messages) % 2 else [])
        fields["dialogue"] = [[msgs[i], msgs[i + 1]] for i in range(0, len(msgs), 2)]
    elif "dialogue" not in fields:
        example = [list(t) + [""] for t in skill.examples[0].get("dialogue") or []]
        if skill.target == "dialogue" and example:
            example[-1][1] = ""
        fields["dialogue"] = [t[:2] for t in example]
        if skill.target == "dialogue":  # the example's own persona, knowledge, KB rows ...
            fields = {**{k: v for k, v in skill.examples[0].items() if k != "dialogue"}, **fields}
    try:
        count, counted_by = token_counter(settings)
    except Exception as exc:  # noqa: BLE001 - no tokenizer: show the prompt anyway, counted in words
        click.echo(f"warning: no tokenizer for {settings.model} ({exc}); counting words", err=True)
        count, counted_by = (lambda text: len(text.split())), "words"
    try:
        prompt = skill.prompt(fields, budget_tokens=budget or settings.context_tokens, count_tokens=count)
    except SkillError as exc:
        raise click.ClickException(str(exc)) from None
    except jinja2.UndefinedError as exc:
        raise click.ClickException(f"{skill.path}: {exc.message}; pass it with --field KEY=VALUE") from None
    click.echo(prompt.text)
    click.echo(f"--- {count(prompt.text)} tokens ({counted_by}), {prompt.examples} examples"
               + (f", {prompt.dropped} dropped to fit {budget or settings.context_tokens}" if prompt.dropped else "")
               + f"; stops at {skill.stop!r}, up to {skill.generation.max_new_tokens} new tokens", err=True)


@skills.command("try")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--message", "messages", multiple=True,
              help="a user message to try; repeatable (default: the draft's first example message)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--save", is_flag=True, help="then install the draft as <skills dir>/<name>.yaml")
@click.option("--overwrite", is_flag=True, help="with --save: replace an existing skill file of that name")
@click.option("--model", help="HF model id or path, 'tiny', or the default embedded model [env FSB_MODEL]")
@click.option("--data-dir", type=click.Path(file_okay=False), help="database and caches [env FSB_DATA_DIR]")
@click.option("--dir", "skills_dir", type=click.Path(file_okay=False), help="skill folder [env FSB_SKILLS_DIR]")
@click.pass_context
def skills_try(ctx, file, messages, as_json, save, overwrite, model, data_dir, skills_dir) -> None:
    """Try the draft skill FILE without installing it (the skill lab, `app.lab`).

    Validates it (each problem as FILE:line: message, exit 1), prints its prompt for the first message with the token
    count against the budget, then for each message the reply with the draft forced and where the router's history
    selector ranks the draft among the installed skills (rank, score, top 3).
    """
    from .bot import BadRequest
    from .lab import DraftInvalid, LabError, SkillLab, load_draft
    from .lm import LMError
    from .server import build_bot
    from .skills import SkillRegistry

    settings = _settings(ctx, model=model, skills_dir=skills_dir,
                         data_dir=Path(data_dir).expanduser() if data_dir else None)
    text = file.read_text(encoding="utf-8")
    try:  # before the model loads: a broken draft fails fast
        skill = load_draft(text, SkillRegistry(settings.skills_dir), source=str(file))
    except DraftInvalid as exc:
        if as_json:
            click.echo(json.dumps({"file": str(file), "valid": False,
                                   "errors": [{"line": e.line, "message": e.message} for e in exc.errors]}))
        for err in exc.errors:
            click.echo(str(err), err=as_json)
        raise SystemExit(1) from None
    first_user = next((str(t[0]) for t in skill.examples[0].get("dialogue") or [] if t and t[0]), "")
    messages = list(messages) or [first_user]
    click.echo(f"loading {settings.model} …", err=True)
    bot = build_bot(settings)
    lab = SkillLab(bot)
    out: dict = {"file": str(file), "valid": True, "skill": skill.name, "kind": skill.kind, "messages": []}
    try:
        rendered = lab.render(text, messages[0])
        out["prompt"] = rendered.to_json()
        if not as_json:
            click.echo(f"{file}: valid, {skill.kind} skill {skill.name}, {len(skill.examples)} examples")
            click.echo(f"--- prompt for {messages[0]!r}\n{rendered.text}\n--- {rendered.summary()}")
        for message, rank in zip(messages, lab.rank(text, messages)):
            reply = lab.chat(text, [{"role": "user", "content": message}])
            out["messages"].append({"message": message, "reply": reply.text, "skill": reply.skill,
                                    "rank": rank.to_json()})
            if not as_json:
                click.echo(f"\n> {message}\n{reply.skill}: {reply.text}\n{_rank_line(rank)}")
        if save:
            out["saved"] = str(lab.save(text, overwrite=overwrite))
            if not as_json:
                click.echo(f"\nsaved {out['saved']}")
    except (LabError, BadRequest, LMError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        bot.close()
    if as_json:
        click.echo(json.dumps(out))


def _rank_line(rank) -> str:
    if rank.rank is None:
        return f"rank: - ({rank.note})"
    top = ", ".join(f"{n} {s:.3f}" for n, s in rank.top)
    how = "" if rank.shortlisted else "; embedding score, outside the hybrid shortlist"
    return f"rank {rank.rank} of {rank.of} ({rank.method}): {rank.skill} {rank.score:.3f}{how} · top: {top}"


# -------------------------------------------------------------------------------------------------- fsb eval
@click.group("eval")
def eval_group() -> None:
    """Measure skills and the selector on dialogue data shaped like shared/data (see its README)."""


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


@eval_group.command("skill")
@click.argument("name")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="a data folder (…/fsb/wow) or its JSON file")
@click.option("--dataset", help="the data folder's kind when the path does not say it (e.g. wow, mwoz-hotel)")
@click.option("--limit", type=int, default=20, show_default=True, help="at most this many scored turns")
@click.option("--turns", type=click.Choice(["last", "all"]), default="last", show_default=True,
              help="score the last turn with a gold answer of each record, or every such turn")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--model", help="HF model id or path, 'tiny', or the default embedded model [env FSB_MODEL]")
@click.option("--no-ppl", is_flag=True, help="skip the gold reply's perplexity (response skills)")
@click.option("--predictions", type=click.Path(dir_okay=False, path_type=Path),
              help="write every prediction beside its gold reply as JSON lines")
@click.option("--chain", "chain", is_flag=True,
              help="feed the reply skill its parser's own output, as the bot does (the default)")
@click.option("--gold", "gold", is_flag=True,
              help="feed the reply skill the dataset's gold input instead (with --chain: report both)")
@click.option("--dir", "skills_dir", type=click.Path(file_okay=False), help="skill folder [env FSB_SKILLS_DIR]")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="also write DIR/skill-NAME.html: the metrics beside the paper's as bars, the first predictions")
@click.pass_context
def eval_skill(ctx, name, data_path, dataset, limit, turns, as_json, model, no_ppl, predictions, chain, gold,
               skills_dir, report_dir) -> None:
    """Run skill NAME over the records in --data and print the paper's metrics beside its GPT-J-6B figures.

    Response skills: unigram F1 and BLEU against the gold reply, knowledge F1 (kf1) where the data gives the knowledge,
    entity F1 on SMD, perplexity of the gold reply. Parsers: exact_match and query_f1 (and triple_f1 for KG paths);
    dialogue state: joint_goal_accuracy and slot_f1. All in percent.

    A reply skill whose parser fills one of its fields (the mwoz-* skills and dst's dialogue state) is measured
    as the bot runs it: the parser's own output goes in (--chain, the default); --gold feeds the dataset's gold
    input instead; both flags report both, under "chain" and "gold".
    """
    from .evaluation.skill_eval import (EvalError, chainable, chained, dataset_name, evaluate, read_records,
                                        samples_for)
    from .evaluation import report
    from .lm import LMError, load_lm

    if report_dir is not None:
        try:
            report.require()
        except report.ReportError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:  # one JSON object on stdout and nothing on stderr
        report.quiet_libraries()
    say = (lambda line: None) if as_json else (lambda line: click.echo(line, err=True))
    settings = _settings(ctx, model=model, skills_dir=skills_dir)
    skill = _skill(settings, name)
    folder = (dataset or dataset_name(data_path)).lower()
    try:
        samples = samples_for(skill, read_records(data_path), folder, turns=turns, limit=limit,
                              history=settings.history_turns)
    except EvalError as exc:
        raise click.ClickException(str(exc)) from None
    loading = time.perf_counter()
    lm = load_lm(settings, progress=say)
    which = "the last scored turn of each record" if turns == "last" else "every scored turn"
    say(f"{settings.model} loaded in {time.perf_counter() - loading:.1f} s; {len(samples)} turns of {folder} ({which})")
    parser = _maybe_skill(settings, skill.query_skill) if skill.query_skill else None
    modes = (["chain"] if chain or not gold else []) + (["gold"] if gold else [])
    if not chainable(skill, parser):
        modes = ["gold"]  # nothing a parser writes reaches this skill's template: one input, the dataset's
    budget = min(settings.context_tokens, lm.context_length)
    results = {}
    try:
        for mode in modes:
            inputs = chained(samples, parser, lm, budget, settings.history_turns) if mode == "chain" else samples
            with report.progress_bar(len(inputs), f"{name} ({mode})", quiet=as_json) as bar:
                results[mode] = evaluate(skill, inputs, lm, folder, budget, turns=turns, perplexity=not no_ppl,
                                         progress=lambda done, total: bar.update(1))
    except (LMError, SkillError) as exc:
        raise click.ClickException(str(exc)) from None
    result = results[modes[0]]
    if predictions:
        predictions.write_text("".join(json.dumps(r) + "\n" for r in result.predictions), encoding="utf-8")
    out = {**result.to_json(), "input": modes[0]}
    if parser and len(modes) == 1 and chainable(skill, parser):
        out[modes[0]] = {k: round(v, 2) for k, v in result.metrics.items()}
    if len(modes) == 2:
        out.update({mode: {k: round(v, 2) for k, v in r.metrics.items()} for mode, r in results.items()})
        out["input"] = "both"
    if report_dir is not None:
        try:
            page = report.skill_report(out, {mode: r.metrics for mode, r in results.items()},
                                       report.command_line(ctx), result.predictions)
            say(f"report: {report.write(report_dir, f'skill-{skill.name}', page)}")
        except report.ReportError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(out))
        return
    if len(modes) == 2:
        click.echo(f"{'metric':<22}{'chain':>10}{'gold':>10}")
        for key in results["chain"].metrics:
            click.echo(f"{key:<22}{_fmt(results['chain'].metrics[key]):>10}{_fmt(results['gold'].metrics.get(key)):>10}")
        click.echo("")
    click.echo(f"skill {out['skill']} on {out['dataset']} ({modes[0]} input): n={out['n']} ({turns} turns), "
               f"{out['examples']} shots, "
               f"{out['model']}, {out['seconds']} s ({out['seconds_per_sample']} s/turn)")
    click.echo(f"{'metric':<22}{'ours':>10}{'paper GPT-J-6B':>18}")
    for key, value in result.metrics.items():
        click.echo(f"{key:<22}{_fmt(value):>10}{_fmt(result.paper.get(key)):>18}")
