"""The decoding loops of the reply engine, and the one seam every next-token distribution passes through.

Each step, ``NextTokens`` runs the decoder one token for every live row, then

1. ``processors`` change what the model believes: the result is the distribution candidates are
   scored and ranked by (``Draft.token_logprobs``).  kNN-LM interpolation is one (``chatbot.memory``);
   with none, it is the model's own distribution at temperature 1.
2. ``constraints`` mask what may be chosen without changing any score: the special tokens that are never
   generated (``BanTokens``), end-of-turn before ``min_new_tokens`` (``MinLength``).

Sampling (``sample_and_rank``, ``sample``), greedy decoding and beam search all take their next tokens
from that one place, so a processor added there reaches every strategy.  Sampling then applies the
temperature and top-k / top-p truncation to the constrained scores; greedy takes their argmax; beam
search extends each beam by them.

The loops only decode: a context's drafts go to ``on_done(context, drafts)`` as soon as its last row
ends, and the caller (``chatbot.generate``) filters, ranks, falls back and delivers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from chatbot.model import ChatModel, DecoderState, EncoderOutput
from chatbot.tokenizer import BOS_ID, EOT_ID


@dataclass
class Draft:
    """One decoded candidate before detokenizing and filtering."""

    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)  # one per scored token, </t> included
    finished: bool = False  # ended with </t> (else it hit max_new_tokens or was cut)

    @property
    def log_likelihood(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def normalized_log_likelihood(self) -> float:
        return self.log_likelihood / max(len(self.token_logprobs), 1)


@dataclass
class StepView:
    """What a processor may read about the rows of one decoding step."""

    step: int  # tokens generated before this one (0: the first reply token)
    hidden: Tensor  # (R, d) the decoder's final states, the ones the output projection read
    row_contexts: Tensor  # (R,) the context (index into the call's contexts) of each row


class LogitsProcessor(Protocol):
    def __call__(self, logprobs: Tensor, view: StepView) -> Tensor:
        """(R, V) log-probabilities (or masked scores) -> (R, V).  May write into its input: each stage
        hands its processors a tensor nobody else reads."""
        ...


@dataclass(frozen=True)
class BanTokens:
    """Tokens that are never generated (padding, start, separators)."""

    ids: tuple[int, ...]

    def __call__(self, scores: Tensor, view: StepView) -> Tensor:
        scores[:, list(self.ids)] = float("-inf")
        return scores


@dataclass(frozen=True)
class MinLength:
    """End-of-turn is impossible before ``min_new_tokens`` tokens."""

    min_new_tokens: int
    eot_id: int = EOT_ID

    def __call__(self, scores: Tensor, view: StepView) -> Tensor:
        if view.step < self.min_new_tokens:
            scores[:, self.eot_id] = float("-inf")
        return scores


class NextTokens:
    """One decoder step -> (scoring log-probabilities, constrained scores), both (R, V)."""

    def __init__(self, model: ChatModel, processors: Sequence[LogitsProcessor] = (),
                 constraints: Sequence[LogitsProcessor] = ()):
        self.model = model
        self.processors, self.constraints = list(processors), list(constraints)

    def __call__(self, tokens: Tensor, state: DecoderState, step: int, row_contexts: Tensor) -> tuple[Tensor, Tensor]:
        logprobs = self.model.decode_step(tokens, state)[:, -1].float().log_softmax(-1)
        view = StepView(step, state.hidden[:, -1], row_contexts)
        for processor in self.processors:
            logprobs = processor(logprobs, view)
        allowed = logprobs.clone()  # the constraints' own copy: the scores above stay as they are
        for constraint in self.constraints:
            allowed = constraint(allowed, view)
        return logprobs, allowed


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


@dataclass(frozen=True)
class Sampling:
    """How ``sample`` picks among the constrained scores."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def pick(allowed: Tensor, sampling: Sampling, segments: list[tuple[int, int]],
         generators: Sequence[torch.Generator]) -> Tensor:
    """Next token per row from the constrained scores (R, V), which it overwrites; ``segments``:
    (context, rows) blocks in row order, each context drawing from its own generator."""
    if sampling.greedy:
        return allowed.argmax(-1)
    scores = filter_logits(allowed.div_(sampling.temperature), sampling.top_k, sampling.top_p)
    # Inverse-CDF sampling on unnormalised weights (the draw is scaled by the total instead), one
    # uniform draw per row from that row's context generator, so batching changes nothing.  Several
    # times cheaper than softmax + torch.multinomial over an 8K vocabulary; in place, because at
    # (rows, vocabulary) every fresh buffer costs page faults.
    cdf = scores.sub_(scores.max(-1, keepdim=True).values).exp_().cumsum_(-1)  # the best token weighs 1
    uniform = torch.cat([torch.rand(count, generator=generators[context], device=allowed.device)
                         for context, count in segments])
    # right=True: the first token whose cumulative weight exceeds the draw; zero-weight tokens never win
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).squeeze(1)
    return picked.clamp_max(allowed.shape[-1] - 1)


