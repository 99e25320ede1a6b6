"""Skill files: the shipped library loads and renders, every kind of bad file is reported as file:line, the registry
hot-reloads, prompts fit their budget, and `fsb eval skill` scores a scripted model exactly."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from app.cli_skills import eval_group, skills
from app.evaluation.skill_eval import evaluate, samples_for
from app.settings import REPO_ROOT, Settings
from app.skills import SkillError, SkillRegistry, load_dir, load_skill

SKILLS = REPO_ROOT / "skills"
FIXTURES = Path(__file__).parent / "fixtures" / "skills"
SELECTOR_LABELS = ["persona", "msc", "wow", "wit", "ed", "dialKG", "dailydialog", "smd-navigate", "smd-schedule",
                   "smd-weather", "mwoz-hotel", "mwoz-restaurant", "mwoz-taxi", "mwoz-train"]


def run(group, *args, settings: Settings | None = None):
    return CliRunner().invoke(group, list(args), obj=settings, catch_exceptions=False)


# ------------------------------------------------------------------------------------------- the shipped library
def test_shipped_skills_pass_check(settings):
    result = run(skills, "check", "--dir", str(SKILLS), settings=settings)
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("skills OK")


def test_shipped_library_covers_the_paper():
    report = load_dir(SKILLS)
    assert report.errors == []
    by_name = report.skills
    for label in SELECTOR_LABELS:  # the selector's evaluation labels map onto skill names, case-insensitively
        assert label.lower() in by_name and by_name[label.lower()].dataset == label
    kinds = {name: s.kind for name, s in by_name.items()}
    assert {n for n, k in kinds.items() if k == "parser"} == {"wit-parse", "dialkg-parse", "msc-parse", "dst"}
    assert {n for n, k in kinds.items() if k == "safety"} == {"safety-topic", "safety-offensive", "safety-harmful"}
    assert by_name["wit"].query_skill == "wit-parse" and by_name["wit"].retriever == "web"
    assert by_name["dialkg"].query_skill == "dialkg-parse" and by_name["dialkg"].retriever == "kg"
    assert by_name["wow"].retriever == "kb" and by_name["msc"].retriever == "memory"
    for skill in by_name.values():
        assert len(skill.examples) >= 4, skill.name
        assert skill.stop == ["\n"] and skill.separator == "\n\n", skill.name  # the paper's layout
        # A live turn brings only the dialogue: every other field needs a default.
        query = skill.render_query({"dialogue": [["hello there", ""]]})
        assert "Dialogue:\nUser: hello there" in query, skill.name


def test_every_skill_renders_within_the_tiny_models_budget(tiny_lm):
    for skill in load_dir(SKILLS).skills.values():
        prompt = skill.prompt({"dialogue": [["what should we talk about?", ""]]}, budget_tokens=4096,
                              count_tokens=tiny_lm.count_tokens)
        # A safety skill never generates (the alignment layer declines in its own voice): its examples beyond the
        # selector prompt's shots are the first stage's vote, so only those shots need to fit.
        needed = skill.selector_shots if skill.kind == "safety" else len(skill.examples)
        assert prompt.examples >= needed and prompt.dropped == len(skill.examples) - prompt.examples, skill.name
        assert prompt.text.startswith(prompt.prefix) and prompt.prefix.endswith("\n\n")


def test_list_json(settings):
    rows = json.loads(run(skills, "list", "--json", settings=settings).output)
    by_name = {r["name"]: r for r in rows}
    assert by_name["wit"] | {"description": ""} == by_name["wit"] | {
        "name": "wit", "kind": "response", "retriever": "web", "query_skill": "wit-parse", "examples": 5,
        "description": ""}
    assert all({"name", "kind", "retriever", "description", "examples"} <= set(r) for r in rows)


def test_show_prints_the_prompt_and_its_token_count(settings):
    result = CliRunner().invoke(
        skills, ["show", "wit-parse", "--model", "tiny", "--dialogue", "who painted the mona lisa?"], obj=settings)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("Dialogue:\nUser: who painted the mona lisa?\nSearch Query:\n")
    assert "tokens (tiny), 5 examples" in result.stderr


# ------------------------------------------------------------------------------------------ the exact prompt
def test_persona_prompt_is_rendered_exactly():
    persona = load_skill(SKILLS / "persona.yaml")
    prompt = persona.prompt({"persona": ["I am a pilot.", "I have a garden."],
                             "dialogue": [["hi, who are you?", "just a pilot on a day off."],
                                          ["nice! what do you do on days off?", ""]]}, max_examples=2)
    shots = (
        "Persona Information:\n"
        "I work at a bicycle repair shop.\n"
        "I have two cats named Pepper and Salt.\n"
        "I like to bake bread on weekends.\n"
        "I grew up near the sea.\n"
        "Dialogue:\n"
        "User: hi there, how is your day going?\n"
        "Assistant: pretty good! i just fixed three flat tyres at the shop. how about you?\n"
        "User: not bad, just got home from work. what kind of shop?\n"
        "Assistant: a bicycle repair shop. i love getting my hands dirty with old bikes.\n"
        "User: that sounds fun. do you have any pets?\n"
        "Assistant: yes, two cats, pepper and salt. they sleep on my bread dough if i let them!\n"
        "\n"
        "Persona Information:\n"
        "I am a retired music teacher.\n"
        "I play the cello every morning.\n"
        "My grandson visits me on sundays.\n"
        "I grow tomatoes in my garden.\n"
        "Dialogue:\n"
        "User: hello! what do you do for fun?\n"
        "Assistant: hello! i play my cello every morning, then i look after my tomatoes.\n"
        "User: i tried gardening once but everything died.\n"
        "Assistant: oh no! tomatoes are forgiving, just give them sun and water every day.\n"
        "User: do you have family nearby?\n"
        "Assistant: my grandson visits every sunday. he is learning the piano now.\n"
        "\n"
    )
    query = (
        "Persona Information:\n"
        "I am a pilot.\n"
        "I have a garden.\n"
        "Dialogue:\n"
        "User: hi, who are you?\n"
        "Assistant: just a pilot on a day off.\n"
        "User: nice! what do you do on days off?\n"
        "Assistant:"
    )
    assert prompt.prefix == shots
    assert prompt.text == shots + query
    assert (prompt.examples, prompt.dropped) == (2, 0)


def test_parser_prompt_ends_where_the_query_begins():
    dst = load_skill(SKILLS / "dst.yaml")
    text = dst.prompt({"dialogue": [["i need a taxi to the station .", ""]]}).text
    assert text.endswith("\n\nDialogue:\nUser: i need a taxi to the station .\nState:")


def test_budget_drops_examples_from_the_end_and_says_so(caplog):
    persona = load_skill(SKILLS / "persona.yaml")
    words = lambda text: len(text.split())  # noqa: E731 - a stand-in tokenizer: one token per word
    fields = {"dialogue": [["hi", ""]]}
    full = persona.prompt(fields)
    query_cost = words(persona.render_query(fields))
    shot_cost = [words(persona.render_example(e) + "\n\n") for e in persona.examples]
    budget = persona.generation.max_new_tokens + query_cost + shot_cost[0] + shot_cost[1]  # room for two shots
    with caplog.at_level(logging.INFO, logger="app.skills"):
        cut = persona.prompt(fields, budget_tokens=budget, count_tokens=words)
    assert (cut.examples, cut.dropped) == (2, 2)
    assert full.text.startswith(cut.prefix) and cut.text == cut.prefix + persona.render_query(fields)
    assert "2 of 4 examples dropped" in caplog.text
    none = persona.prompt(fields, budget_tokens=budget - shot_cost[0] - shot_cost[1], count_tokens=words)
    assert (none.examples, none.dropped, none.prefix) == (0, 4, "")


# ---------------------------------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("name, line, message", [
    ("syntax", 3, "YAML syntax error: mapping values are not allowed here"),
    ("missing", 2, "missing required key 'kind'"),
    ("retriever", 5, "unknown retriever 'google'; use one of: none, kb, kg, web, memory"),
    ("field", 14, "example 2: the template uses a field this example lacks ('persona' is undefined)"),
    ("empty", 8, "examples: List should have at least 1 item"),
    ("unknown", 8, "unknown key 'templat'"),
])
def test_each_bad_file_is_reported_with_its_line(name, line, message):
    path = FIXTURES / "broken" / f"{name}.yaml"
    with pytest.raises(SkillError) as err:
        load_skill(path)
    assert (err.value.path, err.value.line) == (str(path), line)
    assert err.value.message.startswith(message)
    assert str(err.value).startswith(f"{path}:{line}: {message}")


@pytest.mark.parametrize("key", ["1", "null", "true", "2.5"])
def test_a_key_that_is_not_a_name_is_reported_with_its_line_not_a_crash(tmp_path, key):
    """YAML takes `1: x` as a key, but a skill's keys are names (the fuzz test found the TypeError this was)."""
    text = (SKILLS / "persona.yaml").read_text(encoding="utf-8")
    (tmp_path / "persona.yaml").write_text(f"name: persona\n{key}: x\n" + text.split("\n", 1)[1], encoding="utf-8")
    with pytest.raises(SkillError) as err:
        load_skill(tmp_path / "persona.yaml")
    assert err.value.line == 2 and err.value.message.startswith(f"{key!r} is not a key name")


