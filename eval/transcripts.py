"""Imported transcripts -> rating items, so another bot's turns can be rated beside our own.

Two layouts:

- our JSONL corpus format (docs/data.md): ``{"id": ..., "turns": [{"speaker", "text"}, ...]}`` a line;
- the plain layout Meena's published conversation logs use::

      Meena Conversation 1
      Human: Hi!
      Meena: Hi! How are you today?

      Meena Conversation 2
      ...

  a header ``<Bot> Conversation <N>``, then ``Speaker: text`` lines, a blank line between conversations.

The caller names the bot's speaker; each of its turns that has at least one turn before it becomes an
item whose context is the conversation so far.  A malformed file fails with the file and the line.
(Published logs are evaluation material: never train or tune on them.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chatbot.data import CorpusError, Turn, jsonl_conversations, merge_consecutive
from eval.itemset import MAX_TEXT_CHARS, Item, RatingSet, item_id, shuffled, system_info

LAYOUTS = ("jsonl", "meena")
HEADER = re.compile(r"^(?P<bot>\S.*?) Conversation (?P<n>\d+)\s*$")
# A speaker is a short name without a colon; the text follows the first ": ".
SPEAKER_LINE = re.compile(r"^(?P<speaker>[^:\s][^:]{0,39}):(?: (?P<text>.*))?$")


class TranscriptError(CorpusError):
    """A transcript file is malformed; the message is ``FILE:LINE: problem``."""


@dataclass(frozen=True)
class ImportedConversation:
    id: str
    turns: tuple[Turn, ...]
    line: int  # where it starts in its file, for errors about the whole conversation


def meena_log_conversations(path: str | Path) -> Iterator[ImportedConversation]:
    """Parse the Meena-log plain layout; raises TranscriptError naming the file and line."""
    conv_id, start, turns = None, 0, []
    numbers: set[str] = set()

    def finish() -> ImportedConversation:
        if not turns:
            raise TranscriptError(path, start, f"conversation {conv_id!r} has no 'Speaker: text' lines")
        return ImportedConversation(conv_id, tuple(turns), start)

    try:
        f = open(path, encoding="utf-8", errors="strict")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such transcript file") from None
    with f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise TranscriptError(path, 1, f"not UTF-8 text ({e.reason})") from None
    for line_no, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            if conv_id is not None:
                yield finish()
                conv_id, turns = None, []
            continue
        header = HEADER.match(line)
        if conv_id is None:
            if not header:
                raise TranscriptError(path, line_no, "expected a header '<Bot> Conversation <N>' "
                                                     f"(a blank line ends the previous conversation), got {line[:60]!r}")
            if header["n"] in numbers:
                raise TranscriptError(path, line_no, f"conversation number {header['n']} appears twice")
            numbers.add(header["n"])
            conv_id, start, turns = f"{header['bot']} Conversation {header['n']}", line_no, []
            continue
        if header:
            raise TranscriptError(path, line_no, "a new conversation header needs a blank line before it")
        m = SPEAKER_LINE.match(line)
        if not m or not (m["text"] or "").strip():
            raise TranscriptError(path, line_no, f"expected 'Speaker: text', got {line[:60]!r}")
        text = m["text"].strip()
        if len(text) > MAX_TEXT_CHARS:
            raise TranscriptError(path, line_no, f"turn of {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
        turns.append(Turn(m["speaker"].strip(), text))
    if conv_id is not None:
        yield finish()


def jsonl_transcripts(path: str | Path) -> Iterator[ImportedConversation]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such transcript file")
    line_no = 0
    for conv in jsonl_conversations(path):  # raises CorpusError with file and line
        line_no += 1
        yield ImportedConversation(conv.id, conv.turns, line_no)


def transcript_items(conversations: Iterator[ImportedConversation], bot: str, system: str, set_name: str,
                     path: str | Path) -> list[Item]:
    items = []
    speakers: set[str] = set()
    for conv in conversations:
        turns = merge_consecutive(conv.turns)
        speakers.update(t.speaker for t in turns)
        for t, turn in enumerate(turns):
            if turn.speaker == bot and t > 0:
                context = tuple(x.text for x in turns[:t])
                items.append(Item(item_id(set_name, system, conv.id, t), system, context, turn.text))
    if not items:
        known = ", ".join(sorted(speakers)[:10]) or "none"
        raise TranscriptError(path, 1, f"no turn by bot speaker {bot!r} after another turn; speakers in the file: {known}")
    return items


def import_transcripts(path: str | Path, layout: str, bot: str, system: str | None = None,
                       name: str | None = None, seed: int = 0) -> RatingSet:
    """A rating set of every turn by ``bot`` in the file (``layout``: jsonl or meena)."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    system = system or bot
    name = name or f"{Path(path).stem}-{system}"
    convs = jsonl_transcripts(path) if layout == "jsonl" else meena_log_conversations(path)
    items = transcript_items(convs, bot, system, name, path)
    return RatingSet(name, "transcripts", shuffled(items, seed), {system: system_info("imported")}, None)

