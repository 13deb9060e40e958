"""The encoder's input, built in one place for data preparation, generation and the service.

    source = turn_1 <sep> turn_2 <sep> ... <sep> turn_n [<know> passage_1 <know> passage_2 ...]

The context is the last ``MAX_CONTEXT_TURNS`` turns joined by ``<sep>``, cut from the left (the newest
words matter most).  Knowledge passages, when given, follow the context, each after the reserved
``<know>`` token and cut from the right (a passage's first sentences carry its topic), best first.
The context keeps at least half of ``max_source_len`` (or all of itself, if shorter); passages share
the rest equally (what a short passage leaves goes to the ones after it), as many of them as can have
``MIN_PASSAGE_TOKENS`` tokens each; the rest are left out.  Without
knowledge the source is exactly the context, so a model trained before knowledge existed reads what it
was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chatbot.tokenizer import KNOWLEDGE_ID, SEP_ID

MAX_CONTEXT_TURNS = 7
MIN_PASSAGE_TOKENS = 16


def knowledge_text(title: str, text: str) -> str:
    """A passage as the model reads it: its title, then its text."""
    return f"{title}: {text}" if title else text


def join_context(turns: Sequence, max_source_len: int, knowledge: Sequence = ()) -> np.ndarray:
    """Token ids of the model's source: context turns (token id lists, oldest first) and knowledge
    passages (token id lists, best first), laid out as the module docstring says."""
    parts: list[np.ndarray] = []
    for ids in list(turns)[-MAX_CONTEXT_TURNS:]:
        if parts:
            parts.append(np.array([SEP_ID], dtype=np.int64))
        parts.append(np.asarray(ids, dtype=np.int64))
    context = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if not len(knowledge):
        return context[-max_source_len:]
    budget = max_source_len - min(len(context), max_source_len // 2)
    # Every passage gets an equal share of the budget (what a short one leaves goes to those after it),
    # so the model sees each one it is given, not just the first: a passage of ~130 tokens would fill the
    # whole budget alone.  As many passages as can have MIN_PASSAGE_TOKENS each are read, best first.
    knowledge = list(knowledge)
    n = len(knowledge)
    while n and budget // n - 1 < MIN_PASSAGE_TOKENS:
        n -= 1
    pieces: list[np.ndarray] = []
    used = 0
    for i, ids in enumerate(knowledge[:n]):
        room = (budget - used) // (n - i) - 1  # one for <know>
        piece = np.asarray(ids, dtype=np.int64)[:room]
        pieces.extend([np.array([KNOWLEDGE_ID], dtype=np.int64), piece])
        used += 1 + len(piece)
    keep = max_source_len - used
    return np.concatenate([context[-keep:] if keep else context[:0], *pieces])
