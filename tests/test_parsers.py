"""Every parser's output reaches the field it is declared to fill (its ``target``), whatever the reply skill's retriever.

The parser's generation is scripted (the tiny model's own text would be noise); everything around it is the real
turn: the skill files, the router, the retrievers, the prompt rendering.
"""
from __future__ import annotations

from retrievers import HashingEmbedder


class ScriptedParser:
    """The tiny model, except that a prompt ending at ``label`` (a parser's open target) gets ``output``."""

    def __init__(self, lm, label: str, output: str):
        self._lm, self.label, self.output = lm, label, output
        self.prompts: list[str] = []

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def generate(self, prompt, **kw):
        self.prompts.append(prompt)
        if prompt.endswith(self.label):
            yield " " + self.output
            return
        yield from self._lm.generate(prompt, **kw)


def bot_with(settings, lm, **changes):
    from app.server import build_bot

    return build_bot(settings.replace(**changes), lm=lm, embedder=HashingEmbedder())


def live_part(prompt: str, header: str) -> str:
    """The open query's block of a few-shot prompt: everything after its last ``header``."""
    return prompt.rsplit(header, 1)[1]


def test_dst_fills_the_state_of_a_task_oriented_skill_and_the_trace_shows_it(settings, tiny_lm):
    state = "hotel-area=north, hotel-parking=yes, hotel-pricerange=cheap"
    lm = ScriptedParser(tiny_lm, "State:", state)
    bot = bot_with(settings, lm)
    message = "I need a cheap hotel in the north with free parking for 2 nights from friday."
    stream = bot.turn([{"role": "user", "content": message}], skill="mwoz-hotel", max_tokens=3)
    stream.text()
    reply = stream.reply
    assert bot.skills.get("mwoz-hotel").retriever == "none"  # no retriever, and still the state gets through
    parse = next(s for s in reply.trace["steps"] if s["step"] == "parse")
    assert parse["skill"] == "dst" and parse["target"] == "state" and parse["output"] == state
    assert live_part(reply.prompt, "State: ").startswith(state + "\nDialogue:")
    prompt_step = next(s for s in reply.trace["steps"] if s["step"] == "prompt")
    assert prompt_step["fields"]["state"] == state


def test_wit_parse_writes_the_query_the_web_search_runs_and_its_results_reach_the_prompt(settings, tiny_lm, engines):
    query = "kiwi bird diet"
    lm = ScriptedParser(tiny_lm, "Search Query:", query)
    bot = bot_with(settings, lm, web_backend="loopback")
    stream = bot.turn([{"role": "user", "content": "what do kiwis eat?"}], skill="wit", max_tokens=3)
    stream.text()
    retrieve = next(s for s in stream.reply.trace["steps"] if s["step"] == "retrieve")
    assert retrieve["query"] == query and engines.requests[0][1]["q"] == query
    assert query in live_part(stream.reply.prompt, "Search Results:")  # the stand-in engine's pages are about the query


def test_dialkg_parse_writes_the_path_the_knowledge_graph_looks_up(settings, tiny_lm):
    lm = ScriptedParser(tiny_lm, "KG Path:", "[Inception, directed by, Christopher Nolan]")
    bot = bot_with(settings, lm)
    bot.knowledge.kg.add([("Inception", "directed by", "Christopher Nolan"),
                          ("Christopher Nolan", "born in", "London"), ("Paris", "capital of", "France")])
    stream = bot.turn([{"role": "user", "content": "who made inception?"}], skill="dialkg", max_tokens=3)
    stream.text()
    reply = stream.reply
    retrieve = next(s for s in reply.trace["steps"] if s["step"] == "retrieve")
    assert retrieve["query"] == "[Inception, directed by, Christopher Nolan]"
    graph = live_part(reply.prompt, "Knowledge Graph:").split("Dialogue:")[0]
    assert "Inception" in graph and "Christopher Nolan" in graph and "France" not in graph


