"""One `Settings` object, resolved once and passed down.

Precedence, highest first: an explicit keyword (a CLI flag), an ``FSB_*`` environment variable, the default below.
Paths to ``skills/``, ``prompts/`` and the data directory come from here and nowhere else; ``skills/`` and
``prompts/`` default to the copies installed with the package (`packaged_dir`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

# The source checkout, for tests and benchmarks only: the product finds its files through the installed packages.
REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = "embedded:gemma-3-270m"


def packaged_dir(name: str) -> Path:
    """The folder of the data-only package ``fsb_assets.<name>`` (``skills`` or ``prompts``).

    pyproject.toml ships the repository's ``skills/`` and ``prompts/`` as these packages: in a wheel they lie under
    site-packages, in an editable install (``pip install -e .``) setuptools' import hook maps them to the checkout's
    folders. Either way the answer comes from the import system, never from the current directory.
    """
    try:
        spec = importlib.util.find_spec(f"fsb_assets.{name}")
    except ModuleNotFoundError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        # an editable install's namespace path also holds a placeholder entry for its import hook: skip it
        if Path(location).is_dir():
            return Path(location)
    raise RuntimeError(f"the packaged {name}/ folder was not found: install Few-Shot Bot (`pip install .`, or "
                       f"`pip install -e .` in a checkout) or set FSB_{name.upper()}_DIR")


def _default_skills_dir() -> Path:
    return packaged_dir("skills")


def _default_prompts_dir() -> Path:
    return packaged_dir("prompts")


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fsb"


DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on a GPU or a CPU with AMX / AVX512-BF16


@dataclass(frozen=True)
class Settings:
    """Runtime configuration. Every field maps to ``FSB_<FIELD>`` in upper case."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = EMBEDDED_MODEL
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    data_dir: Path = field(default_factory=_default_data_dir)
    skills_dir: Path = field(default_factory=_default_skills_dir)  # the installed skills/ (see packaged_dir)
    prompts_dir: Path = field(default_factory=_default_prompts_dir)
    default_skill: str = "persona"
    selector: str = "best"  # prompt | embedding | hybrid | best | off
    forced_safety: bool = True  # the safety stage judges forced skills too (off: callers' forced skills are trusted)
    safety: bool = True  # safety skills check the user's last message before the selector (needs the selector)
    fallback_skill: str = ""  # answers when no selector score is confident ("" = keep the winner)
    # The hybrid selector's cascade: an embedding winner this far ahead of the runner-up decides without the LM's
    # scoring pass (0 = always score). Fitted on selector-dev's fit half (`bench/fit_first_stage.py selector`): the
    # LM skipped on 36% (fit) / 44% (report half) of the dialogues, accuracy 0.757 on both halves either way.
    selector_sure_margin: float = 0.15
    # Example dialogues per skill in the history selector's prompts, at least (0: each skill's selector_shots); the
    # last-message stage keeps the skill files' counts, which its constants were fitted with.
    selector_shots: int = 0
    # Skills the hybrid selector's embedding ranking shortlists for the LM's scoring. Chosen on 140 of selector-dev's
    # 270 dialogues (hybrid alone: 2 -> 0.757, 3 -> 0.807, 4 -> 0.814 accuracy, macro-F1 0.738 -> 0.794 from 3 to 4;
    # the LM's pass grows with it: median 0.47 -> 0.54 s when it runs).
    selector_shortlist: int = 4
    # The hybrid selector's combination: the LM's score plus this many times the embedding score (1.0 makes the cosine a
    # tie-breaker). `bench/fit_selector.py` measures others; none has beaten 1.0 on the whole router (its docstring).
    selector_weight: float = 1.0
    # The family vote (`app.selector.FamilyVote`): a booking skill hands the turn to the sibling the last message
    # clearly asks for ("I also need a taxi" after a hotel booking) when that sibling leads by this cosine margin
    # (0 = off). Fitted by `bench/fit_family.py` on the fit halves of selector-dev and tests/data/live-chat.jsonl.
    selector_family_margin: float = 0.2
    align_variant: str = "short"  # prompts/align-<variant>.yaml
    memory: bool = True  # extract facts from user turns into long-term memory (needs a user)
    memory_skill: str = "msc-parse"
    web_backend: str = "auto"  # ddgs backend for web search
    starter_kb: bool = True  # index the shipped starter documents into an empty knowledge base
    max_message_chars: int = 8000
    max_messages: int = 200
    max_request_bytes: int = 1_000_000
    max_tokens: int = 1024  # cap on any request's max_tokens
    max_active: int = 8  # turns generating at once (their decode steps share one forward pass: continuous batching)
    max_waiting: int = 16  # turns queued behind them; beyond that: 429 with Retry-After
    queue_timeout: int = 30  # seconds a queued turn waits for a slot; beyond that: 503 with Retry-After
    rate_limit: int = 0  # requests a minute per client (API key user, else address) on the generating routes; 0 = off
    context_tokens: int = 2048  # prompt budget: examples + knowledge + history + reply
    history_turns: int = 8
    prefix_cache_entries: int = 128  # every skill's, parser's and selector's prompt head stays cached (~1-2 GB)
    # Memory (MB) for conversation checkpoints: a prompt's KV up to its last two lines, from which the next turn of the
    # same conversation prefills only what is new (`app.lm.decoding.ModelRunner.prefill`); 0 = none kept.
    checkpoint_mb: int = 512
    batching: bool = True  # concurrent turns share the model's forward passes (continuous batching)
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    # A bfloat16 model on a CPU keeps a second copy of its linear weights laid out for oneDNN where that is faster
    # (`app.lm.decoding.pack_linears`: batched decode steps ~20% faster, ~0.5 GB more for gemma-3-270m); off saves it.
    pack_weights: bool = True
    api_key: str = ""
    log_level: str = "info"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "fsb.db"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @classmethod
    def load(cls, env: dict[str, str] | None = None, **overrides) -> "Settings":
        """Build settings from ``env`` (default ``os.environ``) and keyword overrides (None means "not given")."""
        env = os.environ if env is None else env
        values: dict = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"FSB_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _coerce(f, raw)
        for name, value in overrides.items():
            if value is not None:
                values[name] = value
        for name in ("data_dir", "skills_dir", "prompts_dir"):
            if name in values:
                values[name] = Path(values[name]).expanduser()
        if values.get("dtype", "auto") not in DTYPES:
            raise ValueError(f"FSB_DTYPE must be one of {', '.join(DTYPES)}, got {values['dtype']!r}")
        return cls(**values)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


def _coerce(f: dataclasses.Field, raw: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"FSB_{f.name.upper()} must be a whole number, got {raw!r}") from None
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"FSB_{f.name.upper()} must be a number, got {raw!r}") from None
    if kind == "Path":
        return Path(raw)
    if kind == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"FSB_{f.name.upper()} must be on or off, got {raw!r}")
    return raw
