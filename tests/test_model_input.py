"""The one model-input builder: context turns, then knowledge passages behind the reserved <know> token;
and the reply engine with a retriever (sources reported; passages read only by a model trained on them)."""

from __future__ import annotations

import numpy as np

from chatbot.generate import DecodingConfig, ReplyEngine, contexts_to_tensor
from chatbot.model_input import MAX_CONTEXT_TURNS, MIN_PASSAGE_TOKENS, join_context, knowledge_text
from chatbot.tokenizer import KNOWLEDGE_ID, SEP_ID


def turns(n: int, length: int = 5) -> list[list[int]]:
    return [[100 + 10 * t + i for i in range(length)] for t in range(n)]


def test_without_knowledge_the_source_is_the_context_as_before():
    ctx = turns(9)
    out = join_context(ctx, 64)
    expected = np.concatenate([np.r_[t, SEP_ID] for t in ctx[-MAX_CONTEXT_TURNS:]])[:-1]
    assert out.tolist() == expected.tolist()
    assert join_context(ctx, 10).tolist() == expected[-10:].tolist()  # cut from the left
    assert join_context([], 10).tolist() == []


def test_knowledge_follows_the_context_behind_know_tokens_within_the_limit():
    ctx = turns(2)  # 11 tokens
    passages = [list(range(1000, 1040)), list(range(2000, 2040)), list(range(3000, 3040))]
    out = join_context(ctx, 80, passages).tolist()
    assert len(out) == 80
    assert out[:11] == join_context(ctx, 80).tolist()  # the whole (short) context first
    # 69 tokens of budget shared equally: each passage after its <know>, cut from the right to 22 tokens
    assert out[11:] == [KNOWLEDGE_ID, *passages[0][:22], KNOWLEDGE_ID, *passages[1][:22], KNOWLEDGE_ID, *passages[2][:22]]
    # a short passage leaves its share to the ones after it
    short = join_context(ctx, 80, [list(range(1000, 1005)), *passages[1:]]).tolist()
    assert short[11:18] == [KNOWLEDGE_ID, *range(1000, 1005), KNOWLEDGE_ID] and len(short) == 80
    assert short.count(KNOWLEDGE_ID) == 3 and short[-1] == 3000 + 30  # (69 - 6) // 2 - 1 = 30 tokens each
    # a budget of 53 gives three passages 16 tokens each; of 50, 15 each: then only two are read
    assert join_context(ctx, 64, passages).tolist().count(KNOWLEDGE_ID) == 3
    assert join_context(ctx, 61, passages).tolist().count(KNOWLEDGE_ID) == 2


def test_a_long_context_keeps_half_the_source():
    ctx = turns(7, length=30)
    out = join_context(ctx, 100, [list(range(1000, 1200))]).tolist()
    assert len(out) == 100 and out[50] == KNOWLEDGE_ID  # context: last 50 tokens; passage: the rest
    assert out[:50] == join_context(ctx, 50).tolist()
    tight = join_context(ctx, 100, [list(range(1000, 1200))] * 3).tolist()
    assert tight.count(KNOWLEDGE_ID) == 2  # a third passage would leave each < MIN_PASSAGE_TOKENS of room
    assert MIN_PASSAGE_TOKENS > 0


class FixedRetriever:
    def __init__(self, passages):
        self.passages, self.calls = passages, []

    def retrieve(self, contexts):
        self.calls.append(contexts)
        return [list(self.passages) if "mona" in c[-1].lower() else [] for c in contexts]


class Found:
    def __init__(self, pid, title, text, score):
        self.id, self.title, self.text, self.score = pid, title, text, score

    def source(self):
        return {"id": self.id, "title": self.title, "score": self.score}


