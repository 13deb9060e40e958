"""Automatic measures of what replies say: length, diversity, genericness and specificity.

Words are ``chatbot.filters.words``: lowercased ``\\w+`` runs, inner apostrophes kept.

- distinct-n: unique word n-grams over all replies / all word n-grams (Li et al. 2016).
- generic: share of replies that, as a whole, equal one of the ``top_k`` most frequent responses of a
  reference corpus (the training split), after normalising (words joined by single spaces).  A reply
  that people give that often, whatever was said before, carries no content of its own.
- NIDF, the specificity proxy of See et al. (2019): IDF(w) = log(R / c_w) over the R reference
  responses, c_w of which contain w, rescaled to [0, 1] by the smallest and largest IDF of the
  reference vocabulary; a reply's NIDF is the mean over its words.  Words the reference never used are
  left out of the mean (a weak model's garbled words would otherwise look maximally specific), and a
  reply with no known word scores 0.

The reference statistics come from responses: every turn of a conversation but its first.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chatbot.filters import words

GENERIC_TOP_K = 100


def normalized(text: str) -> str:
    return " ".join(words(text))


def distinct(replies: Sequence[Sequence[str]], n: int) -> float:
    """Unique n-grams / n-grams over all replies (each a list of words); 0 when there are none."""
    grams = [tuple(r[i:i + n]) for r in replies for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass(frozen=True)
class ReplyStatistics:
    """Response counts and word document frequencies of a reference corpus."""

    responses: int  # R
    document_frequency: dict[str, int]  # c_w: responses containing w
    generic: frozenset[str]  # the top_k most frequent normalised responses (the empty one excluded)

    @classmethod
    def from_responses(cls, texts: Iterable[str], top_k: int = GENERIC_TOP_K) -> "ReplyStatistics":
        df: Counter[str] = Counter()
        whole: Counter[str] = Counter()
        total = 0
        for text in texts:
            ws = words(text)
            total += 1
            df.update(set(ws))
            if ws:
                whole[" ".join(ws)] += 1
        if not total:
            raise ValueError("no reference responses")
        # most_common breaks ties by first occurrence, so the list is deterministic for a fixed corpus order
        return cls(total, dict(df), frozenset(t for t, _ in whole.most_common(top_k)))

    @classmethod
    def from_conversations(cls, conversations: Iterable, top_k: int = GENERIC_TOP_K) -> "ReplyStatistics":
        """From ``chatbot.data.Conversation``s: every turn but each conversation's first."""
        return cls.from_responses((t.text for conv in conversations for t in conv.turns[1:]), top_k)

    def idf(self, word: str) -> float | None:
        count = self.document_frequency.get(word)
        return math.log(self.responses / count) if count else None

    def nidf(self, text: str) -> float:
        """Mean normalised IDF of the reply's known words (0 when it has none)."""
        most = max(self.document_frequency.values())
        lo, hi = math.log(self.responses / most), math.log(self.responses)  # c_w ranges over 1..most
        values = [(idf - lo) / (hi - lo) if hi > lo else 0.0
                  for idf in (self.idf(w) for w in words(text)) if idf is not None]
        return sum(values) / len(values) if values else 0.0

    def is_generic(self, text: str) -> bool:
        return normalized(text) in self.generic


def reply_metrics(texts: Sequence[str], stats: ReplyStatistics) -> dict[str, float]:
    """mean_words, distinct_1, distinct_2, generic (share), nidf (mean over replies)."""
    if not texts:
        raise ValueError("no replies to measure")
    tokens = [words(t) for t in texts]
    n = len(texts)
    return {
        "mean_words": sum(map(len, tokens)) / n,
        "distinct_1": distinct(tokens, 1),
        "distinct_2": distinct(tokens, 2),
        "generic": sum(stats.is_generic(t) for t in texts) / n,
        "nidf": sum(stats.nidf(t) for t in texts) / n,
    }
