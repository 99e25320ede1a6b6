"""The LangChain adapter in a real LangChain chain: prompt template | FewShotBotChat | output parser."""
from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from app.integrations.langchain import FewShotBotChat


def test_in_process_chain_returns_the_bots_reply_with_skill_metadata(settings, tiny_lm):
    from app.server import build_bot
    from retrievers.embed import HashingEmbedder

    bot = build_bot(settings, lm=tiny_lm, embedder=HashingEmbedder())
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    model = FewShotBotChat(bot=bot, skill="persona", max_tokens=6)
    message = (prompt | model).invoke({"question": "hi! what do you like to do?"})
    direct = bot.turn([{"role": "user", "content": "hi! what do you like to do?"}], skill="persona", max_tokens=6)
    assert message.content == direct.text()
    assert message.response_metadata["skill"] == "persona"
    text = (prompt | model | StrOutputParser()).invoke({"question": "hi! what do you like to do?"})
    assert text == message.content
    streamed = "".join(chunk for chunk in (prompt | model | StrOutputParser()).stream(
        {"question": "hi! what do you like to do?"}))
    assert streamed == text


def test_chain_against_the_live_server_streams_the_same_reply(live_server):
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    model = FewShotBotChat(base_url=live_server.url, skill="persona", max_tokens=6)
    chain = prompt | model | StrOutputParser()
    # The tiny model has random weights: a question whose reply starts with a stop string gives an empty reply, so
    # take the first question that gives a non-empty one and check that streaming returns exactly the same text.
    for question in ("tell me about your day", "what do you like to do?", "hi! how are you?", "any pets?"):
        text = chain.invoke({"question": question})
        if text:
            break
    assert text, "every question gave an empty reply"
    assert text == "".join(chain.stream({"question": question}))
