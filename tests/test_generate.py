"""The reply engine on the tiny trained model: strategies, scores, seeds, batching, filters, streaming."""

from __future__ import annotations

import dataclasses
import math
import re
import time

import pytest
import torch

from chatbot.filters import RepetitionFilter, SafetyFilter
from chatbot.generate import (
    FALLBACK_TEXT,
    DecodingConfig,
    GenerationError,
    ReplyEngine,
    context_seed,
    contexts_to_tensor,
    words_before,
)
from chatbot.modeldir import load_model
from chatbot.ranking import LikelihoodRanker
from chatbot.tokenizer import BOS_ID, EOT_ID

CONTEXTS = [
    ["hi there", "hello! how are you?", "i'm good, what do you do for fun?"],
    ["what is your favorite food?"],
    ["do you like music", "yes, mostly jazz", "who is your favorite?"],
]
# Seven turns: the most the model reads.  A turn put in front is invisible to the model (same
# candidates) but still checked by the repetition filter.
SEVEN_TURNS = ["hi", "hello", "how are you", "good, you?", "fine thanks", "what do you do?", "i am a student"]
# Longer, multi-word replies from the briefly trained model (it prefers one-token replies otherwise).
WORDY = DecodingConfig(temperature=1.0, min_new_tokens=10, max_new_tokens=16, seed=7)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def engine(loaded):
    return ReplyEngine(loaded.model, loaded.tokenizer)


@pytest.fixture(scope="module")
def meena_engine(loaded):
    """Ranks by total log-likelihood, whatever the default: beam search's stopping rule is exact only then."""
    return ReplyEngine(loaded.model, loaded.tokenizer, ranker=LikelihoodRanker(0.0))


def teacher_forced_loglik(loaded, context: list[str], ids: list[int], finished: bool) -> float:
    src = contexts_to_tensor(loaded.tokenizer, [context], loaded.model.config.max_source_len)
    with torch.no_grad():
        logits = loaded.model(src, torch.tensor([[BOS_ID] + ids]))
    logprobs = logits.log_softmax(-1)[0].gather(1, torch.tensor(ids + [EOT_ID])[:, None])[:, 0]
    return float(logprobs.sum() if finished else logprobs[:-1].sum())


def streamed(engine: ReplyEngine, contexts, config, **kwargs):
    pieces: dict[int, list[str]] = {}
    replies = engine.reply(contexts, config, on_piece=lambda i, p: pieces.setdefault(i, []).append(p), **kwargs)
    return replies, pieces


def as_tuple(reply):
    return reply.text, reply.token_ids, [(c.text, c.token_ids, c.dropped_by) for c in reply.candidates or []]


# ----------------------------------------------------------------------------------------- config and input


@pytest.mark.parametrize("kwargs", [
    {"strategy": "nucleus"}, {"num_candidates": 0}, {"num_candidates": -3}, {"num_candidates": 10_000},
    {"temperature": 0}, {"temperature": -1.0}, {"temperature": float("nan")}, {"top_k": -1}, {"top_p": 0.0},
    {"top_p": 1.5}, {"beam_size": 0}, {"max_new_tokens": 0}, {"min_new_tokens": -1},
    {"min_new_tokens": 50, "max_new_tokens": 40}, {"seed": -1}, {"num_candidates": 2.5},
])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(GenerationError):
        DecodingConfig(**kwargs)


def test_temperature_zero_error_says_what_to_do():
    with pytest.raises(GenerationError, match="strategy='greedy'"):
        DecodingConfig(temperature=0)


@pytest.mark.parametrize("contexts, message", [
    ("hello", "list of conversations"),
    ([[]], "context 0 has no turns"),
    ([["hi"], [""]], "context 1, turn 0 is empty"),
    ([["hi", "   \n"]], "context 0, turn 1 is empty"),
    ([["hi", 3]], "context 0, turn 1: expected a string"),
    (["hi"], "context 0 must be a list"),
    ([["x" * 10_001]], "the limit is 10000"),
    ([["hi"], ["ok", "lone \ud800 surrogate"]], "context 1, turn 1 is not valid Unicode"),
])
def test_bad_contexts_are_refused(engine, contexts, message):
    with pytest.raises(GenerationError, match=message):
        engine.reply(contexts, DecodingConfig(seed=1))


def test_empty_batch_and_wrong_config_type(engine):
    assert engine.reply([], DecodingConfig()) == []
    with pytest.raises(GenerationError, match="DecodingConfig"):
        engine.reply([["hi"]], {"strategy": "greedy"})


