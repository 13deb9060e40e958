"""Retrieved human replies: training split only, marked as human replies everywhere, scored like generated
ones, and the nearest training examples shown as each reply's sources."""

from __future__ import annotations

import json

import pytest
import torch

from chatbot.cli import main
from chatbot.data import conversations, split_of
from chatbot.decoding import teacher_forced_logprobs
from chatbot.generate import DecodingConfig, ReplyEngine, contexts_to_tensor
from chatbot.modeldir import load_model
from chatbot.reply_memory import ReplyMemory, ReplyMemoryError, build_reply_memory

CONFIG = DecodingConfig(num_candidates=3, seed=4, max_new_tokens=6)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def memory_dir(tmp_path_factory, small_corpus):
    out = tmp_path_factory.mktemp("reply-memory") / "mem"
    build_reply_memory(out, data=str(small_corpus), max_examples=300, progress=False)
    return out


@pytest.fixture(scope="module")
def memory(memory_dir):
    return ReplyMemory(memory_dir, k=5)


def stored_examples(memory_dir):
    return [json.loads(line) for line in open(memory_dir / "examples.jsonl")]


def short_examples(memory_dir, loaded):
    """Examples whose reply the tiny model can score (its target limit is 31 tokens; longer replies are skipped)."""
    limit = loaded.model.config.max_target_len - 1
    return [e for e in stored_examples(memory_dir) if len(loaded.tokenizer.encode(e["reply"])) <= limit]


def test_only_training_conversations_are_in_the_reply_memory(memory_dir, small_corpus):
    held_out = {c.id for c in conversations(str(small_corpus)) if split_of(c.id) != "train"}
    stored = {e["conversation_id"] for e in stored_examples(memory_dir)}
    assert held_out and stored and not held_out & stored
    assert json.loads((memory_dir / "manifest.json").read_text())["split"] == "train"


def test_a_retrieved_human_reply_is_a_marked_candidate_scored_like_the_others(loaded, memory, memory_dir):
    example = short_examples(memory_dir, loaded)[10]
    context = example["context"]
    engine = ReplyEngine(loaded.model, loaded.tokenizer, reply_memory=memory, memory_candidates=5, memory_sources=3)
    (reply,) = engine.reply([context], CONFIG, return_candidates=True)
    human = [c for c in reply.candidates if c.kind == "conversation"]
    generated = [c for c in reply.candidates if c.kind == "generated"]
    assert len(generated) == 3 and 1 <= len(human) <= 5
    exact = next(c for c in human if c.source["conversation_id"] == example["conversation_id"]
                 and c.source["turn"] == example["turn"])
    assert exact.text == example["reply"].strip() and exact.source["similarity"] == pytest.approx(1.0, abs=1e-3)
    # Its score is the model's log-likelihood of that text, end-of-turn included, as for sampled candidates.
    src = contexts_to_tensor(loaded.tokenizer, [context], loaded.model.config.max_source_len)
    with torch.inference_mode():
        (lps,) = teacher_forced_logprobs(loaded.model, loaded.model.encode(src), [0], [exact.token_ids])
    assert exact.log_likelihood == pytest.approx(sum(lps), abs=1e-3) and exact.scored_tokens == len(lps)
    assert exact.score == pytest.approx(exact.log_likelihood)  # the default ranker: Meena's total likelihood
    # The sources explain the reply: nearest training examples with context, reply and conversation id.
    memory_sources = [s for s in reply.sources if s["kind"] == "conversation"]
    assert memory_sources and all({"conversation_id", "turn", "context", "reply", "similarity"} <= s.keys()
                                  for s in memory_sources)
    chosen = next(c for c in reply.candidates if c.dropped_by is None) if not reply.all_filtered else None
    if chosen is not None and chosen.kind == "conversation":
        assert reply.sources[0]["copied"] and reply.sources[0]["id"] == chosen.source["id"]
    else:
        assert not any(s["copied"] for s in memory_sources)


class PreferHumanReplies:
    """A ranker that puts retrieved human replies first: this test is about marking them, not ranking."""

    name = "prefer human replies"

    def search_score(self, log_likelihood: float, scored_tokens: int) -> float:
        return log_likelihood

    def scores(self, context, candidates) -> list[float]:
        return [1.0 if getattr(c, "kind", "") == "conversation" else 0.0 for c in candidates]