def test_a_trigger_that_is_not_a_regular_expression_is_reported_with_its_line(tmp_path):
    text = (SKILLS / "wit.yaml").read_text(encoding="utf-8")
    lines = text.splitlines()
    at = next(i for i, t in enumerate(lines) if t.startswith("triggers:"))
    lines[at + 1] = '  - "search (the web"'
    (tmp_path / "wit.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SkillError) as err:
        load_skill(tmp_path / "wit.yaml")
    assert err.value.line in (at + 1, at + 2)
    assert "trigger 'search (the web' is not a valid regular expression" in err.value.message


def test_selector_examples_join_the_selectors_dialogues_but_never_the_reply_prompt(tmp_path):
    from app.selector import candidates_from_skills

    shipped = load_skill(SKILLS / "wow.yaml")
    assert shipped.selector_examples and shipped.selector_prompt_shots == 4  # the shot pool (bench/pool_shots.py)
    wow = shipped.model_copy(update={"selector_prompt_shots": 0})  # without prompt shots: examples, then the rest
    candidate = candidates_from_skills([wow])[0]
    assert len(candidate.examples) == len(wow.examples) + len(wow.selector_examples)
    first_extra = wow.selector_examples[0]["dialogue"][0][0]
    assert candidate.shots == wow.selector_shots and candidate.examples[0][0][0] == wow.examples[0]["dialogue"][0][0]
    assert candidate.examples[len(wow.examples)][0][0] == first_extra  # after the examples: the prompt shots stay
    # selector_prompt_shots (ed with 4): its prompt shows its 2 examples, then 4 selector examples; the rest follow.
    # The last-message stage never takes selector examples.
    ed = load_skill(SKILLS / "ed.yaml").model_copy(update={"selector_prompt_shots": 4})
    own, pool = [e["dialogue"][0][0] for e in ed.examples], [e["dialogue"][0][0] for e in ed.selector_examples]
    pooled = candidates_from_skills([ed])[0]
    assert pooled.shots == ed.selector_shots + 4 == 6
    assert [d[0][0] for d in pooled.examples] == own[:2] + pool[:4] + own[2:] + pool[4:]
    stage = candidates_from_skills([ed], selector_examples=False)[0]
    assert stage.shots == ed.selector_shots and [d[0][0] for d in stage.examples] == own
    prompt = wow.prompt({"dialogue": [["tell me about volcanoes", ""]], "knowledge": ["Volcanoes erupt."]},
                        budget_tokens=100_000, count_tokens=lambda t: len(t.split()))
    assert first_extra not in prompt.text and prompt.examples == len(wow.examples)
    # one without a dialogue is reported at its line
    text = (SKILLS / "wow.yaml").read_text(encoding="utf-8")
    lines = text.splitlines()
    at = lines.index("selector_examples:")
    lines.insert(at + 1, "  - knowledge: [a fact with no dialogue]")
    (tmp_path / "wow.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SkillError) as err:
        load_skill(tmp_path / "wow.yaml")
    assert err.value.line == at + 2 and "selector example 1 needs a dialogue" in err.value.message


def test_duplicate_names_are_reported():
    report = load_dir(FIXTURES / "duplicate")
    assert list(report.skills) == ["dup"]
    assert [str(e) for e in report.errors] == [
        f"{FIXTURES / 'duplicate' / 'dup.yml'}:1: duplicate skill name 'dup' (also in "
        f"{FIXTURES / 'duplicate' / 'dup.yaml'})"]


def test_check_prints_every_problem_and_exits_1(settings):
    broken = FIXTURES / "broken"
    result = run(skills, "check", "--dir", str(broken), settings=settings)
    assert result.exit_code == 1
    located = [line.split(": ", 1)[0] for line in result.output.splitlines()]
    assert located == [f"{broken / 'empty.yaml'}:8", f"{broken / 'field.yaml'}:14", f"{broken / 'missing.yaml'}:2",
                       f"{broken / 'retriever.yaml'}:5", f"{broken / 'syntax.yaml'}:3",
                       f"{broken / 'unknown.yaml'}:8"]


def test_check_catches_a_field_a_live_turn_lacks(tmp_path, settings):
    text = (SKILLS / "wow.yaml").read_text(encoding="utf-8").replace("defaults:\n  knowledge: []\n", "")
    (tmp_path / "wow.yaml").write_text(text, encoding="utf-8")
    result = run(skills, "check", "--dir", str(tmp_path), settings=settings)
    assert result.exit_code == 1
    line = text.splitlines().index("template: |") + 1
    assert result.output.startswith(f"{tmp_path / 'wow.yaml'}:{line}: a live turn cannot render: 'knowledge' is "
                                    "undefined")


# ------------------------------------------------------------------------------------------------- hot reload
def test_registry_hot_reload_keeps_the_last_good_version(tmp_path):
    shutil.copy(SKILLS / "persona.yaml", tmp_path / "persona.yaml")
    registry = SkillRegistry(tmp_path)
    assert [s.name for s in registry.all()] == ["persona"] and registry.errors == []

    shutil.copy(SKILLS / "ed.yaml", tmp_path / "ed.yaml")  # a new file is picked up without a restart
    assert "ed" in registry and registry.get("ed").kind == "response"

    good = registry.get("persona")
    (tmp_path / "persona.yaml").write_text((SKILLS / "persona.yaml").read_text(encoding="utf-8").replace(
        "retriever: none", "retriever: google"), encoding="utf-8")
    assert registry.get("persona") is good  # the broken file keeps its last good version serving
    assert [(Path(e.path).name, e.line) for e in registry.errors] == [("persona.yaml", 6)]
    assert "unknown retriever 'google'" in registry.errors[0].message

    shutil.copy(SKILLS / "persona.yaml", tmp_path / "persona.yaml")  # fixed: the new version serves, no errors
    assert registry.get("persona") is not good and registry.errors == []

    (tmp_path / "ed.yaml").unlink()  # removed: gone
    assert "ed" not in registry


# ---------------------------------------------------------------------------------------------- eval plumbing
class ScriptedLM:
    """Replies from a queue, one word per token; records every prompt (llm's MockModel, in small)."""

    name = "scripted"

    def __init__(self, *replies: str):
        self.replies, self.prompts = list(replies), []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompt, stop=(), max_new_tokens=64, sampling=None, prefix=None, stats=None):
        assert prefix is None or prompt.startswith(prefix)
        self.prompts.append(prompt)
        yield " " + self.replies.pop(0)

    def score(self, context, continuations, prefix=None):
        return [-1.0 * self.count_tokens(c) for c in continuations]  # log p = -1 per token: perplexity e


def test_eval_scores_a_response_skill_exactly():
    skill = load_skill(SKILLS / "wow.yaml")
    records = [
        {"meta": [["Tea comes from the leaves of Camellia sinensis."], ["Green tea is not oxidised."]],
         "dialogue": [["i love tea", "tea comes from camellia sinensis leaves"],
                      ["what about green tea?", "green tea is not oxidised at all"]]},
        {"meta": [["Owls hunt at night."]], "dialogue": [["tell me about owls", "owls hunt at night"]]},
    ]
    samples = samples_for(skill, records, "wow", turns="last")
    assert [(s.record, s.turn) for s in samples] == [(0, 1), (1, 0)]
    lm = ScriptedLM("green tea is not oxidised at all", "owls sleep during day")
    result = evaluate(skill, samples, lm, "wow", budget_tokens=2048)
    assert lm.prompts[0].endswith("Knowledge:\nGreen tea is not oxidised.\nDialogue:\nUser: i love tea\n"
                                  "Assistant: tea comes from camellia sinensis leaves\nUser: what about green tea?\n"
                                  "Assistant:")
    # f1: 1.0, then 0.25 ("owls" is 1 of 4 words on each side) -> 62.5.
    # kf1 against the knowledge: 5 shared words of 7 predicted and 5 known -> 10/12, then 0.25 -> 54.17.
    assert result.metrics["f1"] == pytest.approx(62.5)
    assert result.metrics["kf1"] == pytest.approx(100 * (10 / 12 + 0.25) / 2)
    assert result.metrics["ppl"] == pytest.approx(2.718281828)
    assert result.paper == {"ppl": 9.45, "f1": 23.69} and result.n == 2


def test_eval_dst_joint_goal_accuracy():
    skill = load_skill(SKILLS / "dst.yaml")
    records = [{"meta": [], "dial_id": "x", "dialogue": [["i want a cheap hotel in the east .", "ok ."],
                                                          ["thanks , bye .", "none"]],
                "state": ["none", "hotel-pricerange=cheap\thotel-area=east", "hotel-pricerange=cheap\thotel-area=east"]},
               {"meta": [], "dial_id": "y", "dialogue": [["a taxi to the zoo please .", "when ?"]],
                "state": ["none", "taxi-destination=the zoo"]}]
    samples = samples_for(skill, records, "mwoz-hotel", turns="all")
    assert [s.gold["state"] for s in samples] == ["hotel-area=east, hotel-pricerange=cheap"] * 2 + [
        "taxi-destination=the zoo"]
    lm = ScriptedLM("hotel-pricerange=cheap, hotel-area=east", "hotel-area=east", "taxi-destination=the zoo")
    result = evaluate(skill, samples, lm, "mwoz-hotel", budget_tokens=2048)
    assert result.metrics["joint_goal_accuracy"] == pytest.approx(200 / 3)
    assert result.metrics["slot_f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)
    assert result.paper == {"joint_goal_accuracy": 13.9}


def test_eval_skill_command_json_on_the_tiny_model(tmp_path, settings):
    data = tmp_path / "wit-parse" / "valid.json"
    data.parent.mkdir()
    data.write_text(json.dumps([{"id": "1", "query": "kiwi bird", "dialogue": [["do kiwis fly?"]]}]))
    result = CliRunner().invoke(
        eval_group, ["skill", "wit-parse", "--data", str(data), "--limit", "1", "--json", "--model", "tiny"],
        obj=settings)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert {"skill", "n", "exact_match", "query_f1", "paper"} <= set(out)
    assert (out["skill"], out["n"], out["dataset"]) == ("wit-parse", 1, "wit-parse")


def test_eval_rejects_data_without_gold_for_the_target(tmp_path, settings):
    data = tmp_path / "ed.json"
    data.write_text(json.dumps([{"meta": [], "dialogue": [["hello", "hi"]]}]))
    result = CliRunner().invoke(
        eval_group, ["skill", "dst", "--data", str(data), "--dataset", "ed", "--model", "tiny"], obj=settings)
    assert result.exit_code == 1
    assert "has no gold 'state' for skill 'dst'" in result.stderr


def test_pool_shots_writes_the_pool_once_at_the_head_of_selector_examples(tmp_path):
    """`bench/pool_shots.py`: a dataset skill gets its pool's first dialogues at the head of ``selector_examples`` and
    ``selector_prompt_shots``; running it again changes nothing, ``--check`` says when a file differs, and a new
    ``--dialogues`` replaces the block instead of adding a second one. The file loads, our own examples after it."""
    import importlib.util
    import json

    from app.settings import REPO_ROOT

    spec = importlib.util.spec_from_file_location("pool_shots", REPO_ROOT / "bench" / "pool_shots.py")
    pool_shots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pool_shots)
    pool = tmp_path / "pool"
    (pool / "ed").mkdir(parents=True)
    records = [{"dialogue": [[f'i felt "proud" {i}', f"that is great {i}"], ["thanks", ""]]} for i in range(5)]
    (pool / "ed" / "valid.json").write_text(json.dumps(records), encoding="utf-8")
    skills = tmp_path / "skills"
    skills.mkdir()
    # the shipped file without its pool: our own selector examples only
    (skills / "ed.yaml").write_text(pool_shots.drop((SKILLS / "ed.yaml").read_text(encoding="utf-8")),
                                    encoding="utf-8")
    own = load_skill(skills / "ed.yaml").selector_examples
    assert own and load_skill(skills / "ed.yaml").selector_prompt_shots == 0

    args = ["--skills", str(skills), "--pool", str(pool), "--dialogues", "3"]
    assert pool_shots.main([*args, "--check"]) == 1
    assert pool_shots.main(args) == 0
    written = (skills / "ed.yaml").read_text(encoding="utf-8")
    assert pool_shots.main([*args, "--check"]) == 0 and pool_shots.main(args) == 0
    assert (skills / "ed.yaml").read_text(encoding="utf-8") == written
    ed = load_skill(skills / "ed.yaml")
    assert ed.selector_prompt_shots == 4
    assert [e["dialogue"] for e in ed.selector_examples[:3]] == [r["dialogue"] for r in records[:3]]
    assert ed.selector_examples[3:] == own and ed.examples == load_skill(SKILLS / "ed.yaml").examples
    assert pool_shots.main(["--skills", str(skills), "--pool", str(pool), "--dialogues", "5", "--shots", "2"]) == 0
    ed = load_skill(skills / "ed.yaml")
    assert len(ed.selector_examples) == 5 + len(own) and ed.selector_prompt_shots == 2
    # a knowledge skill gets one too; with --no-knowledge it gets none, and loses a block it had
    shutil.copytree(pool / "ed", pool / "wow")
    shipped = (SKILLS / "wow.yaml").read_text(encoding="utf-8")
    (skills / "wow.yaml").write_text(pool_shots.drop(shipped), encoding="utf-8")
    assert pool_shots.main(["--skills", str(skills), "--pool", str(pool), "--dialogues", "3"]) == 0
    wow = load_skill(skills / "wow.yaml")
    assert wow.selector_prompt_shots == 4 and [e["dialogue"] for e in wow.selector_examples[:3]] == \
        [r["dialogue"] for r in records[:3]]
    assert pool_shots.main(["--skills", str(skills), "--pool", str(pool), "--no-knowledge"]) == 0
    assert (skills / "wow.yaml").read_text(encoding="utf-8") == pool_shots.drop(shipped)
    assert load_skill(skills / "wow.yaml").selector_prompt_shots == 0


def test_selector_holdout_uses_no_dialogue_of_the_pool_or_of_selector_dev(tmp_path):
    """`bench/selector_holdout.py`: examples only from dialogues after the shot pool's first 20 that no selector-dev
    example comes from, cut like selector-dev's (at most four turns before an open user turn, the bot's reply as
    gold); the same seed writes the same file, and a label with nothing left gets no example."""
    import importlib.util
    import json

    from app.settings import REPO_ROOT

    spec = importlib.util.spec_from_file_location("selector_holdout", REPO_ROOT / "bench" / "selector_holdout.py")
    holdout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(holdout)
    pool = tmp_path / "pool"
    for label, n in (("ed", 30), ("mwoz-train", 22)):
        (pool / label).mkdir(parents=True)
        records = [{"dialogue": [[f"{label} {i} u{j}", f"{label} {i} b{j}"] for j in range(1 + i % 7)]} for i in range(n)]
        (pool / label / "valid.json").write_text(json.dumps(records), encoding="utf-8")
    dev = [{"skill": "ed", "dialogue": [["ed 25 u0", ""]], "gold_reply": "ed 25 b0"},
           {"skill": "mwoz-train", "dialogue": [["mwoz-train 20 u0", ""]], "gold_reply": "mwoz-train 20 b0"},
           {"skill": "mwoz-train", "dialogue": [["mwoz-train 21 u0", ""]], "gold_reply": "mwoz-train 21 b0"}]
    (pool / "selector-dev.jsonl").write_text("".join(json.dumps(e) + "\n" for e in dev), encoding="utf-8")
    out = tmp_path / "holdout.jsonl"
    assert holdout.main(["--pool", str(pool), "--out", str(out), "--per-label", "20"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    written = out.read_text(encoding="utf-8")
    assert {r["skill"] for r in rows} == {"ed"} and len(rows) == 9  # ed 20..29 but 25; mwoz-train has none left
    sources = {int(r["dialogue"][-1][0].split()[1]) for r in rows}
    assert sources == set(range(20, 30)) - {25}
    for r in rows:
        i, j = map(int, r["dialogue"][-1][0].replace("u", "").split()[1:])
        assert r["dialogue"][-1] == [f"ed {i} u{j}", ""] and r["gold_reply"] == f"ed {i} b{j}"
        assert r["dialogue"][:-1] == [[f"ed {i} u{k}", f"ed {i} b{k}"] for k in range(max(0, j - 4), j)]
    assert holdout.main(["--pool", str(pool), "--out", str(out), "--per-label", "20"]) == 0
    assert out.read_text(encoding="utf-8") == written