def test_long_contexts_are_cut_not_refused(engine, loaded):
    long_turn = "tell me more about that " * 300  # ~7k characters, far over the 64-token source limit
    context = [long_turn] * 12
    (reply,) = engine.reply([context], DecodingConfig(strategy="greedy", max_new_tokens=5))
    # The model read the last 7 turns cut from the left: the same as giving just those.
    (cut,) = engine.reply([context[-7:]], DecodingConfig(strategy="greedy", max_new_tokens=5))
    assert reply.token_ids == cut.token_ids


# ----------------------------------------------------------------------------------------- strategies and scores


@pytest.mark.parametrize("strategy", ["sample_and_rank", "sample", "greedy", "beam"])
def test_scores_are_the_models_log_likelihood(engine, loaded, strategy):
    config = DecodingConfig(strategy=strategy, seed=3, num_candidates=5, max_new_tokens=12)
    for context, reply in zip(CONTEXTS, engine.reply(CONTEXTS, config, return_candidates=True)):
        for cand in reply.candidates:
            finished = len(cand.token_ids) < 12
            expected = teacher_forced_loglik(loaded, context, cand.token_ids, finished)
            assert cand.log_likelihood == pytest.approx(expected, abs=1e-3)
            assert cand.normalized_log_likelihood == pytest.approx(
                cand.log_likelihood / (len(cand.token_ids) + finished), abs=1e-6)


def test_sample_and_rank_returns_the_best_ranked_kept_candidate(loaded):
    for ranker, key in [(LikelihoodRanker(0.0), lambda c: c.log_likelihood),
                        (LikelihoodRanker(1.0), lambda c: c.normalized_log_likelihood)]:
        engine = ReplyEngine(loaded.model, loaded.tokenizer, ranker=ranker)
        (reply,) = engine.reply([CONTEXTS[0]], WORDY, return_candidates=True)
        assert len(reply.candidates) == WORDY.num_candidates
        assert [c.score for c in reply.candidates] == pytest.approx([key(c) for c in reply.candidates])
        assert [key(c) for c in reply.candidates] == sorted(map(key, reply.candidates), reverse=True)
        best = next(c for c in reply.candidates if c.dropped_by is None)
        assert (reply.text, reply.log_likelihood) == (best.text, best.log_likelihood)


def test_greedy_is_beam_of_one_and_top_k_of_one(meena_engine):
    engine = meena_engine
    greedy = engine.reply(CONTEXTS, DecodingConfig(strategy="greedy", max_new_tokens=12))
    beam1 = engine.reply(CONTEXTS, DecodingConfig(strategy="beam", beam_size=1, max_new_tokens=12))
    top1 = engine.reply(CONTEXTS, DecodingConfig(strategy="sample", top_k=1, seed=5, max_new_tokens=12))
    for g, b, t in zip(greedy, beam1, top1):
        assert g.token_ids == b.token_ids == t.token_ids
        assert g.log_likelihood == pytest.approx(b.log_likelihood, abs=1e-5)


def test_greedy_picks_the_argmax_each_step(engine, loaded):
    (reply,) = engine.reply([CONTEXTS[1]], DecodingConfig(strategy="greedy", min_new_tokens=4, max_new_tokens=8))
    src = contexts_to_tensor(loaded.tokenizer, [CONTEXTS[1]], loaded.model.config.max_source_len)
    with torch.no_grad():
        logits = loaded.model(src, torch.tensor([[BOS_ID] + reply.token_ids]))[0]
    logits[:, [0, 1, 3, 4]] = -math.inf  # specials other than end-of-turn are never generated
    logits[:4, EOT_ID] = -math.inf  # min_new_tokens
    assert logits.argmax(-1)[: len(reply.token_ids)].tolist() == reply.token_ids


def test_beam_candidates_are_distinct_and_ranked(meena_engine):
    engine = meena_engine
    (reply,) = engine.reply([CONTEXTS[0]], DecodingConfig(strategy="beam", beam_size=4, max_new_tokens=10),
                            return_candidates=True)
    ids = [tuple(c.token_ids) for c in reply.candidates]
    assert 1 < len(ids) <= 4 and len(set(ids)) == len(ids)
    scores = [c.log_likelihood for c in reply.candidates]
    assert scores == sorted(scores, reverse=True)
    assert reply.log_likelihood >= max(c.log_likelihood for c in reply.candidates if c.dropped_by is None) - 1e-9


