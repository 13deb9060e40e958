"""Conversations in, memory-mapped (context, response) examples out.

Flow: a source (the bundled chitchat corpus, or a user's JSONL file) yields ``Conversation``s one at a
time; each goes to the train, valid or test split by a hash of its id (stable across machines and
runs); each split is tokenized once into a directory of flat arrays:

    tokens.bin        every turn's token ids back to back (uint16, or uint32 for vocabularies > 65535)
    turn_offsets.npy  int64 (n_turns + 1): turn t is tokens[offsets[t]:offsets[t+1]]
    turn_words.npy    int32 (n_turns): whitespace words per turn, for per-word perplexity
    examples.npy      int64 (n_examples, 2): (response turn, first context turn), at most 7 turns back
    meta.json         counts, source, tokenizer fingerprint, limits

so a corpus of any size trains without living in RAM as Python objects.

Knowledge-grounded conversations (``chatbot index training-data``, SYNTHETIC: docs/knowledge.md) carry
the passages their last reply was written from.  Such a conversation gives one example, its last turn,
and its split directory holds four more files:

    passage_tokens.bin      every passage (``model_input.knowledge_text``: title, then text) tokenized once
    passage_offsets.npy     int64 (n_passages + 1), as turn_offsets
    knowledge_offsets.npy   int64 (n_examples + 1): example i reads knowledge_refs[offsets[i]:offsets[i+1]]
    knowledge_refs.npy      int64: passage indices, in the order the model reads them

and its source is ``join_context(context, max_source_len, knowledge=passages)``, exactly as generation
builds it.  A split without knowledge (the chitchat corpus) has none of these files and the same bytes
as before knowledge existed.  An example is assembled on
demand: context = its turns joined by <sep> and cut from the left to ``max_source_len`` tokens; the
response is cut to ``max_target_len - 1`` tokens and followed by the end-of-turn token.

The ``backward`` direction turns each example around for maximum-mutual-information reranking
(``chatbot/ranking.py``): source = the response (its first ``max_source_len`` tokens), target = the
context's last turn, the one the response answers.  Same files, same examples, so both directions
share one tokenized cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from chatbot.model_input import MAX_CONTEXT_TURNS, join_context, knowledge_text
from chatbot.tokenizer import BOS_ID, EOT_ID, PAD_ID, ChatTokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
# Share of conversations per split, by a hash of the conversation id: 95% / 2.5% / 2.5%.
SPLIT_PER_MILLE = {"valid": 25, "test": 25}
FORMAT_VERSION = 1
# forward: p(response | context), the chat model; backward: p(last context turn | response), for MMI.
DIRECTIONS = ("forward", "backward")


class CorpusError(ValueError):
    """A corpus file is malformed; the message names the file and the line."""

    def __init__(self, path: str | Path, line: int, problem: str):
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


@dataclass(frozen=True)
class Turn:
    speaker: str
    text: str


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Turn, ...]
    # Passages (title + text, as the model reads them) the last turn was written from; () for chitchat.
    knowledge: tuple[str, ...] = ()


def merge_consecutive(turns: Iterable[Turn]) -> tuple[Turn, ...]:
    """Consecutive messages by one speaker form one turn (joined by a space); empty messages drop."""
    merged: list[Turn] = []
    for turn in turns:
        text = turn.text.strip()
        if not text:
            continue
        if merged and merged[-1].speaker == turn.speaker:
            merged[-1] = Turn(turn.speaker, merged[-1].text + " " + text)
        else:
            merged.append(Turn(turn.speaker, text))
    return tuple(merged)


def split_of(conversation_id: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(conversation_id.encode()).digest()[:4], "big") % 1000
    if bucket < SPLIT_PER_MILLE["test"]:
        return "test"
    if bucket < SPLIT_PER_MILLE["test"] + SPLIT_PER_MILLE["valid"]:
        return "valid"
    return "train"


# ----------------------------------------------------------------------------------------- sources


def chitchat_conversations() -> Iterator[Conversation]:
    """The bundled BYU Chit-Chat corpus (``chitchat-dataset``, MIT), in a stable id order."""
    import chitchat_dataset

    dataset = chitchat_dataset.Dataset()
    for conv_id in sorted(dataset):
        messages = (m for turn in dataset[conv_id]["messages"] for m in turn)
        yield Conversation(conv_id, merge_consecutive(Turn(m["sender"], m["text"]) for m in messages))


@dataclass
class SkipReport:
    """Lines skipped with ``--skip-bad-lines``: how many, and the first few reasons."""

    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, error: CorpusError) -> None:
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))


def parse_jsonl_line(path: str | Path, line_no: int, line: str) -> Conversation:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusError(path, line_no, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise CorpusError(path, line_no, f"expected a JSON object, got {type(record).__name__}")
    conv_id, turns = record.get("id"), record.get("turns")
    if not isinstance(conv_id, str) or not conv_id:
        raise CorpusError(path, line_no, "field 'id' must be a non-empty string")
    if not isinstance(turns, list):
        raise CorpusError(path, line_no, "field 'turns' must be a list of {speaker, text} objects")
    parsed = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise CorpusError(path, line_no, f"turns[{i}] must be an object with 'speaker' and 'text'")
        speaker, text = turn.get("speaker"), turn.get("text")
        if not isinstance(speaker, str) or not isinstance(text, str):
            raise CorpusError(path, line_no, f"turns[{i}] needs string fields 'speaker' and 'text'")
        parsed.append(Turn(speaker, text))
    return Conversation(conv_id, merge_consecutive(parsed))


def jsonl_conversations(path: str | Path, skip_bad_lines: bool = False,
                        report: SkipReport | None = None) -> Iterator[Conversation]:
    """Stream a JSONL corpus: one ``{"id", "turns": [{"speaker", "text"}, ...]}`` object a line."""
    seen: set[str] = set()
    with open(path, encoding="utf-8", errors="strict") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                conv = parse_jsonl_line(path, line_no, line)
                if conv.id in seen:
                    raise CorpusError(path, line_no, f"duplicate conversation id {conv.id!r}")
                seen.add(conv.id)
            except CorpusError as e:
                if not skip_bad_lines:
                    raise
                if report is not None:
                    report.add(e)
                continue
            yield conv


def conversations(source: str, skip_bad_lines: bool = False, report: SkipReport | None = None) -> Iterator[Conversation]:
    if source == "chitchat":
        return chitchat_conversations()
    if not Path(source).is_file():
        raise FileNotFoundError(f"--data {source!r}: no such file (use 'chitchat' or a JSONL corpus path)")
    return jsonl_conversations(source, skip_bad_lines, report)


GROUNDED_TRAIN = "train.jsonl"
GROUNDED_PASSAGES = "passages.jsonl"


def grounded_conversations(directory: str | Path, file: str = GROUNDED_TRAIN) -> Iterator[Conversation]:
    """A ``chatbot index training-data`` directory's conversations, each with the text of its
    ``knowledge`` passages (from ``passages.jsonl``) in reading order."""
    directory = Path(directory)
    for name in (file, GROUNDED_PASSAGES):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"--grounded {directory}: no {name} (write it with `chatbot index training-data --out DIR`)")
    passages: dict[str, str] = {}
    with open(directory / GROUNDED_PASSAGES, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    p = json.loads(line)
                    passages[p["id"]] = knowledge_text(p.get("title") or "", p["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CorpusError(directory / GROUNDED_PASSAGES, line_no, "expected {id, title, text}") from None
    path = directory / file
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            conv = parse_jsonl_line(path, line_no, line)
            ids = json.loads(line).get("knowledge") or []
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise CorpusError(path, line_no, "field 'knowledge' must be a list of passage ids")
            missing = [i for i in ids if i not in passages]
            if missing:
                raise CorpusError(path, line_no, f"knowledge passage {missing[0]!r} is not in {GROUNDED_PASSAGES}")
            if len(conv.turns) < 2:
                raise CorpusError(path, line_no, "a grounded conversation needs a context turn and a reply")
            yield Conversation(conv.id, conv.turns, tuple(passages[i] for i in ids))


# ----------------------------------------------------------------------------------------- on disk


def source_key(source: str) -> str:
    """Names a cache entry: 'chitchat', or the file's name plus a hash of its path, size and mtime."""
    if source == "chitchat":
        return "chitchat"
    st = os.stat(source)
    digest = hashlib.sha256(f"{os.path.abspath(source)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{Path(source).stem}-{digest}"


def grounded_key(directory: str | Path) -> str:
    """Names a grounded data directory's cache entry: a hash of its files' paths, sizes and mtimes."""
    parts = []
    for name in (GROUNDED_TRAIN, GROUNDED_PASSAGES):
        path = Path(directory) / name
        st = os.stat(path)
        parts.append(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}")
    return "grounded-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("CHATBOT_CACHE", Path.home() / ".cache" / "chatbot"))


def write_split(convs: Iterable[Conversation], tokenizer: ChatTokenizer, out_dir: Path, meta: dict,
                batch_size: int = 512, progress: bool = True) -> Path:
    """Tokenize conversations into ``out_dir`` (see the module docstring); written atomically."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    offsets, words, examples = [0], [], []
    # Knowledge: each distinct passage text is tokenized once; examples point at them.
    passage_index: dict[str, int] = {}
    passage_offsets, knowledge_offsets, knowledge_refs = [0], [0], []
    n_conv = 0
    with open(tmp / "tokens.bin", "wb") as tokens_file, open(tmp / "passage_tokens.bin", "wb") as passage_file:
        pending: list[Conversation] = []

        def flush() -> None:
            texts = [t.text for c in pending for t in c.turns]
            encoded = tokenizer.encode_batch(texts)
            new_passages = list(dict.fromkeys(p for c in pending for p in c.knowledge if p not in passage_index))
            for text, ids in zip(new_passages, tokenizer.encode_batch(new_passages) if new_passages else []):
                passage_index[text] = len(passage_index)
                np.asarray(ids, dtype=dtype).tofile(passage_file)
                passage_offsets.append(passage_offsets[-1] + len(ids))
            k = 0
            for conv in pending:
                first_turn = len(offsets) - 1
                for j in range(len(conv.turns)):
                    ids = np.asarray(encoded[k], dtype=dtype)
                    ids.tofile(tokens_file)
                    offsets.append(offsets[-1] + len(ids))
                    words.append(len(texts[k].split()))
                    k += 1
                    # Every turn after the first is a response to the turns before it; in a grounded
                    # conversation only the last, the reply written from its passages.
                    if j >= 1 and (not conv.knowledge or j == len(conv.turns) - 1):
                        turn = first_turn + j
                        examples.append((turn, max(first_turn, turn - MAX_CONTEXT_TURNS)))
                        knowledge_refs.extend(passage_index[p] for p in conv.knowledge)
                        knowledge_offsets.append(len(knowledge_refs))
            pending.clear()

        for conv in tqdm(convs, desc=f"tokenizing {out_dir.name}", unit=" conv", disable=None if progress else True, leave=False):  # None: no bar off a terminal
            n_conv += 1
            pending.append(conv)
            if len(pending) >= batch_size:
                flush()
        flush()
    np.save(tmp / "turn_offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(tmp / "turn_words.npy", np.asarray(words, dtype=np.int32))
    np.save(tmp / "examples.npy", np.asarray(examples, dtype=np.int64).reshape(-1, 2))
    extra = {}
    if knowledge_refs:
        np.save(tmp / "passage_offsets.npy", np.asarray(passage_offsets, dtype=np.int64))
        np.save(tmp / "knowledge_offsets.npy", np.asarray(knowledge_offsets, dtype=np.int64))
        np.save(tmp / "knowledge_refs.npy", np.asarray(knowledge_refs, dtype=np.int64))
        extra = {"knowledge": True, "n_passages": len(passage_index), "n_passage_tokens": passage_offsets[-1]}
    else:  # a split without knowledge is exactly what it was before knowledge existed
        (tmp / "passage_tokens.bin").unlink()
    meta = dict(meta, format_version=FORMAT_VERSION, tokenizer=tokenizer.fingerprint(),
                dtype=np.dtype(dtype).name, n_conversations=n_conv, n_turns=len(words),
                n_examples=len(examples), n_tokens=offsets[-1], **extra)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) context ids, right-padded
    tgt_in: torch.Tensor  # (B, T) <s> + response
    tgt_out: torch.Tensor  # (B, T) response + </t>
    words: int  # whitespace words in the responses plus one end-of-turn per response

    @property
    def target_tokens(self) -> int:
        return int(self.tgt_out.ne(PAD_ID).sum())


class ExampleStore:
    """Read-only view of one tokenized split; assembles examples and batches on demand.

    ``max_passages`` caps the knowledge passages an example reads (the model's ``knowledge_passages``,
    as the reply engine caps what it retrieved); None reads all that were stored."""

    def __init__(self, directory: str | Path, max_source_len: int = 128, max_target_len: int = 128,
                 direction: str = "forward", max_passages: int | None = None):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        self.dir = Path(directory)
        self.direction = direction
        self.meta = json.loads((self.dir / "meta.json").read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.dir}: data format {self.meta.get('format_version')} != {FORMAT_VERSION}; re-tokenize")
        self.tokens = np.memmap(self.dir / "tokens.bin", dtype=self.meta["dtype"], mode="r") \
            if self.meta["n_tokens"] else np.zeros(0, dtype=self.meta["dtype"])
        self.offsets = np.load(self.dir / "turn_offsets.npy")
        self.words = np.load(self.dir / "turn_words.npy")
        self.examples = np.load(self.dir / "examples.npy")
        if len(self.offsets) != self.meta["n_turns"] + 1 or len(self.examples) != self.meta["n_examples"]:
            raise ValueError(f"{self.dir}: arrays disagree with meta.json; re-tokenize")
        self.max_source_len, self.max_target_len = max_source_len, max_target_len
        self.max_passages = max_passages
        self.has_knowledge = bool(self.meta.get("knowledge")) and direction == "forward" and max_passages != 0
        if self.has_knowledge:
            self.passage_tokens = np.memmap(self.dir / "passage_tokens.bin", dtype=self.meta["dtype"], mode="r")
            self.passage_offsets = np.load(self.dir / "passage_offsets.npy")
            self.knowledge_offsets = np.load(self.dir / "knowledge_offsets.npy")
            self.knowledge_refs = np.load(self.dir / "knowledge_refs.npy")
            if len(self.knowledge_offsets) != len(self.examples) + 1:
                raise ValueError(f"{self.dir}: knowledge arrays disagree with examples.npy; re-tokenize")
        resp, first = self.examples[:, 0], self.examples[:, 1]
        turn_len = np.diff(self.offsets)
        if direction == "forward":
            # Context length: the turns' tokens plus one separator between consecutive turns.
            source = self.offsets[resp] - self.offsets[first] + (resp - first - 1)
            self.target_turns = resp
        else:
            source = turn_len[resp]
            self.target_turns = resp - 1  # the context's last turn (examples start at a conversation's 2nd turn)
        self.source_lengths = np.minimum(source, max_source_len)
        if self.has_knowledge:  # passages fill the source by join_context's rules: count exactly
            self.source_lengths = np.asarray([len(self.example(i)[0]) for i in range(len(self))], dtype=np.int64)
        self.target_lengths = np.minimum(turn_len[self.target_turns], max_target_len - 1) + 1

    def __len__(self) -> int:
        return len(self.examples)

    def turn(self, t: int) -> np.ndarray:
        return self.tokens[self.offsets[t]:self.offsets[t + 1]]

    def knowledge(self, i: int) -> list[np.ndarray]:
        """Token ids of the passages example ``i`` reads, in reading order ([] without knowledge)."""
        if not self.has_knowledge:
            return []
        refs = self.knowledge_refs[self.knowledge_offsets[i]:self.knowledge_offsets[i + 1]][: self.max_passages]
        return [self.passage_tokens[self.passage_offsets[r]:self.passage_offsets[r + 1]] for r in refs]

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, target ids without </t>) for example ``i``, limits applied: forward (context
        and its knowledge, response); backward (response, the context's last turn)."""
        resp, first = (int(v) for v in self.examples[i])
        if self.direction == "backward":
            return np.asarray(self.turn(resp)[: self.max_source_len], dtype=np.int64), \
                self.turn(resp - 1)[: self.max_target_len - 1]
        context = join_context([self.turn(t) for t in range(first, resp)], self.max_source_len, self.knowledge(i))
        return context, self.turn(resp)[: self.max_target_len - 1]

    def target_words(self, i: int) -> int:
        """Whitespace words of example ``i``'s target plus one for its end-of-turn."""
        return int(self.words[self.target_turns[i]]) + 1

    def collate(self, indices: Iterable[int]) -> Batch:
        indices = [int(i) for i in indices]
        return make_batch([self.example(i) for i in indices], sum(self.target_words(i) for i in indices))

    def batches(self, max_tokens: int, seed: int | None = None, epoch: int = 0) -> list[np.ndarray]:
        """Token-budget batches of example indices (``length_batches``)."""
        return length_batches(self.source_lengths, self.target_lengths, max_tokens, seed, epoch)


def make_batch(pairs: list[tuple[np.ndarray, np.ndarray]], words: int) -> Batch:
    """Right-padded tensors of (source, response) pairs."""
    B = len(pairs)
    S = max(len(c) for c, _ in pairs)
    T = max(len(r) for _, r in pairs) + 1
    src = np.full((B, S), PAD_ID, dtype=np.int64)
    tgt_in = np.full((B, T), PAD_ID, dtype=np.int64)
    tgt_out = np.full((B, T), PAD_ID, dtype=np.int64)
    for b, (context, response) in enumerate(pairs):
        src[b, : len(context)] = context
        tgt_in[b, 0], tgt_in[b, 1 : len(response) + 1] = BOS_ID, response
        tgt_out[b, : len(response)], tgt_out[b, len(response)] = response, EOT_ID
    return Batch(torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out), words)