DoneCallback = Callable[[int, list[Draft]], None]


class CandidateDecoder:
    """The decoding loops of one call: every row of every context steps together through the
    incremental caches; a row that ends leaves the batch (``DecoderState.select``)."""

    def __init__(self, model: ChatModel, next_tokens: NextTokens, max_new_tokens: int, on_done: DoneCallback,
                 on_step: Callable[[int], None] = lambda steps: None):
        self.model, self.next_tokens, self.max_new_tokens = model, next_tokens, max_new_tokens
        self.on_done, self.on_step = on_done, on_step

    def sample(self, enc: EncoderOutput, n: int, sampling: Sampling, generators: Sequence[torch.Generator],
               keep_going: Callable[[int, Draft], bool] | None = None) -> None:
        """n candidates per context (sample_and_rank; n = 1 for sample and greedy).  ``keep_going(c,
        draft)`` is asked after each token that is not end-of-turn; False ends that row (a cut stream)."""
        C, device = enc.states.shape[0], enc.states.device
        state = self.model.start_decoding(enc, repeats=n, max_new_tokens=self.max_new_tokens)
        drafts = [Draft() for _ in range(C * n)]
        rows = torch.arange(C * n, device=device)  # which draft each live row is; stays context-major
        remaining = [n] * C
        tokens = torch.full((C * n, 1), BOS_ID, dtype=torch.long, device=device)
        for step in range(self.max_new_tokens):
            self.on_step(step + 1)  # before any reply of this step snapshots it
            row_contexts = rows // n
            logprobs, allowed = self.next_tokens(tokens, state, step, row_contexts)
            contexts_of, counts = torch.unique_consecutive(row_contexts, return_counts=True)
            nxt = pick(allowed, sampling, list(zip(contexts_of.tolist(), counts.tolist())), generators)
            picked = logprobs.gather(1, nxt[:, None]).squeeze(1).tolist()
            last_step = step == self.max_new_tokens - 1
            keep, done_contexts = [], []
            for i, (r, t, lp) in enumerate(zip(rows.tolist(), nxt.tolist(), picked)):
                draft, c = drafts[r], r // n
                draft.token_logprobs.append(lp)
                if t == EOT_ID:
                    draft.finished = True
                    ends = True
                else:
                    draft.token_ids.append(t)
                    ends = last_step or (keep_going is not None and not keep_going(c, draft))
                if not ends:
                    keep.append(i)
                    continue
                remaining[c] -= 1
                if remaining[c] == 0:
                    done_contexts.append(c)
            for c in done_contexts:
                self.on_done(c, drafts[c * n:(c + 1) * n])
            if not keep:
                break
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                state.select(index)  # finished rows leave the batch: no more work for them
                rows, nxt = rows[index], nxt[index]
            tokens = nxt[:, None]

    def beam(self, enc: EncoderOutput, B: int, rank_key: Callable[[Draft], float]) -> None:
        """Beam search with ``B`` beams per context, reordered through ``DecoderState.select``.

        Each step extends every beam by every token and keeps the top 2B (so B survive even if B of
        them end); an end-of-turn among the top B becomes a finished hypothesis.  A context stops when
        it has B finished hypotheses and its best live beam cannot beat the worst of them (by
        ``rank_key``): exact for total log-likelihood (scores only fall), the usual heuristic under
        length normalization.
        """
        C, device = enc.states.shape[0], enc.states.device
        V = self.model.config.vocab_size
        state = self.model.start_decoding(enc, repeats=B, max_new_tokens=self.max_new_tokens)
        live = list(range(C))  # the context of each block of B rows
        beams = [[Draft() for _ in range(B)] for _ in range(C)]
        finished: list[list[Draft]] = [[] for _ in range(C)]
        # All beams start identical; only the first may expand at step 0, or the top-B would be B copies.
        scores = torch.full((C, B), float("-inf"), device=device)
        scores[:, 0] = 0.0
        tokens = torch.full((C * B, 1), BOS_ID, dtype=torch.long, device=device)

        def done(finished_c: list[Draft], best_live: Draft) -> bool:
            if len(finished_c) < B:
                return False
            worst_kept = sorted((rank_key(d) for d in finished_c), reverse=True)[B - 1]
            return rank_key(best_live) <= worst_kept

        for step in range(self.max_new_tokens):
            self.on_step(step + 1)  # before any reply of this step snapshots it
            row_contexts = torch.tensor(live, device=device).repeat_interleave(B)
            logprobs, allowed = self.next_tokens(tokens, state, step, row_contexts)  # (L*B, V)
            total = (scores.reshape(-1, 1) + allowed).view(len(live), B * V)
            top_scores, top_index = total.topk(min(2 * B, B * V), dim=1)  # (L, 2B)
            top_beam, top_token = top_index // V, top_index % V
            top_logprob = logprobs.view(len(live), B, V)[
                torch.arange(len(live), device=device)[:, None], top_beam, top_token]
            rows, next_tokens, next_scores, next_live, next_beams = [], [], [], [], []
            for i, c in enumerate(live):
                extended: list[tuple[int, int, float, float]] = []
                for rank, (s, b, t, lp) in enumerate(zip(top_scores[i].tolist(), top_beam[i].tolist(),
                                                         top_token[i].tolist(), top_logprob[i].tolist())):
                    if s == float("-inf") or len(extended) == B:
                        break
                    parent = beams[i][b]
                    if t == EOT_ID:
                        if rank < B:
                            finished[c].append(Draft(list(parent.token_ids), parent.token_logprobs + [lp], True))
                        continue
                    extended.append((b, t, s, lp))
                children = [Draft(beams[i][b].token_ids + [t], beams[i][b].token_logprobs + [lp])
                            for b, t, _, lp in extended]
                if step == self.max_new_tokens - 1 or not children or done(finished[c], children[0]):
                    self.on_done(c, sorted(finished[c] + children, key=rank_key, reverse=True)[:B])
                    continue
                while len(children) < B:  # only with a vocabulary smaller than 2B: pad with dead beams
                    extended.append(extended[-1][:2] + (float("-inf"), 0.0))
                    children.append(children[-1])
                next_live.append(c)
                next_beams.append(children)
                for b, t, s, _ in extended:
                    rows.append(i * B + b)
                    next_tokens.append(t)
                    next_scores.append(s)
            if not next_live:
                break
            state.select(torch.tensor(rows, device=device))  # follow the beams; finished contexts leave
            live, beams = next_live, next_beams
            scores = torch.tensor(next_scores, device=device).view(len(live), B)
            tokens = torch.tensor(next_tokens, device=device)[:, None]