def test_length_limits(engine):
    short = engine.reply(CONTEXTS, DecodingConfig(max_new_tokens=3, seed=1, num_candidates=8), return_candidates=True)
    assert all(len(c.token_ids) <= 3 for r in short for c in r.candidates)
    long = engine.reply(CONTEXTS, DecodingConfig(min_new_tokens=6, max_new_tokens=9, seed=1, num_candidates=8),
                        return_candidates=True)
    assert all(6 <= len(c.token_ids) <= 9 for r in long for c in r.candidates)
    capped = engine.reply([CONTEXTS[0]], DecodingConfig(strategy="greedy", min_new_tokens=500, max_new_tokens=500))
    assert len(capped[0].token_ids) == 31  # the tiny model's max_target_len - 1


# ----------------------------------------------------------------------------------------- seeds and batching


def test_seed_reproduces_and_matters(engine):
    first = engine.reply(CONTEXTS, WORDY, return_candidates=True)
    again = engine.reply(CONTEXTS, WORDY, return_candidates=True)
    assert [as_tuple(r) for r in first] == [as_tuple(r) for r in again]
    other = engine.reply(CONTEXTS, dataclasses.replace(WORDY, seed=8), return_candidates=True)
    assert [as_tuple(r) for r in first] != [as_tuple(r) for r in other]
    unseeded = [engine.reply(CONTEXTS[:1], dataclasses.replace(WORDY, seed=None), return_candidates=True)[0]
                for _ in range(2)]
    assert as_tuple(unseeded[0]) != as_tuple(unseeded[1])


def test_contexts_do_not_share_a_random_stream(engine):
    """One seed for the call, yet near-identical contexts draw different samples (their own streams)."""
    config = dataclasses.replace(WORDY, num_candidates=4)
    a, b = engine.reply([["hello"], ["hello!"]], config, return_candidates=True)
    assert [c.text for c in a.candidates] != [c.text for c in b.candidates]
    assert context_seed(1, [5, 6]) == context_seed(1, [5, 6]) != context_seed(1, [5, 7])
    assert context_seed(1, [1, 23]) != context_seed(1, [12, 3]) and context_seed(1, [5]) != context_seed(2, [5])


@pytest.mark.parametrize("strategy", ["sample_and_rank", "sample", "greedy", "beam"])
def test_batching_gives_the_same_replies_as_one_at_a_time(engine, strategy):
    config = dataclasses.replace(WORDY, strategy=strategy, num_candidates=6)
    batched = engine.reply(CONTEXTS, config, return_candidates=True)
    alone = [engine.reply([c], config, return_candidates=True)[0] for c in CONTEXTS]
    assert [as_tuple(r) for r in batched] == [as_tuple(r) for r in alone]
    for b, a in zip(batched, alone):
        assert b.log_likelihood == pytest.approx(a.log_likelihood, abs=1e-4)


def test_encoder_runs_once_per_context_and_finished_rows_leave(loaded):
    engine = ReplyEngine(loaded.model, loaded.tokenizer)
    encoded, rows_per_step = [], []
    model = loaded.model
    encode, decode_step = model.encode, model.decode_step
    model.encode = lambda src: encoded.append(src.shape[0]) or encode(src)
    model.decode_step = lambda tokens, state: rows_per_step.append(tokens.shape[0]) or decode_step(tokens, state)
    try:
        engine.reply(CONTEXTS, DecodingConfig(num_candidates=10, seed=2, max_new_tokens=20))
    finally:
        del model.encode, model.decode_step
    assert encoded == [3]  # one encoder pass, one row per context (not per candidate)
    assert rows_per_step[0] == 30
    assert rows_per_step == sorted(rows_per_step, reverse=True) and rows_per_step[-1] < 30


# ----------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("strategy", ["sample_and_rank", "sample", "greedy", "beam"])
def test_streamed_pieces_concatenate_to_the_reply(engine, strategy):
    replies, pieces = streamed(engine, CONTEXTS, dataclasses.replace(WORDY, strategy=strategy))
    for i, reply in enumerate(replies):
        assert "".join(pieces.get(i, [])) == reply.text
        assert len(pieces.get(i, [])) == len(reply.text.split())  # word by word


def test_sampling_streams_while_decoding(engine, loaded):
    """Pieces of a sampled reply arrive between decoder steps, not all after the last one."""
    events = []
    decode_step = loaded.model.decode_step
    loaded.model.decode_step = lambda tokens, state: events.append("step") or decode_step(tokens, state)
    try:
        engine.reply([CONTEXTS[0]], dataclasses.replace(WORDY, strategy="sample"),
                     on_piece=lambda i, p: events.append("piece"))
    finally:
        del loaded.model.decode_step
    assert events.count("piece") > 1
    first_piece, last_step = events.index("piece"), len(events) - 1 - events[::-1].index("step")
    assert first_piece < last_step