def length_batches(source_lengths: np.ndarray, target_lengths: np.ndarray, max_tokens: int,
                   seed: int | None = None, epoch: int = 0) -> list[np.ndarray]:
    """Token-budget batches of example indices: padded (source + target) tokens <= max_tokens.

    Examples of similar length go together so little is padding; with a seed, ties are broken and
    the batch order shuffled by (seed, epoch), so any epoch's batch list can be rebuilt exactly.
    """
    n = len(source_lengths)
    rng = np.random.default_rng([seed, epoch]) if seed is not None else None
    tiebreak = rng.random(n) if rng is not None else np.arange(n)
    order = np.lexsort((tiebreak, source_lengths, target_lengths))
    batches, start, max_s, max_t = [], 0, 0, 0
    for pos, i in enumerate(order):
        s, t = source_lengths[i], target_lengths[i]
        new_s, new_t = max(max_s, s), max(max_t, t)
        if pos > start and (pos - start + 1) * (new_s + new_t) > max_tokens:
            batches.append(order[start:pos])
            start, new_s, new_t = pos, s, t
        max_s, max_t = new_s, new_t
    if start < n:
        batches.append(order[start:])
    if rng is not None:
        rng.shuffle(batches)
    return batches


class MixedExamples:
    """The train examples of several stores as one (chitchat beside grounded data), each store's
    examples repeated (cyclically) or cut to a given count, so a store can take a set share of the mix.

    Same interface as ``ExampleStore`` for the trainer: ``len``, ``collate``, ``batches``; an index is
    a position in the concatenation of the parts."""

    def __init__(self, parts: list[tuple[ExampleStore, int]]):
        self.stores = [store for store, _ in parts]
        self.local = [np.resize(np.arange(len(store)), count) for store, count in parts]
        self.part = np.concatenate([np.full(len(ix), k, dtype=np.int64) for k, ix in enumerate(self.local)])
        self.index = np.concatenate(self.local)
        self.source_lengths = np.concatenate([s.source_lengths[ix] for s, ix in zip(self.stores, self.local)])
        self.target_lengths = np.concatenate([s.target_lengths[ix] for s, ix in zip(self.stores, self.local)])

    @classmethod
    def with_share(cls, base: ExampleStore, extra: ExampleStore, share: float | None) -> "MixedExamples":
        """All of ``base`` plus ``extra`` as ``share`` of the whole (None: each of extra's examples once)."""
        if share is None:
            return cls([(base, len(base)), (extra, len(extra))])
        if not 0 < share < 1:
            raise ValueError(f"the grounded share must be in (0, 1), got {share}")
        return cls([(base, len(base)), (extra, max(1, round(share / (1 - share) * len(base))))])

    def __len__(self) -> int:
        return len(self.index)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.stores[self.part[i]].example(int(self.index[i]))

    def collate(self, indices: Iterable[int]) -> Batch:
        indices = [int(i) for i in indices]
        words = sum(self.stores[self.part[i]].target_words(int(self.index[i])) for i in indices)
        return make_batch([self.example(i) for i in indices], words)

    def batches(self, max_tokens: int, seed: int | None = None, epoch: int = 0) -> list[np.ndarray]:
        return length_batches(self.source_lengths, self.target_lengths, max_tokens, seed, epoch)


