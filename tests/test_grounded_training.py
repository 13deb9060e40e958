"""Training on knowledge-grounded examples beside chitchat: each grounded example's passages are stored
with it and its source is built by model_input.join_context, as generation builds it; chitchat splits
stay exactly what they were."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chatbot.data import (CorpusError, ExampleStore, MixedExamples, grounded_conversations, jsonl_conversations,
                          prepare_grounded, write_split)
from chatbot.model_input import join_context, knowledge_text
from chatbot.tokenizer import KNOWLEDGE_ID, SEP_ID, ChatTokenizer

CHITCHAT_FILES = {"tokens.bin", "turn_offsets.npy", "turn_words.npy", "examples.npy", "meta.json"}


def make_grounded_dir(directory: Path, n: int = 24) -> Path:
    """A training-data directory in `chatbot index training-data`'s format, from the shipped Wikipedia
    summaries: gold passage among two others, the reply its first sentence (no embedder needed)."""
    from retrieval.documents import sentences, wiki_documents

    docs = []
    for doc in wiki_documents():
        if len(docs) == n:
            break
        if sentences(doc.text):
            docs.append(doc)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "passages.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "title": d.title, "text": d.text, "url": d.url}) + "\n")
    with open(directory / "train.jsonl", "w") as f:
        for i, d in enumerate(docs):
            others = [docs[(i + 1) % n].id, docs[(i + 2) % n].id]
            knowledge = [others[0], d.id, others[1]] if i % 2 else [d.id, *others]
            turns = ([{"speaker": "user", "text": "hi!"}, {"speaker": "bot", "text": "hey! how's it going?"}] if i % 3 == 0 else [])
            turns += [{"speaker": "user", "text": f"what do you know about {d.title}?"},
                      {"speaker": "bot", "text": "Sure. " + sentences(d.text)[0]}]
            f.write(json.dumps({"id": f"grounded-{i:05d}", "turns": turns, "knowledge": knowledge, "gold": d.id,
                                "article": d.id, "synthetic": True}) + "\n")
    return directory


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> ChatTokenizer:
    return ChatTokenizer.load(tiny_model_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def grounded_dir(tmp_path_factory) -> Path:
    return make_grounded_dir(tmp_path_factory.mktemp("grounded"))


def test_a_grounded_example_reads_its_passages_behind_know_tokens(grounded_dir, tokenizer):
    store = ExampleStore(prepare_grounded(grounded_dir, tokenizer), max_source_len=512, max_passages=3)
    rows = [json.loads(line) for line in (grounded_dir / "train.jsonl").read_text().splitlines()]
    passages = {p["id"]: p for p in map(json.loads, (grounded_dir / "passages.jsonl").read_text().splitlines())}
    assert len(store) == len(rows)  # one example a conversation: the grounded reply (no greeting replies)
    for i, row in enumerate(rows):
        source, target = store.example(i)
        assert target.tolist() == tokenizer.encode(row["turns"][-1]["text"])[:127]  # max_target_len - 1
        gold = tokenizer.encode(knowledge_text(passages[row["gold"]]["title"], passages[row["gold"]]["text"]))
        assert source.tolist().count(KNOWLEDGE_ID) == 3
        # exactly what generation builds: context turns, then the passages in their order, by join_context
        context = [tokenizer.encode(t["text"]) for t in row["turns"][:-1]]
        knowledge = [tokenizer.encode(knowledge_text(passages[k]["title"], passages[k]["text"])) for k in row["knowledge"]]
        assert source.tolist() == join_context(context, 512, knowledge).tolist()
        where = row["knowledge"].index(row["gold"])
        start = [j for j, t in enumerate(source.tolist()) if t == KNOWLEDGE_ID][where] + 1
        assert source[start:start + 16].tolist() == gold[:16]  # the gold passage's tokens (its head at least)
        assert store.source_lengths[i] == len(source)


def test_max_passages_caps_what_an_example_reads(grounded_dir, tokenizer):
    one = ExampleStore(prepare_grounded(grounded_dir, tokenizer), max_source_len=512, max_passages=1)
    assert all(one.example(i)[0].tolist().count(KNOWLEDGE_ID) == 1 for i in range(len(one)))


def test_chitchat_splits_are_unchanged_by_knowledge(small_corpus, tokenizer, tmp_path):
    """No new files, no new meta keys, and every source is the context alone, built as before."""
    convs = list(jsonl_conversations(small_corpus))[:60]
    out = write_split(convs, tokenizer, tmp_path / "train", {"source": "x", "split": "train"}, progress=False)
    assert {p.name for p in out.iterdir()} == CHITCHAT_FILES
    meta = json.loads((out / "meta.json").read_text())
    assert not {"knowledge", "n_passages", "n_passage_tokens"} & set(meta)
    store = ExampleStore(out, max_source_len=64, max_passages=3)
    expected = []
    for conv in convs:  # the pre-knowledge definition, written out: last 7 turns joined by <sep>, cut left
        ids = [tokenizer.encode(t.text) for t in conv.turns]
        for j in range(1, len(ids)):
            flat = [x for k, turn in enumerate(ids[max(0, j - 7):j]) for x in ([SEP_ID] if k else []) + turn]
            expected.append(np.asarray(flat[-64:], dtype=np.int64).tobytes())
    assert [store.example(i)[0].tobytes() for i in range(len(store))] == expected


def test_the_mix_keeps_chitchat_examples_and_sets_the_grounded_share(small_corpus, grounded_dir, tokenizer, tmp_path):
    chat_dir = write_split(list(jsonl_conversations(small_corpus))[:80], tokenizer, tmp_path / "train", {}, progress=False)
    chat = ExampleStore(chat_dir, 64)
    grounded = ExampleStore(prepare_grounded(grounded_dir, tokenizer), 64, max_passages=3)
    mix = MixedExamples.with_share(chat, grounded, 0.3)
    n_grounded = len(mix) - len(chat)
    assert abs(n_grounded / len(mix) - 0.3) < 0.01 and n_grounded > len(grounded)  # repeated to reach the share
    for i in range(len(chat)):
        assert mix.example(i)[0].tobytes() == chat.example(i)[0].tobytes()
    assert all(KNOWLEDGE_ID in mix.example(i)[0] for i in range(len(chat), len(mix)))
    batches = mix.batches(512, seed=1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(mix)))
    batch = mix.collate(batches[0])
    assert batch.src.shape[0] == len(batches[0])
    assert len(MixedExamples.with_share(chat, grounded, None)) == len(chat) + len(grounded)
    with pytest.raises(ValueError, match="share"):
        MixedExamples.with_share(chat, grounded, 1.0)


def test_bad_grounded_data_is_refused_with_file_and_line(grounded_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "passages.jsonl").write_text((grounded_dir / "passages.jsonl").read_text())
    row = json.loads((grounded_dir / "train.jsonl").read_text().splitlines()[0])
    (bad / "train.jsonl").write_text(json.dumps(dict(row, knowledge=["wiki:No_Such_Article"])) + "\n")
    with pytest.raises(CorpusError, match=r"train.jsonl:1: knowledge passage 'wiki:No_Such_Article'"):
        list(grounded_conversations(bad))
    (bad / "train.jsonl").write_text(json.dumps(dict(row, knowledge="wiki:X")) + "\n")
    with pytest.raises(CorpusError, match="must be a list of passage ids"):
        list(grounded_conversations(bad))
    with pytest.raises(FileNotFoundError, match="training-data"):
        list(grounded_conversations(tmp_path / "missing"))


def test_fine_tune_a_chat_model_to_read_passages(tiny_model_dir, small_corpus, grounded_dir, tmp_path):
    from chatbot.modeldir import load_model
    from chatbot.train import TrainConfig, train

    common = dict(preset="tiny", data=str(small_corpus), tokenizer=str(tiny_model_dir / "tokenizer.json"),
                  init_from=str(tiny_model_dir), grounded=str(grounded_dir), grounded_share=0.3, max_steps=4,
                  warmup_steps=1, batch_tokens=1024, eval_every=4, save_every=4, progress=False)
    with pytest.raises(ValueError, match="knowledge_passages"):
        train(TrainConfig(out=str(tmp_path / "no"), **common))
    out = tmp_path / "grounded-model"
    result = train(TrainConfig(out=str(out), model_overrides=(("knowledge_passages", 3), ("max_source_len", 128)), **common))
    assert result["examples"] > 0  # validated on the chitchat valid split
    loaded = load_model(out)
    assert loaded.model.config.knowledge_passages == 3 and loaded.model.config.max_source_len == 128  # tiny's: 64
    start = load_model(tiny_model_dir).model.state_dict()
    assert any(not np.allclose(v.numpy(), start[k].numpy()) for k, v in loaded.model.state_dict().items())
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"][-1] == 4


def test_q4_counts_declining_replies_by_the_training_templates():
    """Q4's abstain share recognises every no-gold reply form, whatever topic fills it, and nothing else."""
    from bench.bench_knowledge_quality import abstain_pattern
    from retrieval.grounded_data import NO_GOLD_REPLIES

    pattern = abstain_pattern()
    for template in NO_GOLD_REPLIES:
        assert pattern.match(template.format(topic="She Lisa"))
    assert not pattern.match("Sure. The Mona Lisa was painted by Leonardo da Vinci.")
    assert not pattern.match("I don't know, what do you think?")