def test_streaming_does_not_change_replies(engine):
    for strategy in ("sample_and_rank", "sample"):
        config = dataclasses.replace(WORDY, strategy=strategy)
        plain = engine.reply(CONTEXTS, config, return_candidates=True)
        with_pieces, _ = streamed(engine, CONTEXTS, config, return_candidates=True)
        assert [as_tuple(r) for r in plain] == [as_tuple(r) for r in with_pieces]


# ----------------------------------------------------------------------------------------- filters


def blocked_words_in(text: str, blocked: list[str]) -> list[str]:
    return [w for w in blocked if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text, re.IGNORECASE)]


def test_a_blocked_phrase_never_appears(loaded, engine):
    (base,) = engine.reply([CONTEXTS[0]], WORDY, return_candidates=True)
    kept = [c for c in base.candidates if c.dropped_by is None]
    # Block every word of every kept candidate except the one ranked last: it must become the reply.
    survivor = kept[-1]
    blocked = sorted({w for c in kept[:-1] for w in re.findall(r"\w+", c.text.lower())}
                     - set(re.findall(r"\w+", survivor.text.lower())))
    assert blocked
    safe_engine = ReplyEngine(loaded.model, loaded.tokenizer, safety_filter=SafetyFilter(blocked))
    (reply,), pieces = streamed(safe_engine, [CONTEXTS[0]], WORDY, return_candidates=True)
    assert reply.text == survivor.text and not reply.all_filtered
    assert not blocked_words_in(reply.text, blocked) and "".join(pieces[0]) == reply.text
    for before, after in zip(base.candidates, reply.candidates):  # same candidates, newly dropped ones marked
        assert (before.text, before.log_likelihood) == (after.text, after.log_likelihood)
        assert (after.dropped_by == "safety") == bool(blocked_words_in(after.text, blocked))


def test_fallback_when_every_candidate_is_unsafe(loaded):
    flag_all_but_fallback = lambda context, replies: [r != FALLBACK_TEXT for r in replies]  # noqa: E731
    engine = ReplyEngine(loaded.model, loaded.tokenizer, safety_filter=SafetyFilter(classifier=flag_all_but_fallback))
    for strategy in ("sample_and_rank", "beam", "sample", "greedy"):
        (reply,), pieces = streamed(engine, [CONTEXTS[0]], dataclasses.replace(WORDY, strategy=strategy),
                                    return_candidates=True)
        assert reply.all_filtered and reply.text == FALLBACK_TEXT == "".join(pieces[0]), strategy
        assert all(c.dropped_by == "safety" for c in reply.candidates)
        assert reply.log_likelihood < 0 and reply.token_ids == loaded.tokenizer.encode(FALLBACK_TEXT)
    # When the fallback text is unsafe as well, the reply is empty rather than unsafe.
    flag_all = SafetyFilter(["talk"], classifier=lambda context, replies: [True] * len(replies))
    engine = ReplyEngine(loaded.model, loaded.tokenizer, safety_filter=flag_all)
    (reply,), pieces = streamed(engine, [CONTEXTS[0]], WORDY)
    assert reply.all_filtered and reply.text == "" and not pieces