def test_a_chosen_human_reply_is_marked_in_the_sources(loaded, memory, memory_dir):
    example = short_examples(memory_dir, loaded)[3]
    engine = ReplyEngine(loaded.model, loaded.tokenizer, reply_memory=memory, memory_candidates=1, memory_sources=2,
                         ranker=PreferHumanReplies())
    (reply,) = engine.reply([example["context"]], CONFIG, return_candidates=True)
    human = reply.candidates[0]
    assert human.kind == "conversation" and human.dropped_by is None
    assert reply.text == human.text and reply.token_ids == human.token_ids
    assert reply.sources[0] == {**human.source, "copied": True}
    assert reply.sources[0]["title"].startswith("the reply copies training conversation")
    # The copied example is listed once, though it is also among the nearest.
    assert [s["id"] for s in reply.sources].count(human.source["id"]) == 1


def test_streaming_strategies_get_explanations_only(loaded, memory, memory_dir):
    engine = ReplyEngine(loaded.model, loaded.tokenizer, reply_memory=memory, memory_candidates=5, memory_sources=2)
    (reply,) = engine.reply([stored_examples(memory_dir)[3]["context"]],
                            DecodingConfig(strategy="greedy", max_new_tokens=5), return_candidates=True)
    assert [c.kind for c in reply.candidates] == ["generated"]
    assert len([s for s in reply.sources if s["kind"] == "conversation"]) == 2


def test_a_memory_from_another_embedder_is_refused(tmp_path, memory_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(memory_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["embedder"]["fingerprint"] = "0" * 16
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReplyMemoryError, match="another model.*chatbot memory replies"):
        ReplyMemory(copy)


def test_chat_flag_shows_the_training_examples(tiny_model_dir, memory_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("what do you do for fun?\n"))
    assert main(["chat", "--model", str(tiny_model_dir), "--seed", "1", "--num-candidates", "2",
                 "--max-new-tokens", "5", "--reply-memory", str(memory_dir), "--show-candidates"]) == 0
    err = capsys.readouterr().err
    assert "[human reply: conversation:" in err and "training examples behind the reply:" in err


def test_serve_engine_takes_the_memory_options(tiny_model_dir, memory_dir):
    from chatbot.memory import MemoryConfig
    from chatbot.serve.app import load_engine
    from chatbot.serve.config import ServeConfig

    threads = torch.get_num_threads()
    try:  # load_engine sets the process's thread count
        engine = load_engine(ServeConfig(model_dir=str(tiny_model_dir), torch_threads=1,
                                         memory=MemoryConfig(reply_memory=str(memory_dir), memory_sources=2)))
    finally:
        torch.set_num_threads(threads)
    (reply,) = engine.reply([["hi, how are you?"]], CONFIG)
    assert [s["kind"] for s in reply.sources] == ["conversation"] * len(reply.sources) and reply.sources


def test_retrieved_replies_obey_the_minimum_reply_length(loaded, memory, memory_dir):
    """A human reply shorter than min_new_tokens is not offered: sampled candidates may not end that early."""
    example = short_examples(memory_dir, loaded)[10]
    engine = ReplyEngine(loaded.model, loaded.tokenizer, reply_memory=memory, memory_candidates=5)
    limit = loaded.model.config.max_target_len - 1
    lengths = [n for hit in memory.retrieve([example["context"]])[0][:5]
               if (n := len(loaded.tokenizer.encode(hit.text))) <= limit]
    floor = sorted(lengths)[len(lengths) // 2] + 1  # above at least half of the retrieved replies
    config = DecodingConfig(num_candidates=3, seed=4, max_new_tokens=min(max(floor, 6), limit), min_new_tokens=floor)
    (reply,) = engine.reply([example["context"]], config, return_candidates=True)
    human = [c for c in reply.candidates if c.kind == "conversation"]
    assert len(human) == sum(floor <= n for n in lengths) < len(lengths)
    assert all(len(c.token_ids) >= floor for c in human)
