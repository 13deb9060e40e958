"""Knowledge-grounded training data, SYNTHETIC: conversations made from the Wikipedia summaries by templates.

No person wrote these conversations.  For each article of the knowledge base:

1. The speaker's turn asks about or mentions the article's topic through one of a few templates
   ("what do you know about {topic}?", "i was reading about {topic} today.", ...), sometimes after a
   greeting exchange, so the example also has context turns.
2. The reply states a fact from the article's passage: one of its sentences (the first, or a later one
   that fits in ``max_reply_words``), after a short template opener ("Sure! ", "Yes, ").
3. The knowledge given with it is the gold passage plus distractors: the passages nearest the gold one
   in the index (hard negatives: same field, wrong article) and one random passage, shuffled, so the
   model must find the right passage among similar ones.  In ``no_gold_share`` of the examples the gold
   passage is left out and the reply admits not knowing ("I don't know much about {topic}. ..."), so
   the model also learns not to state facts from irrelevant passages.
4. Articles are split by a hash of their id: ``heldout_share`` of them (and every passage of theirs)
   go to the held-out evaluation set only; no training example mentions or cites them.

Output (``write_grounded_data``): ``train.jsonl`` and ``heldout.jsonl`` in the corpus format
(``{"id", "turns": [{"speaker", "text"}, ...]}``, which ``chatbot train --data`` reads), each line also
carrying ``"knowledge"`` (passage ids, in the order the model reads them), ``"gold"`` (the passage the
reply comes from, or null) and ``"synthetic": true``; ``passages.jsonl`` (every passage referenced:
id, title, text, url); ``meta.json`` (counts, settings, held-out article ids).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.documents import sentences
from retrieval.knowledge import KnowledgeIndex

ASK_TEMPLATES = [
    "what do you know about {topic}?", "tell me about {topic}.", "have you heard of {topic}?",
    "do you know anything about {topic}?", "i was reading about {topic} today.", "what is {topic}?",
    "i've always wondered about {topic}.", "can you tell me something about {topic}?",
    "my friend keeps talking about {topic}.", "any idea what {topic} is?",
]
OPENERS = {"have you heard": "Yes! ", "tell me": "Sure. ", "can you tell": "Sure! ", "do you know": "I do. "}
GREETINGS = [("hi!", "hey! how's it going?"), ("hello", "hi there! what's on your mind?"),
             ("hey, how are you?", "i'm good, thanks. what are you up to?")]
NO_GOLD_REPLIES = ["I don't know much about {topic}. What do you like about it?",
                   "Hmm, I'm not sure about {topic}. Tell me more?",
                   "I haven't read about {topic}. What got you interested?"]


@dataclass(frozen=True)
class GroundedExample:
    id: str
    turns: list[tuple[str, str]]  # (speaker, text)
    knowledge: list[str]  # passage ids, in reading order
    gold: str | None
    article: str  # the document id of the topic

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "turns": [{"speaker": s, "text": t} for s, t in self.turns],
                           "knowledge": self.knowledge, "gold": self.gold, "article": self.article,
                           "synthetic": True}, ensure_ascii=False)


def is_heldout(doc_id: str, share: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(f"grounded:{doc_id}".encode()).digest()[:4], "big") % 10_000
    return bucket < share * 10_000


def topic_name(title: str) -> str:
    return title[0].lower() + title[1:] if title and not title[:2].isupper() else title


def fact_sentence(text: str, rng: random.Random, max_words: int) -> str | None:
    """The passage's first sentence, or now and then a later one; None if none is short enough."""
    candidates = [s for s in sentences(text) if 5 <= len(s.split()) <= max_words]
    if not candidates:
        return None
    return candidates[0] if rng.random() < 0.6 or len(candidates) == 1 else rng.choice(candidates[1:])