def teacher_forced_logprobs(model: ChatModel, enc: EncoderOutput, context_rows: Sequence[int],
                            replies: Sequence[Sequence[int]], processors: Sequence[LogitsProcessor] = ()) -> list[list[float]]:
    """Per reply (token ids, no end-of-turn), the log-probability of each of its tokens and of the
    end-of-turn after them, given context ``context_rows[i]`` of ``enc``: the same scoring distribution
    decoding uses (the processors applied; the constraints are not, as in decoding's scores).
    Processors see every position at once (``StepView.step`` is -1)."""
    if not replies:
        return []
    device = enc.states.device
    width = max(len(ids) for ids in replies) + 1
    tgt_in = torch.full((len(replies), width), model.config.pad_id, dtype=torch.long, device=device)
    targets = torch.full((len(replies), width), model.config.pad_id, dtype=torch.long, device=device)
    for i, ids in enumerate(replies):
        tgt_in[i, : len(ids) + 1] = torch.tensor([BOS_ID, *ids], device=device)
        targets[i, : len(ids) + 1] = torch.tensor([*ids, EOT_ID], device=device)
    rows = torch.as_tensor(list(context_rows), device=device)
    sub = EncoderOutput(enc.states[rows], enc.padding[rows])
    hidden = model.decode_hidden(tgt_in, sub)  # (B, T, d)
    logprobs = model.logits(hidden).float().log_softmax(-1)
    if processors:
        real = targets.ne(model.config.pad_id)  # end-of-turn is never the pad id
        flat = logprobs[real]  # (N, V)
        view = StepView(-1, hidden[real], rows[:, None].expand(-1, width)[real])
        for processor in processors:
            flat = processor(flat, view)
        logprobs = logprobs.clone()
        logprobs[real] = flat
    picked = logprobs.gather(2, targets[..., None])[..., 0]
    return [picked[i, : len(ids) + 1].tolist() for i, ids in enumerate(replies)]
