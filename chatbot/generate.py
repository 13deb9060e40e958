"""Reply generation on the incremental decoder.

The core loop decodes many candidate rows at once: the encoder runs once per context, its k/v are
shared by that context's candidates, every row steps together through the caches, and a row that
emits the end-of-turn token leaves the batch (it costs nothing afterwards).

Randomness is per context: each context draws from its own generator seeded by the call's seed, so a
context gets the same candidates whether it is decoded alone or in a batch with others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from chatbot.data import join_context
from chatbot.model import ChatModel
from chatbot.tokenizer import BOS_ID, EOT_ID, PAD_ID, ChatTokenizer


@dataclass
class Candidate:
    token_ids: list[int]
    log_likelihood: float  # sum of log p(token) under the model (temperature 1), </t> included
    finished: bool  # ended with </t> (else it hit max_new_tokens)

    @property
    def length(self) -> int:  # scored tokens, </t> included when present
        return len(self.token_ids) + int(self.finished)

    @property
    def normalized_log_likelihood(self) -> float:
        return self.log_likelihood / max(self.length, 1)


@dataclass
class SampledBatch:
    candidates: list[list[Candidate]]  # per context, in sampling order
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    timings: dict = field(default_factory=dict)


def contexts_to_tensor(tokenizer: ChatTokenizer, contexts: list[list[str]], max_source_len: int) -> Tensor:
    """Each context (a list of turn texts, oldest first) -> right-padded ids (C, S)."""
    rows = [join_context(tokenizer.encode_batch(turns), max_source_len) for turns in contexts]
    width = max(len(r) for r in rows)
    src = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        src[i, : len(r)] = torch.from_numpy(r)
    return src


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Mask all but the top-k tokens and/or the smallest set with cumulative probability >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample_candidates(model: ChatModel, src: Tensor, num_candidates: int = 1, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 64, min_new_tokens: int = 1,
                      seed: int | None = None, greedy: bool = False) -> SampledBatch:
    """Draw ``num_candidates`` replies for every context row of ``src`` (C, S) in one batched decode."""
    device = src.device
    C, N = src.shape[0], num_candidates
    max_new_tokens = min(max_new_tokens, model.config.max_target_len - 1)
    base_seed = seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    generators = [torch.Generator(device=device).manual_seed(base_seed) for _ in range(C)]

    t0 = time.perf_counter()
    state = model.start_decoding(model.encode(src), repeats=N)
    t1 = time.perf_counter()
    rows = torch.arange(C * N, device=device)  # which candidate each live row is
    tokens = torch.full((C * N, 1), BOS_ID, dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in range(C * N)]
    loglik = torch.zeros(C * N, dtype=torch.float64)
    finished = [False] * (C * N)
    step = 0
    for step in range(max_new_tokens):
        logits = model.decode_step(tokens, state)[:, -1].float()  # (rows, V)
        logprobs = logits.log_softmax(-1)
        logits[:, PAD_ID] = logits[:, BOS_ID] = float("-inf")  # never generated
        if step < min_new_tokens:
            logits[:, EOT_ID] = float("-inf")
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = torch.empty(len(rows), dtype=torch.long, device=device)
            context_of = rows // N
            for c in context_of.unique().tolist():  # per-context generators: batching changes nothing
                sel = (context_of == c).nonzero().squeeze(1)
                nxt[sel] = torch.multinomial(probs[sel], 1, generator=generators[c]).squeeze(1)
        loglik[rows.cpu()] += logprobs.gather(1, nxt[:, None]).squeeze(1).double().cpu()
        done = nxt.eq(EOT_ID)
        for r, t, d in zip(rows.tolist(), nxt.tolist(), done.tolist()):
            if d:
                finished[r] = True
            else:
                out[r].append(t)
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            state.select(keep)
            rows, nxt = rows[keep], nxt[keep]
        tokens = nxt[:, None]
    t2 = time.perf_counter()
    candidates = [[Candidate(out[c * N + j], float(loglik[c * N + j]), finished[c * N + j]) for j in range(N)]
                  for c in range(C)]
    return SampledBatch(candidates, encode_seconds=t1 - t0, decode_seconds=t2 - t1, steps=step + 1)
