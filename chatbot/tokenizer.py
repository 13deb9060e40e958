"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``), trained on the training split.

Byte-level means every string, emoji, CJK and control characters included, encodes and decodes back
to itself; no normalizer runs, so round trips are exact.  Special tokens have fixed ids so that model
configs can name them, and user text can never produce them (``encode_special_tokens``): typing
"<sep>" into a chat yields the characters, not the separator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOT, SEP, KNOWLEDGE = "<pad>", "<s>", "</t>", "<sep>", "<know>"
SPECIAL_TOKENS = [PAD, BOS, EOT, SEP, KNOWLEDGE]  # ids 0..4, in this order
PAD_ID, BOS_ID, EOT_ID, SEP_ID, KNOWLEDGE_ID = range(len(SPECIAL_TOKENS))


class ChatTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != expected_id:
                raise ValueError(f"tokenizer must map {token!r} to id {expected_id}")
        tokenizer.encode_special_tokens = True
        self.backend = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
              show_progress: bool = False) -> "ChatTokenizer":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "ChatTokenizer":
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def fingerprint(self) -> str:
        """A short hash of the tokenizer's JSON: tokenized data caches are keyed by it."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def to_transformers(self):
        """The same tokenizer as a ``transformers.PreTrainedTokenizerFast``."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self.backend, pad_token=PAD, bos_token=BOS,
                                       eos_token=EOT, sep_token=SEP)
