"""Reply measures (eval/reply_metrics.py) against values computed by hand."""

from __future__ import annotations

import math

import pytest

from chatbot.data import Conversation, Turn
from eval.reply_metrics import ReplyStatistics, distinct, reply_metrics

# R = 5 responses.  Document frequencies: yeah 3, jazz 3, i / like / is / great 1 each.
REFERENCE = ["yeah", "Yeah!", "I like jazz", "jazz is great", "yeah, jazz"]


@pytest.fixture()
def stats():
    return ReplyStatistics.from_responses(REFERENCE, top_k=1)


def test_document_frequencies_and_the_generic_list(stats):
    assert stats.responses == 5
    assert stats.document_frequency == {"yeah": 3, "i": 1, "like": 1, "jazz": 3, "is": 1, "great": 1}
    assert stats.generic == {"yeah"}  # "yeah" twice (punctuation and case dropped), every other reply once
    assert stats.is_generic("YEAH.") and not stats.is_generic("yeah jazz")
    assert stats.idf("jazz") == pytest.approx(math.log(5 / 3)) and stats.idf("unknown") is None


def test_nidf_rescales_idf_between_the_commonest_and_the_rarest_word(stats):
    # lo = log(5/3) (c_w = 3), hi = log(5) (c_w = 1): yeah and jazz -> 0, i / like / is / great -> 1
    assert stats.nidf("Yeah!") == 0.0
    assert stats.nidf("I like jazz") == pytest.approx(2 / 3)
    assert stats.nidf("jazz xyzzy great") == pytest.approx(0.5)  # the unknown word is left out
    assert stats.nidf("xyzzy") == 0.0 and stats.nidf("") == 0.0


def test_distinct_n():
    replies = [["yeah"], ["i", "like", "jazz"], ["jazz", "is", "great"]]
    assert distinct(replies, 1) == pytest.approx(6 / 7)  # jazz twice
    assert distinct(replies, 2) == 1.0
    assert distinct([["a"]], 2) == 0.0  # no bigrams at all


def test_reply_metrics_together(stats):
    m = reply_metrics(["Yeah!", "I like jazz", "jazz is great"], stats)
    assert m == pytest.approx({"mean_words": 7 / 3, "distinct_1": 6 / 7, "distinct_2": 1.0, "generic": 1 / 3,
                               "nidf": (0 + 2 / 3 + 2 / 3) / 3})
    with pytest.raises(ValueError):
        reply_metrics([], stats)


def test_statistics_from_conversations_skip_first_turns():
    convs = [Conversation("a", (Turn("x", "hello there"), Turn("y", "yeah"))),
             Conversation("b", (Turn("x", "hello"), Turn("y", "yeah"), Turn("x", "jazz")))]
    stats = ReplyStatistics.from_conversations(convs, top_k=1)
    assert stats.responses == 3 and "hello" not in stats.document_frequency and stats.generic == {"yeah"}