def test_msc_parse_writes_memory_that_the_memory_skill_reads_back(settings, tiny_lm):
    lm = ScriptedParser(tiny_lm, "User Facts:", "I have a parrot called Kiwi.")
    bot = bot_with(settings, lm, memory=True)
    first = bot.turn([{"role": "user", "content": "My parrot Kiwi learned a new word today."}], skill="persona",
                     max_tokens=2, user="ana")
    first.text()
    bot.wait_for_memory("ana")
    assert [f.text for f in bot.knowledge.memory.list("ana")] == ["I have a parrot called Kiwi."]
    later = bot.turn([{"role": "user", "content": "what is my parrot called?"}], skill="msc", max_tokens=2,
                     user="ana")
    later.text()
    assert "I have a parrot called Kiwi." in live_part(later.reply.prompt, "User Memory:")


class LoopingParser(ScriptedParser):
    """A parser whose scripted output falls into a loop; counts the pieces read and whether the stream was closed."""

    def __init__(self, lm, label: str, head: list[str], loop: list[str]):
        super().__init__(lm, label, "")
        self.head, self.loop = head, loop
        self.read, self.closed = 0, False

    def generate(self, prompt, **kw):
        if not prompt.endswith(self.label):
            yield from self._lm.generate(prompt, **kw)
            return
        try:
            for piece in self.head + self.loop * 20:
                self.read += 1
                yield piece
        finally:
            self.closed = True


def test_loop_cut_finds_repeated_words_and_nothing_else():
    from app.bot import loop_cut

    assert loop_cut("[Jane Austen, ~writer, Jane Austen, Jane Austen,") == "[Jane Austen, ~writer, Jane Austen,"
    assert loop_cut("[Adele, ~artist, 21] [Adele, ~artist, 21]") == "[Adele, ~artist, 21]"
    assert loop_cut("[Sia, ~singer, singer, singer,") is None  # one repeated word is too short to call a loop
    assert loop_cut("[Sia, ~singer, singer, singer, singer, singer,") == "[Sia, ~singer, singer, singer,"
    for fine in ("hotel-area=centre, hotel-parking=yes, hotel-pricerange=cheap, hotel-stars=4",
                 "restaurant-book_day=saturday, restaurant-book_people=4, restaurant-book_time=19:00",
                 "[The Martian, directed_by, Ridley Scott] [Ridley Scott, ~directed_by, Gladiator]",
                 "very very cheap", "I have a dog. I have a cat.", ""):
        assert loop_cut(fine) is None, fine


def test_a_parser_in_a_loop_stops_there_and_the_retriever_gets_one_copy(settings, tiny_lm):
    lm = LoopingParser(tiny_lm, "KG Path:", [" [Jane", " Austen,", " ~writer,"], [" Jane", " Austen,"])
    bot = bot_with(settings, lm)
    bot.knowledge.kg.add([("Jane Austen", "wrote", "Emma")])
    stream = bot.turn([{"role": "user", "content": "I want to read something by Jane Austen."}], skill="dialkg",
                      max_tokens=3)
    stream.text()
    parse = next(s for s in stream.reply.trace["steps"] if s["step"] == "parse")
    assert parse["output"] == "[Jane Austen, ~writer, Jane Austen,"
    assert lm.read == 7 and lm.closed  # the second copy ended the generation; the other 38 pieces were never made
    retrieve = next(s for s in stream.reply.trace["steps"] if s["step"] == "retrieve")
    assert retrieve["query"] == parse["output"] and "Emma" in retrieve["passages"][0]["text"]


def test_the_parser_evaluation_cuts_loops_as_the_bot_does(settings, tiny_lm):
    from app.evaluation.skill_eval import Sample, evaluate
    from app.skills import SkillRegistry

    parser = SkillRegistry(settings.skills_dir).get("dialkg-parse")
    lm = LoopingParser(tiny_lm, "KG Path:", [" [Jane", " Austen,", " ~writer,"], [" Jane", " Austen,"])
    sample = Sample(record=0, turn=0, fields={"dialogue": [["Anything by Jane Austen?"]]},
                    gold={"query": "[Jane Austen, ~written_by, Emma]"})
    result = evaluate(parser, [sample], lm, "dialkg-parse", 2048, perplexity=False)
    assert result.predictions[0]["prediction"] == "[Jane Austen, ~writer, Jane Austen," and lm.closed
