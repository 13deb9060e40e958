"""Rating sets: static sets from a real (tiny) model, transcript import in both layouts, and the
bad-input cases: malformed transcripts, ratings CSVs, perplexity CSVs and set files, each naming the
file and the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatbot.cli import main as chatbot_main
from chatbot.data import Conversation, CorpusError, Turn
from eval.itemset import SetError, load_set
from eval.ratings import RatingsError, read_ratings_csv
from eval.report import PerplexityFileError, read_perplexity_csv
from eval.static_set import draw_contexts
from eval.transcripts import TranscriptError, import_transcripts

MEENA_LOG = """Meena Conversation 1
Human: Hi!
Meena: Hi! How are you today?
Human: Good, you?
Meena: I'm great, just got back from a run.

Meena Conversation 2
Human: Hi!
Meena: Hey there! What's up?
"""


def test_meena_log_layout_becomes_items(tmp_path: Path) -> None:
    path = tmp_path / "meena.txt"
    path.write_text(MEENA_LOG)
    rating_set = import_transcripts(path, "meena", "Meena")
    assert rating_set.systems == {"Meena": {"kind": "imported", "model": None}}
    assert sorted((i.context, i.response) for i in rating_set.items) == [
        (("Hi!",), "Hey there! What's up?"),
        (("Hi!",), "Hi! How are you today?"),
        (("Hi!", "Hi! How are you today?", "Good, you?"), "I'm great, just got back from a run."),
    ]
    assert len(rating_set.items) == 3 and all(i.system == "Meena" for i in rating_set.items)
    assert len({i.id for i in rating_set.items}) == 3 and all("Meena" not in i.id for i in rating_set.items)


@pytest.mark.parametrize("text, line, words", [
    ("Human: Hi!\n", 1, "header"),
    ("Meena Conversation 1\nHuman: Hi!\nMeena no colon here\n", 3, "Speaker: text"),
    ("Meena Conversation 1\nHuman: Hi!\nMeena Conversation 2\nHuman: x\n", 3, "blank line"),
    ("Meena Conversation 1\nHuman: Hi!\n\nMeena Conversation 1\nMeena: x\n", 4, "twice"),
    ("Meena Conversation 1\nHuman:\n", 2, "Speaker: text"),
    ("Meena Conversation 1\nHuman: Hi\nMeena: Hello\n\nMeena Conversation 2\n", 5, "no 'Speaker: text'"),
])
def test_malformed_meena_log_names_file_and_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(TranscriptError) as info:
        import_transcripts(path, "meena", "Meena")
    assert str(info.value).startswith(f"{path}:{line}: ") and words in str(info.value)


def test_jsonl_transcripts_and_their_errors(tmp_path: Path) -> None:
    good = tmp_path / "bot.jsonl"
    good.write_text(json.dumps({"id": "c1", "turns": [{"speaker": "user", "text": "hi"}, {"speaker": "bot", "text": "hello!"},
                                                     {"speaker": "user", "text": "how are you?"},
                                                     {"speaker": "bot", "text": "fine, thanks"}]}) + "\n")
    rating_set = import_transcripts(good, "jsonl", "bot", system="otherbot")
    assert sorted(len(i.context) for i in rating_set.items) == [1, 3] and rating_set.kind == "transcripts"
    with pytest.raises(TranscriptError, match="no turn by bot speaker 'robot'.*bot, user"):
        import_transcripts(good, "jsonl", "robot")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"id": "c2", "turns": [{"speaker": "a"}]}\n')
    with pytest.raises(CorpusError, match=rf"^{bad}:2: "):
        import_transcripts(bad, "jsonl", "bot")
    # The CLI reports it as a one-line error with exit status 2.
    assert chatbot_main(["eval", "import", str(bad), "--layout", "jsonl", "--bot", "bot", "--out", str(tmp_path / "s.json")]) == 2


@pytest.mark.parametrize("body, line, words", [
    ("system,item,rater,sensible,specific\n", 1, "header"),
    ("system,item_id,rater_id,sensible,specific\nA,i1,r1,1,1\nA,i2,r1,yes,0\n", 3, "sensible must be 0 or 1"),
    ("system,item_id,rater_id,sensible,specific\nA,i1,r1,0,1\n", 2, "specific is 1 but sensible is 0"),
    ("system,item_id,rater_id,sensible,specific\nA,i1,r1,1,\n", 2, "specific must be 0 or 1"),
    ("system,item_id,rater_id,sensible,specific\nA,i1,r1,1,1\nA,i1,r1,0,0\n", 3, "already on line 2"),
    ("system,item_id,rater_id,sensible,specific\nA,i1,r1,1,1\nB,i1,r2,0,0\n", 3, "under system 'A'"),
    ("system,item_id,rater_id,sensible,specific\nA,i1,r1,1\n", 2, "expected 5 fields"),
    ("system,item_id,rater_id,sensible,specific\n,i1,r1,1,1\n", 2, "system is empty"),
    ("system,item_id,rater_id,sensible,specific\n", 1, "no ratings"),
])
def test_malformed_ratings_csv_names_file_and_line(tmp_path: Path, body: str, line: int, words: str) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text(body)
    with pytest.raises(RatingsError) as info:
        read_ratings_csv(path)
    assert str(info.value).startswith(f"{path}:{line}: ") and words in str(info.value)


def test_ratings_csv_accepts_empty_specific_when_not_sensible(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("system,item_id,rater_id,sensible,specific\nA,i1,r1,0,\nA,i1,r2,1,1\n")
    assert [(r.sensible, r.specific) for r in read_ratings_csv(path)] == [(False, False), (True, True)]


def test_malformed_perplexity_csv(tmp_path: Path) -> None:
    path = tmp_path / "ppl.csv"
    path.write_text("system,perplexity\nA,12.5\nB,lots\n")
    with pytest.raises(PerplexityFileError, match=rf"^{path}:3: perplexity must be a number"):
        read_perplexity_csv(path)
    path.write_text("name,ppl\n")
    with pytest.raises(PerplexityFileError, match=":1: "):
        read_perplexity_csv(path)


def test_malformed_set_files(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text("{not json")
    with pytest.raises(SetError, match="not valid JSON"):
        load_set(path)
    path.write_text(json.dumps({"format": "chatbot-ssa-set", "version": 1, "name": "x", "kind": "static",
                                "systems": {"a": {"kind": "model"}},
                                "items": [{"id": "1", "system": "a", "context": ["hi"]}]}))
    with pytest.raises(SetError, match=r"items\[0\]: missing field 'response'"):
        load_set(path)


def test_contexts_are_drawn_deterministically() -> None:
    convs = [Conversation(f"c{k}", tuple(Turn("ab"[t % 2], f"turn {t} of {k}") for t in range(2 + k % 4))) for k in range(20)]
    first, again = draw_contexts(convs, 12, seed=7), draw_contexts(convs, 12, seed=7)
    assert first == again and len(first) == 12 and draw_contexts(convs, 12, seed=8) != first
    assert all(1 <= len(c.turns) <= 3 for c in first) and len({c.conversation for c in first}) == 12
    more = draw_contexts(convs, 30, seed=7)  # more than there are conversations: further windows
    assert len(more) == len(set(more)) and len(more) > 20


def test_static_set_from_two_models(tmp_path: Path, tiny_model_dir: Path, small_corpus: Path) -> None:
    out = tmp_path / "static.json"
    assert chatbot_main(["eval", "static-set", "--models", f"a={tiny_model_dir}", f"b={tiny_model_dir}",
                         "--contexts", str(small_corpus), "--n", "3", "--out", str(out), "--human",
                         "--num-candidates", "2", "--max-new-tokens", "6", "--seed", "5"]) == 0
    rating_set = load_set(out)
    assert sorted(rating_set.systems) == ["a", "b", "human"] and len(rating_set.items) == 9
    assert rating_set.decoding["num_candidates"] == 2 and rating_set.decoding["seed"] == 5
    assert rating_set.systems["a"]["model"] == str(tiny_model_dir.resolve())
    # The same model and seed reply the same to each context, whichever system name it carries.
    by = {(i.system, i.context): i.response for i in rating_set.items}
    assert all(by[("a", c)] == by[("b", c)] for s, c in by if s == "a")
    # Systems are interleaved, not in blocks.
    order = [i.system for i in rating_set.items]
    assert order != sorted(order)
    with pytest.raises(ValueError, match="used twice"):
        from eval.static_set import parse_model_specs
        parse_model_specs([str(tiny_model_dir), str(tiny_model_dir)])


def test_report_computes_perplexity_for_model_systems(tmp_path: Path, tiny_model_dir: Path, small_corpus: Path) -> None:
    out = tmp_path / "static.json"
    assert chatbot_main(["eval", "static-set", "--models", f"a={tiny_model_dir}", "--contexts", str(small_corpus),
                         "--n", "4", "--out", str(out), "--human", "--num-candidates", "2", "--max-new-tokens", "4"]) == 0
    rating_set = load_set(out)
    csv_path = tmp_path / "ratings.csv"
    rows = [f"{i.system},{i.id},r{k},{int(k != 2)},{int(k == 0)}" for i in rating_set.items for k in range(3)]
    csv_path.write_text("system,item_id,rater_id,sensible,specific\n" + "\n".join(rows) + "\n")
    report_dir = tmp_path / "report"
    assert chatbot_main(["eval", "report", "--ratings", str(csv_path), "--set", str(out), "--compute-perplexity",
                         "--ppl-data", str(small_corpus), "--ppl-max-examples", "20", "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    by = {s["system"]: s for s in report["systems"]}
    # Each item: 2 of 3 sensible (a majority), 1 of 3 specific (not): sensibleness 1, specificity 0, SSA 0.5.
    assert (by["a"]["sensibleness"], by["a"]["specificity"], by["a"]["ssa"]) == (1.0, 0.0, 0.5)
    assert by["a"]["perplexity"] > 1 and by["human"]["perplexity"] is None
    assert report["fit"]["pearson_r"] is None and report["fit"]["systems"] == 1
