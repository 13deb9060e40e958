"""Candidate filters that run before ranking: cross-turn / self repetition, and safety.

Meena's full system removed sampled candidates that repeat earlier turns (a long common sub-sequence
rule; SSA 74% -> 79%) and candidates a safety classifier flagged.  Both are here as small objects the
reply engine applies to every candidate:

- ``RepetitionFilter``: a candidate is dropped when most of it is one contiguous run of words copied
  from an earlier turn ("how are you" to "how are you?"; but "I'm good, how are you?" stays), or
  when it repeats a word n-gram of its own.
- ``SafetyFilter``: a list of blocked words or phrases, matched case-insensitively on word boundaries
  ("ass" blocks "ass" and "Ass!", not "class"), plus an optional ``SafetyClassifier`` hook.

Words are lowercased ``\\w+`` runs with inner apostrophes kept ("don't" is one word), so punctuation
and spacing differences do not hide a repetition.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

WORD_RE = re.compile(r"\w+(?:'\w+)*")


class FilterError(ValueError):
    """A filter setting or a blocklist file is invalid."""


def words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


def longest_common_run(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest contiguous word run shared by ``a`` and ``b``.

    Dynamic programming over matching positions only (``positions[w]`` = where w occurs in ``b``), so
    the cost is the number of matching word pairs rather than len(a) * len(b).
    """
    positions: dict[str, list[int]] = {}
    for j, w in enumerate(b):
        positions.setdefault(w, []).append(j)
    best, previous = 0, {}  # previous[j]: run length ending at a[i-1], b[j]
    for w in a:
        current = {j: previous.get(j - 1, 0) + 1 for j in positions.get(w, ())}
        if current:
            best = max(best, max(current.values()))
        previous = current
    return best


def repeats_itself(tokens: Sequence[str], n: int) -> bool:
    """True when some word n-gram occurs more than once ("i don't know i don't know")."""
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return any(count > 1 for count in grams.values())


@dataclass(frozen=True)
class RepetitionFilter:
    """Drop candidates that repeat an earlier turn or themselves.

    turn_overlap: drop when (longest word run shared with some earlier turn) / (the candidate's words)
        >= this; 1.0 drops only candidates that are wholly a copied stretch of a turn.
    min_overlap_words: ...and the shared run is at least this many words, so echoing "hi" to "hi" or
        "lol" to "lol" is allowed (a greeting is not a repetition problem).
    self_ngram: drop a candidate in which a word n-gram of this size occurs twice; 0 turns this off.
    """

    turn_overlap: float = 0.8
    min_overlap_words: int = 3
    self_ngram: int = 3

    def __post_init__(self) -> None:
        if not 0.0 < self.turn_overlap <= 1.0:
            raise FilterError(f"turn_overlap must be in (0, 1], got {self.turn_overlap}")
        if self.min_overlap_words < 1:
            raise FilterError(f"min_overlap_words must be >= 1, got {self.min_overlap_words}")
        if self.self_ngram < 0 or self.self_ngram == 1:
            raise FilterError(f"self_ngram must be 0 (off) or >= 2, got {self.self_ngram}")

    def repeats_turn(self, candidate: Sequence[str], turn: Sequence[str]) -> bool:
        run = longest_common_run(candidate, turn)
        return run >= self.min_overlap_words and run / len(candidate) >= self.turn_overlap

    def check(self, context: Sequence[str], texts: Sequence[str]) -> list[str | None]:
        """Per candidate text: "repetition" (repeats a context turn), "self_repetition", or None."""
        turns = [words(t) for t in context]
        verdicts: list[str | None] = []
        for text in texts:
            cand = words(text)
            if cand and any(turn and self.repeats_turn(cand, turn) for turn in turns):
                verdicts.append("repetition")
            elif self.self_ngram and repeats_itself(cand, self.self_ngram):
                verdicts.append("self_repetition")
            else:
                verdicts.append(None)
        return verdicts


class SafetyClassifier(Protocol):
    """The hook for a learned safety model: flag replies given their conversation.

    Called with the context turns (oldest first) and a batch of candidate replies; returns one bool per
    reply, True meaning unsafe (the candidate is dropped).  For streamed strategies it also sees each
    prefix of a reply before that prefix is delivered, so it should accept partial replies.
    """

    def __call__(self, context: Sequence[str], replies: Sequence[str]) -> Sequence[bool]: ...


class SafetyFilter:
    """Blocked phrases (case-insensitive, word-boundary aware) and an optional classifier."""

    def __init__(self, blocklist: Iterable[str] = (), classifier: SafetyClassifier | None = None):
        # One phrase = its words joined by any whitespace, so "kill  you" and "kill\nyou" match "kill you".
        self.phrases = sorted({" ".join(p.split()) for p in blocklist if p.strip()}, key=lambda p: (-len(p), p))
        self.classifier = classifier
        self.max_phrase_words = max((len(p.split()) for p in self.phrases), default=1)
        self._pattern = None
        if self.phrases:
            alternatives = "|".join(r"\s+".join(map(re.escape, p.split())) for p in self.phrases)
            # Lookarounds instead of \b so phrases that start or end with punctuation still match.
            self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    @classmethod
    def from_file(cls, path: str | Path, classifier: SafetyClassifier | None = None) -> "SafetyFilter":
        """A blocklist file: one word or phrase per line, UTF-8; blank lines and lines starting with # skipped."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"blocklist {path}: no such file (one blocked word or phrase per line)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise FilterError(f"blocklist {path}: not UTF-8 text (byte {e.start})") from None
        return cls((line for line in lines if not line.lstrip().startswith("#")), classifier)

    def first_blocked(self, text: str) -> re.Match | None:
        """The leftmost blocked-phrase match in ``text``, or None."""
        return self._pattern.search(text) if self._pattern else None

    def unsafe(self, context: Sequence[str], texts: Sequence[str]) -> list[bool]:
        """Per text: contains a blocked phrase, or the classifier flags it."""
        flags = [self.first_blocked(t) is not None for t in texts]
        if self.classifier is not None and texts:
            verdicts = list(self.classifier(list(context), list(texts)))
            if len(verdicts) != len(texts):
                raise FilterError(f"safety classifier returned {len(verdicts)} verdicts for {len(texts)} replies")
            flags = [f or bool(v) for f, v in zip(flags, verdicts)]
        return flags
