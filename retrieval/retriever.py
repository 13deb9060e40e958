"""When and what to retrieve for a conversation turn: the reply engine's ``Retriever``.

A turn gets passages only if it has something to look up: after dropping greetings, fillers and
function words, at least one word of three or more letters must be left ("hi", "lol ok", "how are
you?" get none), and a passage must score at least ``min_score`` (cosine) against the query, so small
talk that happens to have a content word still gets nothing unless a passage is close.  The query is
the newest turn; a short one ("who painted it?") is prefixed with the turn before, which usually
names the topic.

Dense retrieval alone can rank a passage that merely mentions a name above the article about it
("Who painted the Mona Lisa?" scored the Qingming scroll's "China's Mona Lisa" passage 0.61 against
the Mona Lisa article's 0.60).  So the retriever fetches ``CANDIDATE_FACTOR`` times k passages and
orders them by cosine plus ``TITLE_BONUS`` when the passage's title appears in the query as a phrase:
a cheap entity match that only reorders what the index found.  Reported scores stay cosines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from retrieval.knowledge import MAX_K, Hit, KnowledgeIndex

DEFAULT_K = 3
# all-MiniLM-L6-v2 cosine: a query naming a topic scores its article 0.5-0.8; small talk against the
# Wikipedia summaries stays mostly below 0.35 (docs/knowledge.md).
DEFAULT_MIN_SCORE = 0.4
SHORT_QUERY_WORDS = 4
CANDIDATE_FACTOR = 4
TITLE_BONUS = 0.1

_FILLER = frozenset("""
a an the and or but if of to in on at by for with from as is are was were be been am do does did done
have has had i me my mine you your yours he him his she her hers it its we us our they them their this
that these those there here what who whom which when where why how not no yes yeah yep nope ok okay
hi hello hey hiya howdy bye goodbye thanks thank please sorry lol haha hahaha hmm umm uh oh wow cool
nice good great fine well so too very just really also then than can could would should will shall
may might must let lets let's i'm im you're youre it's thats that's what's whats don't dont doesn't
i've ive i'll ill i'd id gonna wanna about any some all much many more most tell know think like
love want get got go going say said see look sure right maybe things thing stuff something anything
morning evening night day today tonight doing been being fun lot
""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+|\d{3,}")


def content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in _FILLER]


def title_in_query(title: str, query: str) -> bool:
    """Whether the title (without a parenthesised qualifier: "Jupiter (god)") is a phrase of the query."""
    name = re.sub(r"\s*\(.*\)\s*$", "", title).strip().lower()
    return len(name) >= 3 and re.search(rf"(?<![a-z0-9]){re.escape(name)}(?![a-z0-9])", query.lower()) is not None


def rerank(query: str, hits: list[Hit], k: int) -> list[Hit]:
    """The k best hits by cosine plus the title bonus (stable: equal keys keep the index's order)."""
    return sorted(hits, key=lambda h: -(h.score + (TITLE_BONUS if title_in_query(h.passage.title, query) else 0.0)))[:k]


def retrieval_query(context: Sequence[str]) -> str | None:
    """The search query for a context (turn texts, oldest first), or None when the turn needs no knowledge."""
    if not context or not content_words(context[-1]):
        return None
    query = context[-1]
    if len(query.split()) < SHORT_QUERY_WORDS and len(context) >= 2:
        query = f"{context[-2]} {query}"
    return query


class KnowledgeRetriever:
    """Retrieves from whatever index ``index()`` returns at call time (the service swaps in a live one)."""

    def __init__(self, index: KnowledgeIndex | Callable[[], KnowledgeIndex | None], k: int = DEFAULT_K,
                 min_score: float = DEFAULT_MIN_SCORE):
        self._index = index if callable(index) else (lambda: index)
        self.k, self.min_score = k, min_score

    def retrieve(self, contexts: list[list[str]]) -> list[list[Hit]]:
        out: list[list[Hit]] = [[] for _ in contexts]
        index = self._index()
        if index is None:
            return out
        queries = [(i, q) for i, q in enumerate(map(retrieval_query, contexts)) if q is not None]
        if not queries:
            return out
        results = index.search_many([q for _, q in queries], min(self.k * CANDIDATE_FACTOR, MAX_K))
        for (i, query), hits in zip(queries, results):
            out[i] = rerank(query, [h for h in hits if h.score >= self.min_score], self.k)
        return out