def test_engine_reports_sources_and_feeds_passages_only_to_a_knowledge_model(tiny_model_dir):
    from chatbot.modeldir import load_model

    loaded = load_model(tiny_model_dir)
    found = [Found("wiki:Mona_Lisa", "Mona Lisa", "The Mona Lisa is a portrait by Leonardo da Vinci.", 0.8)]
    plain = ReplyEngine(loaded.model, loaded.tokenizer)
    retriever = FixedRetriever(found)
    with_kb = plain.with_retriever(retriever)
    cfg = DecodingConfig(num_candidates=3, max_new_tokens=8, seed=7)
    contexts = [["hi there"], ["tell me about the mona lisa"]]
    before = plain.reply(contexts, cfg)
    after = with_kb.reply(contexts, cfg)
    assert retriever.calls == [contexts]
    assert [r.sources for r in after] == [[], [found[0].source()]]
    assert [r.sources for r in before] == [[], []]
    # the shipped kind of model (knowledge_passages 0) reads exactly what it read before
    assert [r.text for r in after] == [r.text for r in before]
    assert all("retrieve_s" in r.timings for r in after)
    # a model trained on knowledge reads the passages after <know>
    reading = ReplyEngine(loaded.model, loaded.tokenizer, retriever=retriever, knowledge_passages=1)
    src = contexts_to_tensor(loaded.tokenizer, contexts, loaded.model.config.max_source_len,
                             reading.retrieve(contexts))
    assert KNOWLEDGE_ID not in src[0].tolist() and KNOWLEDGE_ID in src[1].tolist()
    ids = loaded.tokenizer.encode(knowledge_text(found[0].title, found[0].text))
    row = src[1].tolist()
    start = row.index(KNOWLEDGE_ID) + 1
    assert row[start:start + 5] == ids[:5]
    reading.reply(contexts, cfg)  # runs end to end with knowledge in the input


def test_a_failing_retriever_costs_the_sources_not_the_reply(tiny_model_dir):
    from chatbot.modeldir import load_model

    class Broken:
        def retrieve(self, contexts):
            raise RuntimeError("index gone")

    loaded = load_model(tiny_model_dir)
    engine = ReplyEngine(loaded.model, loaded.tokenizer, retriever=Broken())
    (reply,) = engine.reply([["tell me about the mona lisa"]], DecodingConfig(num_candidates=2, max_new_tokens=4, seed=1))
    assert reply.sources == [] and reply.text


def test_retrieval_decision_skips_small_talk():
    from retrieval.retriever import retrieval_query

    for small_talk in ["hi", "hello!", "lol ok", "how are you?", "thanks, you too", "yeah"]:
        assert retrieval_query([small_talk]) is None, small_talk
    assert retrieval_query(["tell me about the mona lisa"]) == "tell me about the mona lisa"
    assert retrieval_query(["i love jupiter", "who discovered it?"]) == "i love jupiter who discovered it?"


def test_a_passage_whose_title_the_query_names_outranks_one_that_only_mentions_it() -> None:
    from retrieval.documents import Passage
    from retrieval.knowledge import Hit
    from retrieval.retriever import TITLE_BONUS, rerank, title_in_query

    assert title_in_query("Mona Lisa", "Who painted the Mona Lisa?")
    assert title_in_query("Jupiter (god)", "tell me about jupiter")  # the qualifier is not part of the name
    assert not title_in_query("Art", "who painted the mona lisa? a smart question")  # a phrase, not a substring
    assert not title_in_query("", "anything")

    def hit(title: str, score: float) -> Hit:
        return Hit(Passage(id=title, doc_id=title, text="...", title=title), score)

    scroll, mona, raphael = hit("Along the River During the Qingming Festival", 0.61), hit("Mona Lisa", 0.60), \
        hit("Raphael", 0.51)
    assert [h.id for h in rerank("Who painted the Mona Lisa?", [scroll, mona, raphael], 2)] == \
        ["Mona Lisa", "Along the River During the Qingming Festival"]
    # The bonus only reorders close calls: a much better passage without the title keeps its place.
    far = hit("Leonardo da Vinci", 0.60 + TITLE_BONUS + 0.05)
    assert rerank("Who painted the Mona Lisa?", [far, mona], 1)[0].id == "Leonardo da Vinci"
    assert rerank("Who painted the Mona Lisa?", [scroll, mona], 2)[0].score == 0.60  # scores stay cosines
