"""The conversations as memory, part 2: training contexts found by meaning, their human replies offered
as candidates, and the nearest training examples behind every reply.

A reply memory embeds, for every example of the TRAINING split, the turn the human reply answered
(the context's last turn) with the sentence embedder the knowledge index uses (all-MiniLM-L6-v2,
offline), in a FAISS index (``retrieval.vector_index``, cosine).  For a new conversation the engine
(``chatbot.generate``) embeds its last turn, takes the nearest training turns and

- offers their human replies as extra sample-and-rank candidates, scored by the same model score as the
  sampled ones (teacher-forced, through the same decoding processors) and passed through the same
  filters; such a candidate is ``kind: "conversation"`` with its conversation id, and so is the reply's
  ``sources`` entry when one is chosen (``copied: true``), so a copied human reply is never mistaken for
  a generated one;
- lists the nearest training examples (context, reply, conversation id, similarity) in the reply's
  ``sources`` as its explanation (``copied: false``).

Directory: ``manifest.json`` (embedder identity, source, split "train", counts), ``index.faiss``, and
``examples.jsonl`` (one example a line, in key order: conversation id, turn, context turns, reply).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chatbot.data import conversations, split_of
from chatbot.memory import examples_to_use

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONTEXT_TURNS_KEPT = 3  # context turns stored for display with each example
DEFAULT_CANDIDATES = 5  # retrieved replies that join the sampled candidates
DEFAULT_SOURCES = 3  # nearest training examples listed in a reply's sources


class ReplyMemoryError(ValueError):
    """A reply memory that cannot be built or loaded as asked."""


@dataclass(frozen=True)
class MemoryExample:
    conversation_id: str
    turn: int  # the reply's turn number in its conversation (0-based)
    context: tuple[str, ...]  # the turns before it, oldest first (at most CONTEXT_TURNS_KEPT)
    reply: str


@dataclass(frozen=True)
class RetrievedReply:
    example: MemoryExample
    similarity: float  # cosine of the conversation's last turn and the example's

    @property
    def text(self) -> str:
        return self.example.reply

    def source(self, copied: bool) -> dict[str, Any]:
        """The protocol's ``sources`` entry (id and title are what the web page shows)."""
        ex = self.example
        what = "the reply copies" if copied else "near"
        return {"kind": "conversation", "id": f"conversation:{ex.conversation_id}#{ex.turn}",
                "title": f"{what} training conversation {ex.conversation_id}, turn {ex.turn}: "
                         f"{ex.context[-1]!r} -> {ex.reply!r}",
                "conversation_id": ex.conversation_id, "turn": ex.turn, "context": list(ex.context),
                "reply": ex.reply, "similarity": round(self.similarity, 4), "copied": copied}


def training_examples(data: str, max_examples: int | None = None, fraction: float | None = None) -> list[MemoryExample]:
    """Every (context, human reply) of the training split, conversations in source order; the first
    ``max_examples`` (or ``fraction``) of them for a subset."""
    examples = []
    for conv in conversations(data):
        if split_of(conv.id) != "train":
            continue
        for j in range(1, len(conv.turns)):
            examples.append(MemoryExample(conv.id, j, tuple(t.text for t in conv.turns[max(0, j - CONTEXT_TURNS_KEPT):j]),
                                          conv.turns[j].text))
    return examples[:examples_to_use(len(examples), max_examples, fraction, ReplyMemoryError)]


