"""Repetition and safety filters: pure functions, no model."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatbot.filters import FilterError, RepetitionFilter, SafetyFilter, longest_common_run, repeats_itself, words


def test_words_lowercase_keep_inner_apostrophes():
    assert words("Don't STOP, me-now!") == ["don't", "stop", "me", "now"]


@pytest.mark.parametrize("a, b, expected", [
    ("a b c d", "x b c y", 2),
    ("a b c", "a b c", 3),
    ("a b c", "c b a", 1),
    ("a b a b c", "a b c", 3),
    ("", "a b", 0),
])
def test_longest_common_run(a, b, expected):
    assert longest_common_run(a.split(), b.split()) == expected


def test_repeats_itself():
    assert repeats_itself(words("i don't know, i don't know"), 3)
    assert repeats_itself(words("lol lol lol lol"), 3)
    assert not repeats_itself(words("no no no"), 3)
    assert not repeats_itself(words("i like it and i like pizza"), 3)


def test_copy_of_an_earlier_turn_is_dropped():
    context = ["hi", "I love hiking in the mountains", "How are you?"]
    f = RepetitionFilter()
    assert f.check(context, [
        "how are you",  # copies the last turn
        "i love hiking in the mountains too",  # contains a whole earlier turn
        "I'm good, how are you?",  # quotes the last turn, but the copy is 3 of its 5 words (< 0.8)
        "hi",  # a greeting echo is too short to count
        "i went hiking yesterday",
    ]) == ["repetition", "repetition", None, None, None]


def test_self_repetition_and_switching_it_off():
    text = "i like it i like it"
    assert RepetitionFilter().check(["hello"], [text]) == ["self_repetition"]
    assert RepetitionFilter(self_ngram=0).check(["hello"], [text]) == [None]


def test_repetition_thresholds_are_configurable():
    context = ["hi how are you"]
    assert RepetitionFilter().check(context, ["i'm good, how are you?"]) == [None]
    assert RepetitionFilter(turn_overlap=0.5).check(context, ["i'm good, how are you?"]) == ["repetition"]
    assert RepetitionFilter(min_overlap_words=1, turn_overlap=1.0).check(["hi"], ["hi"]) == ["repetition"]


@pytest.mark.parametrize("kwargs", [{"turn_overlap": 0}, {"turn_overlap": 1.5}, {"min_overlap_words": 0},
                                    {"self_ngram": 1}, {"self_ngram": -2}])
def test_repetition_filter_validates(kwargs):
    with pytest.raises(FilterError):
        RepetitionFilter(**kwargs)


def blocked(f: SafetyFilter, text: str) -> bool:
    return f.first_blocked(text) is not None


def test_blocklist_is_case_insensitive_and_word_boundary_aware():
    f = SafetyFilter(["ass", "kill you", "f*ck", "a.b"])
    for text in ["you ass", "ASS!", "(ass)", "I will KILL   you", "kill\nyou", "F*CK this", "x a.b y"]:
        assert blocked(f, text), text
    for text in ["class", "assume", "skill you", "kill your", "f*cking", "axb", "kill, you"]:
        assert not blocked(f, text), text
    assert f.max_phrase_words == 2


def test_blocklist_file(tmp_path):
    path = tmp_path / "block.txt"
    path.write_text("# comment\n\nbad word\n  spaced   out  \nzap\n", encoding="utf-8")
    f = SafetyFilter.from_file(path)
    assert f.phrases == ["spaced out", "bad word", "zap"]
    assert f.unsafe([], ["a BAD word", "zapped", "spaced out here"]) == [True, False, True]


def test_blocklist_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        SafetyFilter.from_file(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(FilterError, match="not UTF-8"):
        SafetyFilter.from_file(bad)


def test_empty_blocklist_blocks_nothing():
    f = SafetyFilter()
    assert f.unsafe(["hi"], ["anything at all"]) == [False]
    assert f.max_phrase_words == 1


def test_classifier_hook_sees_context_and_replies():
    calls = []

    def classifier(context, replies):
        calls.append((list(context), list(replies)))
        return ["spam" in r for r in replies]

    f = SafetyFilter(["bad"], classifier=classifier)
    assert f.unsafe(["hello"], ["buy spam", "bad one", "fine"]) == [True, True, False]
    assert calls == [(["hello"], ["buy spam", "bad one", "fine"])]
    with pytest.raises(FilterError, match="2 verdicts for 3"):
        SafetyFilter(classifier=lambda c, r: [False, False]).unsafe([], ["a", "b", "c"])


VOCAB = ["hello", "world", "ass", "class", "Ass", "kill", "you", "skill", "!", ",", "ok"]


@given(st.lists(st.sampled_from(VOCAB), max_size=12), st.sampled_from([" ", "  ", "\n"]))
def test_blocklist_matches_exactly_the_blocked_words(tokens, sep):
    """Joined by whitespace, a text is blocked iff it holds "ass" as a word or "kill" followed by "you"."""
    f = SafetyFilter(["ass", "kill you"])
    text = sep.join(tokens)
    lowered = [t.lower() for t in tokens]
    expected = "ass" in lowered or any(a == "kill" and b == "you" for a, b in zip(lowered, lowered[1:]))
    assert blocked(f, text) == expected
    if expected:
        assert re.search(r"(?i)\bass\b|\bkill\s+you\b", text)