def test_streamed_reply_is_cut_before_a_blocked_phrase(loaded, engine):
    config = dataclasses.replace(WORDY, strategy="sample")
    (full,) = engine.reply([CONTEXTS[2]], config)
    words = [w for w in full.text.split() if re.fullmatch(r"\w+", w)]
    assert len(words) >= 3, full.text
    target = words[len(words) // 2]
    for phrase in (target, f"{target} zzzqqq"):  # one that completes, one that never does
        safe_engine = ReplyEngine(loaded.model, loaded.tokenizer, safety_filter=SafetyFilter([phrase]))
        (reply,), pieces = streamed(safe_engine, [CONTEXTS[2]], config, return_candidates=True)
        assert "".join(pieces.get(0, [])) == reply.text
        if phrase == target:
            match = re.search(rf"(?<!\w){target}(?!\w)", full.text, re.IGNORECASE)
            assert reply.text == (words_before(full.text, match.start()) or FALLBACK_TEXT)
            assert reply.all_filtered and reply.candidates[0].dropped_by == "safety"
            assert not blocked_words_in(reply.text, [target])
        else:  # a held-back phrase start that never completes is delivered in the end
            assert reply.text == full.text


def test_a_candidate_copying_an_earlier_turn_is_dropped(engine):
    (base,) = engine.reply([SEVEN_TURNS], WORDY, return_candidates=True)
    copied = next(c for c in base.candidates if c.dropped_by is None and len(c.text.split()) >= 3)
    # The copied turn sits beyond the model's 7-turn window, so the candidates are unchanged.
    (reply,) = engine.reply([[copied.text] + SEVEN_TURNS], WORDY, return_candidates=True)
    scores = [(c.text, c.log_likelihood) for c in reply.candidates]
    assert scores == [(c.text, c.log_likelihood) for c in base.candidates]
    for cand in reply.candidates:
        if cand.text == copied.text:
            assert cand.dropped_by == "repetition"
    assert reply.text != copied.text and not reply.all_filtered
    # Without the repetition filter the copy is an ordinary candidate again.
    unfiltered = ReplyEngine(engine.model, engine.tokenizer, repetition_filter=None)
    (plain,) = unfiltered.reply([[copied.text] + SEVEN_TURNS], WORDY, return_candidates=True)
    assert all(c.dropped_by is None for c in plain.candidates if c.text == copied.text)


def test_a_repetitive_streamed_reply_is_flagged_and_kept(engine):
    config = dataclasses.replace(WORDY, strategy="sample")
    (base,) = engine.reply([SEVEN_TURNS], config)
    (reply,), pieces = streamed(engine, [[base.text] + SEVEN_TURNS], config, return_candidates=True)
    # Already delivered while decoding, so it stays: the best (only) safe candidate is the fallback.
    assert reply.text == base.text == "".join(pieces[0])
    assert reply.all_filtered and reply.candidates[0].dropped_by == "repetition"


def test_all_candidates_repetitive_falls_back_to_the_best_of_them(loaded, engine):
    (base,) = engine.reply([SEVEN_TURNS], WORDY, return_candidates=True)
    # Every candidate's text as an earlier turn, out of the model's sight: each candidate copies one.
    context = [c.text for c in base.candidates] + SEVEN_TURNS
    strict = ReplyEngine(loaded.model, loaded.tokenizer, repetition_filter=RepetitionFilter(min_overlap_words=1))
    (reply,), pieces = streamed(strict, [context], WORDY, return_candidates=True)
    assert all(c.dropped_by in ("repetition", "self_repetition") for c in reply.candidates)
    assert reply.all_filtered and reply.text == base.candidates[0].text == "".join(pieces[0])
    assert reply.log_likelihood == base.candidates[0].log_likelihood


def test_timings(engine):
    (reply,) = engine.reply([CONTEXTS[0]], DecodingConfig(seed=1, num_candidates=4))
    for key in ("tokenize_s", "encode_s", "decode_s", "rank_s", "total_s"):
        assert reply.timings[key] >= 0
    assert reply.timings["total_s"] >= reply.timings["encode_s"] + reply.timings["decode_s"]
    assert reply.timings["decode_steps"] >= 1


@pytest.mark.parametrize("strategy", ["sample_and_rank", "sample", "beam"])
def test_each_reply_is_handed_over_once_after_its_pieces_and_before_the_call_returns(engine, strategy):
    events: list[tuple[str, int]] = []
    handed: dict[int, object] = {}
    elapsed: dict[int, float] = {}

    def on_reply(i, reply):
        assert i not in handed, "a reply was handed over twice"
        handed[i], elapsed[i] = reply, time.perf_counter() - t0
        events.append(("reply", i))

    config = DecodingConfig(strategy=strategy, seed=3, num_candidates=4, beam_size=2, max_new_tokens=12)
    t0 = time.perf_counter()
    replies = engine.reply(CONTEXTS[:3], config, on_piece=lambda i, p: events.append(("piece", i)),
                           on_reply=on_reply)
    assert sorted(handed) == [0, 1, 2] and all(handed[i] is replies[i] for i in range(3))
    for i, reply in enumerate(replies):
        assert ("piece", i) not in events[events.index(("reply", i)):]  # no piece after the reply
        # Its timings stop when it was final (not at the end of the call) and count the steps it took.
        assert reply.timings["total_s"] <= elapsed[i]
        if not reply.all_filtered:
            assert len(reply.token_ids) <= reply.timings["decode_steps"]


@pytest.mark.parametrize("strategy", ["sample_and_rank", "greedy", "beam"])
def test_decode_steps_count_the_steps_a_reply_took(engine, strategy):
    config = DecodingConfig(strategy=strategy, seed=5, num_candidates=3, beam_size=2, min_new_tokens=6,
                            max_new_tokens=6)
    for reply in engine.reply(CONTEXTS[:2], config, return_candidates=True):
        assert reply.timings["decode_steps"] == 6
        assert all(len(c.token_ids) == 6 for c in reply.candidates)