def build_reply_memory(out: str | Path, data: str = "chitchat", max_examples: int | None = None,
                       fraction: float | None = None, embedder_path: str | None = None, index_type: str = "auto",
                       progress: bool = True) -> dict:
    from retrieval.embedder import load_embedder
    from retrieval.vector_index import VectorIndex

    t0 = time.perf_counter()
    examples = training_examples(data, max_examples, fraction)
    if not examples:
        raise ReplyMemoryError(f"{data}: no training examples")
    embedder = load_embedder(embedder_path)
    t_embed = time.perf_counter()
    vectors = embedder.embed([ex.context[-1] for ex in examples], progress=progress, desc="memory replies")
    embed_s = time.perf_counter() - t_embed
    index = VectorIndex.create(embedder.dim, index_type, vectors)
    index.add(vectors, np.arange(len(examples)))
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    index.save(tmp / "index.faiss")
    with open(tmp / "examples.jsonl", "w") as f:
        for ex in examples:
            f.write(json.dumps({"conversation_id": ex.conversation_id, "turn": ex.turn, "context": list(ex.context),
                                "reply": ex.reply}) + "\n")
    manifest = {"format_version": FORMAT_VERSION, "source": data, "split": "train", "embedder": embedder.identity,
                "factory": index.factory, "examples": len(examples),
                "conversations": len({ex.conversation_id for ex in examples}),
                "build_s": round(time.perf_counter() - t0, 1), "embed_per_s": round(len(examples) / max(embed_s, 1e-9), 1)}
    manifest["bytes"] = sum(f.stat().st_size for f in tmp.iterdir())
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest


class ReplyMemory:
    """A loaded reply memory: ``retrieve(contexts)`` -> per context its nearest training examples."""

    def __init__(self, directory: str | Path, embedder_path: str | None = None, k: int = max(DEFAULT_CANDIDATES, DEFAULT_SOURCES)):
        from retrieval.embedder import identity_mismatch, load_embedder
        from retrieval.vector_index import VectorIndex

        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise ReplyMemoryError(f"{directory}: not a reply memory (no {MANIFEST}); build one with "
                                   f"`chatbot memory replies --out {directory}`")
        self.manifest = json.loads((directory / MANIFEST).read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION or self.manifest.get("split") != "train":
            raise ReplyMemoryError(f"{directory}: not a training-split reply memory of format {FORMAT_VERSION}; rebuild "
                                   f"it with `chatbot memory replies --out {directory}`")
        self.embedder = load_embedder(embedder_path)
        differs = identity_mismatch(self.manifest["embedder"], self.embedder.identity)
        if differs:
            raise ReplyMemoryError(f"{directory} was embedded by another model ({differs}); rebuild it with "
                                   f"`chatbot memory replies --out {directory}` and this embedder")
        self.index = VectorIndex.load(directory / "index.faiss", self.manifest["factory"], nprobe=32)
        with open(directory / "examples.jsonl") as f:
            self.examples = [MemoryExample(r["conversation_id"], r["turn"], tuple(r["context"]), r["reply"])
                             for r in map(json.loads, f)]
        self.directory, self.k = directory, k

    def retrieve(self, contexts: Sequence[Sequence[str]]) -> list[list[RetrievedReply]]:
        if not contexts:
            return []
        vectors = self.embedder.embed([context[-1] for context in contexts])
        scores, keys = self.index.search(vectors, self.k)
        return [[RetrievedReply(self.examples[int(key)], float(s)) for s, key in zip(row_s, row_k) if key >= 0]
                for row_s, row_k in zip(scores, keys)]


def add_reply_memory_command(msub: argparse._SubParsersAction) -> None:
    r = msub.add_parser("replies", help="index the training contexts by meaning, for retrieved reply candidates",
                        description="Embeds the last context turn of every TRAINING example (all-MiniLM-L6-v2 by "
                                    "default) into a FAISS index; `chatbot chat/serve --reply-memory DIR` use it.")
    r.add_argument("--out", required=True, help="reply memory directory to write")
    r.add_argument("--data", default="chitchat", help="'chitchat' or a JSONL corpus (its training split is used)")
    r.add_argument("--max-examples", type=int, help="only the first N training examples")
    r.add_argument("--fraction", type=float, help="only the first FRACTION of the training examples")
    r.add_argument("--embedder", help="sentence-transformers directory (default: the bundled all-MiniLM-L6-v2)")
    r.add_argument("--index-type", default="auto", help="flat, auto, or a FAISS factory string (retrieval/vector_index.py)")
    r.set_defaults(func=run_build_replies)


def run_build_replies(args: argparse.Namespace) -> int:
    print(json.dumps(build_reply_memory(args.out, args.data, args.max_examples, args.fraction, args.embedder,
                                        args.index_type)))
    return 0
