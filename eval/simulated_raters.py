"""SIMULATED raters: a fixed, documented rule standing in for people, so the pipeline can be run end
to end without a crowd.  Their numbers measure this rule, never human judgement, and every report
built from them says so.

The rule, per response (context = the turns before it):

- **sensible** when the response has at least 2 words, at least 70% of its non-space characters are
  letters, at least half its words are distinct, it is not the engine's fallback reply, and it does not
  repeat a context turn word for word;
- **specific** when sensible and it shares a content word (4+ letters, not a stop word) with the
  context: a reply that picks up what was said, rather than one that fits any conversation;
- each simulated rater then flips each of its two judgements with probability ``noise`` (default 0.1,
  seeded per rater and item), so raters disagree a little as people do; a flip to "not sensible" makes
  the answer "not specific" too.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from chatbot.generate import FALLBACK_TEXT
from eval.rating_client import RatingClient

STOP_WORDS = frozenset("""that this with have what your about just like they them then than there their were
been from into more some very really would could should will well yeah okay sure know think thing things
want going doing much also good great nice does dont didnt cant wont im youre thats its what's i'm""".split())
WORD = re.compile(r"[a-z']+")


def content_words(text: str) -> set[str]:
    return {w.strip("'") for w in WORD.findall(text.lower()) if len(w.strip("'")) >= 4} - STOP_WORDS


def rule_judgement(context: list[str], response: str) -> tuple[bool, bool]:
    """The noise-free rule above: (sensible, specific)."""
    words = response.lower().split()
    chars = [c for c in response if not c.isspace()]
    sensible = (len(words) >= 2
                and sum(c.isalpha() for c in chars) >= 0.7 * len(chars)
                and len(set(words)) >= 0.5 * len(words)
                and response.strip() != FALLBACK_TEXT
                and all(response.strip().lower() != turn.strip().lower() for turn in context))
    specific = sensible and bool(content_words(response) & content_words(" ".join(context)))
    return sensible, specific


@dataclass(frozen=True)
class SimulatedRater:
    name: str
    seed: int
    noise: float = 0.1

    def judge(self, item_id: str, context: list[str], response: str) -> tuple[bool, bool]:
        sensible, specific = rule_judgement(context, response)
        digest = hashlib.sha256(f"{self.seed}:{self.name}:{item_id}".encode()).digest()
        rng = random.Random(digest)
        if rng.random() < self.noise:
            sensible = not sensible
        if rng.random() < self.noise:
            specific = not specific
        return sensible, sensible and specific


async def rate_over_http(base_url: str, token: str, rater: SimulatedRater, limit: int | None = None) -> list[tuple]:
    """Sign in as a rater and answer items one at a time until none is left (or ``limit``); returns
    the answers sent as (item_id, sensible, specific), in order."""
    sent: list[tuple] = []
    async with RatingClient(base_url) as client:
        await client.sign_in(token)
        state = await client.next()
        while state["item"] is not None and (limit is None or len(sent) < limit):
            item = state["item"]
            sensible, specific = rater.judge(item["id"], item["context"], item["response"])
            state = await client.answer(item["id"], sensible, specific)
            sent.append((item["id"], sensible, specific))
    return sent
