"""The ``fsb`` command line: serve, chat, and the skill / knowledge / evaluation groups.

Domain errors become `click.ClickException` here, at the edge, and nowhere deeper.
"""
from __future__ import annotations

import sys

import click

from .settings import Settings


def model_options(fn):
    """Options shared by every command that builds a bot; each falls back to its FSB_* variable, then the default."""
    for opt in reversed([
        click.option("--model", help="HF model id or local path, 'tiny', or the default embedded:gemma-3-270m "
                                     "[env FSB_MODEL]"),
        click.option("--device", help="auto | cpu | cuda | cuda:N [env FSB_DEVICE]"),
        click.option("--data-dir", type=click.Path(file_okay=False), help="database, converted model, caches "
                                                                          "[env FSB_DATA_DIR]"),
        click.option("--skills-dir", type=click.Path(file_okay=False), help="skill files [env FSB_SKILLS_DIR]"),
    ]):
        fn = opt(fn)
    return fn


def settings_from(ctx: click.Context, **overrides) -> Settings:
    """Flags over FSB_* variables over defaults; a bad value is an error that names the variable, not a traceback."""
    try:
        return Settings.load(**overrides)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="fsb")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Few-Shot Bot: a chatbot whose every skill is learned from a few examples in a prompt.

    Settings come from flags, then FSB_* environment variables, then defaults (see the README).
    """
    ctx.obj = settings_from(ctx)


@cli.command()
@click.option("--host", help="address to bind [env FSB_HOST, default 127.0.0.1]")
@click.option("--port", type=int, help="port [env FSB_PORT, default 8000]")
@model_options
@click.pass_context
def serve(ctx, host, port, **opts) -> None:
    """Serve the web chat at / and the HTTP API (/v1/chat/completions, /api/chat) on one port."""
    from .server import CannotServe, serve as run

    try:
        run(settings_from(ctx, host=host, port=port, **opts))
    except CannotServe as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:  # Ctrl-C: the server already stopped in order; the usual status, no "Aborted!"
        raise SystemExit(130) from None


@cli.command()
@click.option("--skill", help="force this skill for every turn")
@click.option("--session", "session_id", help="resume a stored session by id")
@model_options
@click.pass_context
def chat(ctx, skill, session_id, **opts) -> None:
    """Chat in the terminal with streamed replies. Empty line or Ctrl-D quits."""
    from .bot import BadRequest
    from .lm import LMError
    from .server import build_bot
    from .storage import SessionNotFound

    settings = settings_from(ctx, **opts)
    click.echo(f"loading {settings.model} …", err=True)
    bot = build_bot(settings)
    try:
        sid = session_id or bot.store.create_session(title="terminal chat")
        bot.store.session(sid)
        if skill:
            bot.skill_for(skill)
    except (BadRequest, SessionNotFound) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"session {sid} — empty line to quit", err=True)
    for m in bot.store.messages(sid):
        click.echo(f"{'you' if m['role'] == 'user' else 'bot'}> {m['content']}")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo("", err=True)
            break
        if not line:
            break
        click.echo("bot> ", nl=False)
        try:
            stream = bot.chat(sid, line, skill=skill)
            for piece in stream:
                click.echo(piece, nl=False)
                sys.stdout.flush()
            click.echo(f"   [{stream.reply.skill}]", err=True)
        except (BadRequest, LMError) as exc:
            click.echo(f"\nerror: {exc}", err=True)


def _register() -> None:
    from .cli_knowledge import kb, kg, memory
    from .cli_skills import eval_group, skills
    from .evaluation.align_eval import align_command
    from .evaluation.retrieval_eval import retrieval_command
    from .evaluation.selector_eval import selector_command

    for command in (selector_command, align_command, retrieval_command):
        eval_group.add_command(command)
    for group in (skills, kb, kg, memory, eval_group):
        cli.add_command(group)


_register()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
