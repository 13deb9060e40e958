"""TEMPORARY stand-in for ``chatbot.generate.ReplyEngine`` until that lands (same contract, no streaming
granularity: each reply arrives as one piece).  Delete this module and import from chatbot.generate then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from chatbot.generate import contexts_to_tensor, sample_candidates
from chatbot.model import ChatModel
from chatbot.tokenizer import ChatTokenizer


class GenerationError(RuntimeError):
    pass


@dataclass(frozen=True)
class DecodingConfig:
    strategy: str = "sample_and_rank"
    num_candidates: int = 20
    temperature: float = 0.88
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 40
    min_new_tokens: int = 1
    seed: int | None = None


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    log_likelihood: float
    normalized_log_likelihood: float
    all_filtered: bool = False
    timings: dict = field(default_factory=dict)


class ReplyEngine:
    def __init__(self, model: ChatModel, tokenizer: ChatTokenizer, device: str = "cpu"):
        self.model, self.tokenizer, self.device = model, tokenizer, device

    def reply(self, contexts: list[list[str]], config: DecodingConfig = DecodingConfig(), *,
              return_candidates: bool = False, on_piece: Callable[[int, str], None] | None = None) -> list[Reply]:
        t0 = time.perf_counter()
        src = contexts_to_tensor(self.tokenizer, contexts, self.model.config.max_source_len).to(self.device)
        batch = sample_candidates(self.model, src, config.num_candidates, config.temperature, config.top_k,
                                  config.top_p, config.max_new_tokens, config.min_new_tokens, config.seed)
        out = []
        for i, cands in enumerate(batch.candidates):
            best = max(cands, key=lambda c: c.log_likelihood)
            text = self.tokenizer.decode(best.token_ids).strip()
            if on_piece is not None:
                on_piece(i, text)
            out.append(Reply(text, best.token_ids, best.log_likelihood, best.normalized_log_likelihood,
                             timings={"total_s": time.perf_counter() - t0}))
        return out