def build_examples(kb: KnowledgeIndex, *, seed: int = 0, n_knowledge: int = 3, heldout_share: float = 0.05,
                   no_gold_share: float = 0.1, greeting_share: float = 0.3, max_reply_words: int = 40,
                   max_articles: int | None = None) -> tuple[list[GroundedExample], list[GroundedExample], set[str]]:
    """(train examples, held-out examples, passage ids referenced); one example per article."""
    rng = random.Random(seed)
    with kb._lock:
        rows = list(kb.store.iter_passages())
    first_passage: dict[str, tuple[int, object]] = {}
    for key, passage in rows:  # keys ascend in insertion order: a document's first passage comes first
        first_passage.setdefault(passage.doc_id, (key, passage))
    articles = sorted(first_passage)
    if max_articles is not None:
        articles = rng.sample(articles, min(max_articles, len(articles)))
        articles.sort()
    heldout_docs = {a for a in articles if is_heldout(a, heldout_share)}
    all_heldout = {doc for doc in first_passage if is_heldout(doc, heldout_share)}
    keys = np.asarray([first_passage[a][0] for a in articles], dtype=np.int64)
    gold_vectors = np.stack([kb.vectors.index.reconstruct(int(k)) for k in keys]) if len(keys) else np.zeros((0, 1))
    neighbours = kb.search_vectors(gold_vectors, min(n_knowledge + 8, 100)) if len(keys) else []
    train_pool = [p for _, p in rows if p.doc_id not in all_heldout]
    full_pool = [p for _, p in rows]
    train: list[GroundedExample] = []
    heldout: list[GroundedExample] = []
    used: set[str] = set()
    for n, (article, hits) in enumerate(zip(articles, neighbours)):
        _, gold = first_passage[article]
        held = article in heldout_docs
        fact = fact_sentence(gold.text, rng, max_reply_words)
        if fact is None:
            continue
        # Distractors: near neighbours from other articles (a training example never shows held-out ones).
        near = [h.passage.id for h in hits if h.passage.doc_id != article
                and (held or h.passage.doc_id not in all_heldout)]
        pool = full_pool if held else train_pool
        random_one = None
        for _ in range(10):  # a random passage of another article
            pick = rng.choice(pool) if pool else None
            if pick is not None and pick.doc_id != article:
                random_one = pick.id
                break
        distractors = near[: n_knowledge - 1] + ([random_one] if random_one and random_one not in near else [])
        with_gold = held or rng.random() >= no_gold_share  # held-out examples always carry their gold passage
        knowledge = distractors[: n_knowledge - 1] + [gold.id] if with_gold else distractors[:n_knowledge]
        rng.shuffle(knowledge)
        topic = topic_name(gold.title or article)
        ask = rng.choice(ASK_TEMPLATES).format(topic=topic)
        if with_gold:
            opener = next((o for prefix, o in OPENERS.items() if ask.startswith(prefix)), "")
            reply = opener + fact
        else:
            reply = rng.choice(NO_GOLD_REPLIES).format(topic=topic)
        turns: list[tuple[str, str]] = []
        if rng.random() < greeting_share:
            user, bot = rng.choice(GREETINGS)
            turns += [("user", user), ("bot", bot)]
        turns += [("user", ask), ("bot", reply)]
        example = GroundedExample(f"grounded-{n:05d}", turns, knowledge, gold.id if with_gold else None, article)
        (heldout if held else train).append(example)
        used.update(knowledge)
    return train, heldout, used


def write_grounded_data(kb: KnowledgeIndex, out: str | Path, **settings) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout, used = build_examples(kb, **settings)
    for name, examples in (("train", train), ("heldout", heldout)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(ex.to_json() + "\n")
    with kb._lock:
        rows = list(kb.store.iter_passages())
    with open(out / "passages.jsonl", "w", encoding="utf-8") as f:
        for _, p in rows:
            if p.id in used:
                f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text, "url": p.url}, ensure_ascii=False) + "\n")
    meta = {"synthetic": True, "made_by": "retrieval/grounded_data.py (templates over Wikipedia summaries)",
            "index": str(kb.directory), "train_examples": len(train), "heldout_examples": len(heldout),
            "passages": len(used), "heldout_articles": sorted({e.article for e in heldout}),
            "settings": {k: v for k, v in settings.items()}}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {k: v for k, v in meta.items() if k != "heldout_articles"}


def read_examples(path: str | Path) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