def prepare_splits(source: str, tokenizer: ChatTokenizer, splits: Iterable[str] = SPLITS,
                   skip_bad_lines: bool = False, cache_dir: Path | None = None,
                   whole_file_as: str | None = None) -> dict[str, Path]:
    """Tokenize the wanted splits of ``source`` once, caching by (source, tokenizer).

    ``whole_file_as`` puts every conversation into that one split (a user's held-out test file).
    Returns split -> directory.
    """
    splits = list(splits)
    root = (cache_dir or cache_root()) / "data" / f"{source_key(source)}-{tokenizer.fingerprint()}"
    if whole_file_as:
        root = root / "whole"
    wanted = {s: root / s for s in splits}
    missing = [s for s, d in wanted.items() if not (d / "meta.json").exists()]
    if not missing:
        return wanted
    report = SkipReport()
    # One streaming pass per missing split keeps memory flat; chitchat is small enough that it's cheap.
    for split in missing:
        stream = conversations(source, skip_bad_lines, report if split == missing[0] else None)
        selected = (c for c in stream if (whole_file_as or split_of(c.id)) == split)
        write_split(selected, tokenizer, wanted[split], {"source": source, "split": split})
    if report.skipped:
        log.warning("skipped %d malformed lines in %s (first: %s)", report.skipped, source, "; ".join(report.examples))
    return wanted


def prepare_grounded(directory: str | Path, tokenizer: ChatTokenizer, cache_dir: Path | None = None) -> Path:
    """Tokenize a grounded data directory's ``train.jsonl`` (with its passages) once, cached by (its
    files, tokenizer) under a key of its own: the chitchat splits' cache is untouched.  Returns the split
    directory (all of it is training data; ``heldout.jsonl`` is Q4's, bench/bench_knowledge_quality.py)."""
    out = (cache_dir or cache_root()) / "data" / f"{grounded_key(directory)}-{tokenizer.fingerprint()}" / "train"
    if not (out / "meta.json").exists():
        write_split(grounded_conversations(directory), tokenizer, out,
                    {"source": f"grounded:{Path(directory).resolve()}", "split": "train", "synthetic": True})
    return out
