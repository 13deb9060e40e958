"""The decoding seam (chatbot.decoding): processors reach every strategy and the scores; constraints only the choice."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chatbot.decoding import BanTokens, MinLength, StepView, teacher_forced_logprobs
from chatbot.generate import DecodingConfig, ReplyEngine, contexts_to_tensor
from chatbot.modeldir import load_model
from chatbot.tokenizer import EOT_ID

CONTEXTS = [["hi there", "hello! how are you?"], ["what is your favorite food?"]]
WORDY = DecodingConfig(temperature=1.0, min_new_tokens=3, max_new_tokens=8, seed=3, num_candidates=4)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


class Forbid:
    """A scoring processor: token ``banned`` gets no probability (renormalised), and every call is recorded."""

    def __init__(self, banned: int):
        self.banned, self.views = banned, []

    def __call__(self, logprobs: torch.Tensor, view: StepView) -> torch.Tensor:
        self.views.append(view)
        logprobs[:, self.banned] = float("-inf")
        return logprobs.log_softmax(-1)


@pytest.mark.parametrize("strategy", ["sample_and_rank", "sample", "greedy", "beam"])
def test_a_processor_reaches_every_strategy_and_the_scores(loaded, strategy):
    config = dataclasses.replace(WORDY, strategy=strategy)
    plain = ReplyEngine(loaded.model, loaded.tokenizer).reply(CONTEXTS, config, return_candidates=True)
    # The token the plain engine used most: forbidding it must change the replies.
    counts = torch.bincount(torch.tensor([t for r in plain for c in r.candidates for t in c.token_ids] or [0]))
    banned = int(counts.argmax())
    forbid = Forbid(banned)
    engine = ReplyEngine(loaded.model, loaded.tokenizer, processors=[forbid])
    replies = engine.reply(CONTEXTS, config, return_candidates=True)
    assert forbid.views and all(v.hidden.shape == (v.row_contexts.shape[0], loaded.model.config.d_model)
                                for v in forbid.views)
    for reply in replies:
        for cand in reply.candidates:
            assert banned not in cand.token_ids
    # Scores are the processed distribution's: teacher forcing through the same processor agrees.
    src = contexts_to_tensor(loaded.tokenizer, CONTEXTS, loaded.model.config.max_source_len)
    with torch.inference_mode():
        enc = loaded.model.encode(src)
        for c, reply in enumerate(replies):
            for cand in reply.candidates[:2]:  # unfinished candidates score their tokens only, no end-of-turn
                (lps,) = teacher_forced_logprobs(loaded.model, enc, [c], [cand.token_ids], [Forbid(banned)])
                assert sum(lps[:cand.scored_tokens]) == pytest.approx(cand.log_likelihood, abs=1e-3)


def test_constraints_mask_the_choice_but_not_the_scores(loaded):
    view = StepView(0, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    scores = torch.zeros(2, 6)
    out = MinLength(1)(BanTokens((0, 1))(scores, view), view)
    assert torch.isinf(out[:, [0, 1, EOT_ID]]).all() and (out[:, 3:] == 0).all()
    later = StepView(1, view.hidden, view.row_contexts)
    assert not torch.isinf(MinLength(1)(torch.zeros(2, 6), later)).any()
    # In the engine, min_new_tokens forbids end-of-turn, yet the scores stay the model's own.
    engine = ReplyEngine(loaded.model, loaded.tokenizer)
    config = dataclasses.replace(WORDY, strategy="greedy", min_new_tokens=4, max_new_tokens=6)
    (reply,) = engine.reply(CONTEXTS[:1], config, return_candidates=True)
    assert len(reply.token_ids) >= 4
    src = contexts_to_tensor(loaded.tokenizer, CONTEXTS[:1], loaded.model.config.max_source_len)
    with torch.inference_mode():
        (lps,) = teacher_forced_logprobs(loaded.model, loaded.model.encode(src), [0], [reply.token_ids])
    n = reply.candidates[0].scored_tokens
    assert sum(lps[:n]) == pytest.approx(reply.candidates[0].log_likelihood, abs=1e-3)
