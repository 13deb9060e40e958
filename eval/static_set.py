"""Static rating sets (Meena's Mini-Turing-Benchmark style): fixed contexts of 1 to 3 turns, each
model's reply to each, generated with one decoding configuration that the set records.

Contexts are drawn deterministically (a seed) from held-out conversations: the chitchat test split,
or every conversation of a user's JSONL file.  A window of 1-3 consecutive turns is always followed by
a real next turn in its conversation, which ``include_human`` adds as the "human" system's response.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from chatbot.data import Conversation, chitchat_conversations, jsonl_conversations, split_of
from eval.itemset import Item, RatingSet, item_id, shuffled, system_info

log = logging.getLogger(__name__)

SHIPPED = "shipped"  # a --models entry that means the model inside the package
MAX_CONTEXT_TURNS = 3
HUMAN = "human"


@dataclass(frozen=True)
class Context:
    conversation: str
    start: int
    turns: tuple[str, ...]
    next_turn: str  # what the other speaker really said next


@dataclass(frozen=True)
class ModelSpec:
    name: str
    directory: Path | None  # None: the shipped model


def parse_model_specs(specs: Iterable[str]) -> list[ModelSpec]:
    """``DIR``, ``NAME=DIR`` or ``shipped``; names default to the directory's name and must be unique."""
    out: list[ModelSpec] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        if path == SHIPPED:
            directory, default_name = None, SHIPPED
        else:
            directory = Path(path)
            if not directory.is_dir():
                raise FileNotFoundError(f"--models {spec!r}: {directory} is not a model directory")
            default_name = directory.resolve().name
        name = name or default_name
        if name == HUMAN or any(m.name == name for m in out):
            raise ValueError(f"--models: system name {name!r} is reserved or used twice; write NAME=DIR to choose names")
        out.append(ModelSpec(name, directory))
    if not out:
        raise ValueError("--models needs at least one model directory (or 'shipped')")
    return out


def source_conversations(contexts: str) -> list[Conversation]:
    """'test': the chitchat test split; else a JSONL corpus file, all of it."""
    if contexts == "test":
        return [c for c in chitchat_conversations() if split_of(c.id) == "test"]
    if not Path(contexts).is_file():
        raise FileNotFoundError(f"--contexts {contexts!r}: use 'test' or a JSONL conversations file")
    return list(jsonl_conversations(contexts))


def draw_contexts(conversations: list[Conversation], n: int, seed: int) -> list[Context]:
    """n distinct windows of 1-3 turns, each followed by a next turn, in a seeded order.  Conversations
    are visited in a shuffled order, one window each per pass, so n contexts come from n conversations
    when there are that many."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    rng = random.Random(seed)
    usable = sorted((c for c in conversations if len(c.turns) >= 2), key=lambda c: c.id)
    if not usable:
        raise ValueError("no conversation with at least two turns to draw contexts from")
    rng.shuffle(usable)
    picked: dict[tuple[str, int, int], Context] = {}
    for _ in range(10):  # a few passes when n exceeds the conversations; stop early when windows run out
        for conv in usable:
            if len(picked) == n:
                return list(picked.values())
            length = rng.randint(1, min(MAX_CONTEXT_TURNS, len(conv.turns) - 1))
            start = rng.randrange(0, len(conv.turns) - length)
            key = (conv.id, start, length)
            if key not in picked:
                turns = tuple(t.text for t in conv.turns[start:start + length])
                picked[key] = Context(conv.id, start, turns, conv.turns[start + length].text)
    if len(picked) < n:
        log.warning("only %d distinct contexts could be drawn (asked for %d)", len(picked), n)
    return list(picked.values())


def generate_replies(spec: ModelSpec, contexts: list[Context], decoding, batch_size: int = 8,
                     device: str = "cpu", progress: bool = True) -> list[str]:
    """The model's reply to each context through the service's ReplyEngine, in batches."""
    from chatbot.generate import ReplyEngine
    from chatbot.modeldir import load_model

    loaded = load_model(spec.directory, device)
    engine = ReplyEngine(loaded.model, loaded.tokenizer, device)
    replies: list[str] = []
    bar = tqdm(total=len(contexts), desc=f"replies {spec.name}", unit=" ctx", disable=None if progress else True)
    for i in range(0, len(contexts), batch_size):
        chunk = contexts[i:i + batch_size]
        replies.extend(r.text for r in engine.reply([list(c.turns) for c in chunk], decoding))
        bar.update(len(chunk))
    bar.close()
    return replies


def build_static_set(specs: list[ModelSpec], contexts: list[Context], decoding, name: str, seed: int = 0,
                     include_human: bool = False, batch_size: int = 8, device: str = "cpu",
                     progress: bool = True) -> RatingSet:
    from chatbot.modeldir import DEFAULT_MODEL_DIR

    items: list[Item] = []
    systems: dict[str, dict] = {}
    for spec in specs:
        replies = generate_replies(spec, contexts, decoding, batch_size, device, progress)
        systems[spec.name] = system_info("model", str((spec.directory or DEFAULT_MODEL_DIR).resolve()))
        items += [Item(item_id(name, spec.name, k), spec.name, c.turns, r) for k, (c, r) in enumerate(zip(contexts, replies))]
    if include_human:
        systems[HUMAN] = system_info("human")
        items += [Item(item_id(name, HUMAN, k), HUMAN, c.turns, c.next_turn) for k, c in enumerate(contexts)]
    return RatingSet(name, "static", shuffled(items, seed), systems, dataclasses.asdict(decoding))
