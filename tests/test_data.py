import json
from collections import Counter

import numpy as np
import pytest

from chatbot.data import (CorpusError, ExampleStore, SkipReport, Turn, chitchat_conversations, jsonl_conversations,
                          merge_consecutive, prepare_splits, split_of, write_split)
from chatbot.model_input import MAX_CONTEXT_TURNS
from chatbot.tokenizer import EOT_ID, SEP_ID, ChatTokenizer


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def conv_line(cid, texts):
    return json.dumps({"id": cid, "turns": [{"speaker": "ab"[i % 2], "text": t} for i, t in enumerate(texts)]})


def test_consecutive_messages_by_one_speaker_form_one_turn():
    turns = merge_consecutive([Turn("a", "hi"), Turn("a", "how are you?"), Turn("b", " "), Turn("b", "good"), Turn("a", "ok")])
    assert turns == (Turn("a", "hi how are you?"), Turn("b", "good"), Turn("a", "ok"))


def test_chitchat_loads_all_conversations_with_merged_turns():
    convs = list(chitchat_conversations())
    assert len(convs) == 7168
    assert all(a.speaker != b.speaker for c in convs[:200] for a, b in zip(c.turns, c.turns[1:]))


def test_split_is_deterministic_and_roughly_95_2_5_2_5():
    ids = [f"conv-{i}" for i in range(20000)]
    counts = Counter(split_of(i) for i in ids)
    assert [split_of(i) for i in ids[:100]] == [split_of(i) for i in ids[:100]]
    assert abs(counts["train"] / 20000 - 0.95) < 0.01
    assert abs(counts["valid"] / 20000 - 0.025) < 0.005 and abs(counts["test"] / 20000 - 0.025) < 0.005


@pytest.mark.parametrize("line,problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"turns": []}', "'id' must be a non-empty string"),
    ('{"id": "x", "turns": "hello"}', "'turns' must be a list"),
    ('{"id": "x", "turns": [{"speaker": "a"}]}', "turns[0] needs string fields"),
])
def test_malformed_line_names_file_line_and_problem(tmp_path, line, problem):
    path = write_lines(tmp_path / "c.jsonl", [conv_line("ok", ["hi", "hello"]), "", line])
    with pytest.raises(CorpusError) as err:
        list(jsonl_conversations(path))
    assert err.value.line == 3 and str(path) in str(err.value) and problem in str(err.value)


def test_duplicate_ids_are_an_error(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [conv_line("same", ["a", "b"]), conv_line("same", ["c", "d"])])
    with pytest.raises(CorpusError, match=r":2: duplicate conversation id"):
        list(jsonl_conversations(path))


def test_skip_bad_lines_reports_how_many(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [conv_line("1", ["a", "b"]), "oops", conv_line("2", ["c", "d"]), "{}"])
    report = SkipReport()
    convs = list(jsonl_conversations(path, skip_bad_lines=True, report=report))
    assert [c.id for c in convs] == ["1", "2"] and report.skipped == 2 and ":2:" in report.examples[0]


@pytest.fixture()
def store(tmp_path):
    texts = [(f"turn number {i} " + "word " * (i % 5)).strip() for i in range(12)]
    path = write_lines(tmp_path / "c.jsonl", [conv_line("long", texts), conv_line("short", ["hello", "hi there"])])
    tok = ChatTokenizer.train(texts + ["hello", "hi there"], vocab_size=300)
    out = write_split(jsonl_conversations(path), tok, tmp_path / "split", {"source": str(path)}, progress=False)
    return ExampleStore(out, max_source_len=40, max_target_len=6), tok, texts


def test_examples_use_up_to_seven_turns_cut_from_the_left(store):
    s, tok, texts = store
    assert len(s) == 11 + 1  # every turn after the first of each conversation
    last = 10  # response = texts[11]: context is texts[4:11], cut from the left to 40 tokens
    context, response = s.example(last)
    full = np.concatenate([np.r_[tok.encode(t), SEP_ID] for t in texts[11 - MAX_CONTEXT_TURNS:11]])[:-1]
    assert len(full) > 40 and np.array_equal(context, full[-40:])
    assert np.array_equal(response, tok.encode(texts[11])[:5])  # max_target_len - 1, room for </t>


def test_collate_shifts_targets_and_ends_with_end_of_turn(store):
    s, tok, texts = store
    batch = s.collate([0, 11])
    assert batch.tgt_in[:, 0].tolist() == [1, 1]
    lengths = batch.tgt_out.ne(0).sum(1)
    assert [batch.tgt_out[i, lengths[i] - 1].item() for i in range(2)] == [EOT_ID, EOT_ID]
    assert batch.tgt_in[1, 1:lengths[1]].tolist() == batch.tgt_out[1, :lengths[1] - 1].tolist()
    assert batch.words == len(texts[1].split()) + 1 + len("hi there".split()) + 1


def test_backward_direction_turns_each_example_around(store):
    """Backward: source = the response (its first max_source_len tokens), target = the context's last turn."""
    s, tok, texts = store
    back = ExampleStore(s.dir, max_source_len=4, max_target_len=6, direction="backward")
    assert len(back) == len(s)
    for i, (reply, turn) in [(0, (texts[1], texts[0])), (10, (texts[11], texts[10])), (11, ("hi there", "hello"))]:
        source, target = back.example(i)
        assert np.array_equal(source, tok.encode(reply)[:4]) and np.array_equal(target, tok.encode(turn)[:5])
        assert back.source_lengths[i] == min(len(tok.encode(reply)), 4)
        assert back.target_lengths[i] == min(len(tok.encode(turn)), 5) + 1
    batch = back.collate([0, 11])
    assert batch.tgt_out[1, :len(tok.encode("hello")) + 1].tolist() == tok.encode("hello") + [EOT_ID]
    assert batch.words == len(texts[0].split()) + 1 + len("hello".split()) + 1  # words of the targets
    with pytest.raises(ValueError, match="direction must be one of"):
        ExampleStore(s.dir, direction="sideways")


def test_batches_cover_every_example_once_within_budget(store):
    s, _, _ = store
    for seed in (None, 7):
        batches = s.batches(max_tokens=60, seed=seed)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(len(s)))
        for b in batches:
            if len(b) > 1:
                assert len(b) * (s.source_lengths[b].max() + s.target_lengths[b].max()) <= 60
    assert [b.tolist() for b in s.batches(60, seed=3, epoch=1)] == [b.tolist() for b in s.batches(60, seed=3, epoch=1)]


def test_prepare_splits_caches_by_source_and_tokenizer(small_corpus, tmp_path):
    tok = ChatTokenizer.train(["hello world"] * 10, vocab_size=300)
    first = prepare_splits(str(small_corpus), tok, ["valid"], cache_dir=tmp_path)
    stamp = (first["valid"] / "tokens.bin").stat().st_mtime_ns
    again = prepare_splits(str(small_corpus), tok, ["valid"], cache_dir=tmp_path)
    assert again == first and (again["valid"] / "tokens.bin").stat().st_mtime_ns == stamp
    meta = json.loads((first["valid"] / "meta.json").read_text())
    assert meta["tokenizer"] == tok.fingerprint() and meta["n_examples"] > 0
