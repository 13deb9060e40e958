"""Ranking rules (chatbot/ranking.py): hand-made cases with a known winner, the backward scorer against
the training collation, and MMI through the engine and the command line on tiny models."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

from chatbot.data import ExampleStore, jsonl_conversations, write_split
from chatbot.generate import DecodingConfig, GenerationError, ReplyEngine
from chatbot.model import sequence_nll
from chatbot.modeldir import load_model
from chatbot.ranking import BackwardScorer, LikelihoodRanker, MMIRanker, RankingConfig, RankingError

CONTEXT = ["do you like music?", "yes, mostly jazz. who is your favourite?"]


@dataclass
class Cand:
    text: str
    log_likelihood: float
    scored_tokens: int


# A short generic reply with the higher total likelihood, a long specific one with the higher mean.
SHORT = Cand("Yeah.", -2.0, 3)  # mean -0.667
LONG = Cand("John Coltrane, his ballads album above all.", -6.0, 10)  # mean -0.6


def winner(ranker, candidates, context=CONTEXT):
    scores = ranker.scores(context, candidates)
    return candidates[max(range(len(candidates)), key=scores.__getitem__)]


def test_meena_ranks_by_total_log_likelihood():
    ranker = LikelihoodRanker(0.0)
    assert ranker.scores(CONTEXT, [SHORT, LONG]) == [-2.0, -6.0]
    assert winner(ranker, [SHORT, LONG]) is SHORT and ranker.name == "meena"


def test_length_normalised_ranking_divides_by_tokens_to_the_alpha():
    mean = LikelihoodRanker(1.0)
    assert mean.scores(CONTEXT, [SHORT, LONG]) == pytest.approx([-2 / 3, -0.6])
    assert winner(mean, [SHORT, LONG]) is LONG
    half = LikelihoodRanker(0.5)  # between the two: -2/sqrt(3) = -1.155 beats -6/sqrt(10) = -1.897
    assert half.scores(CONTEXT, [SHORT, LONG]) == pytest.approx([-2 / math.sqrt(3), -6 / math.sqrt(10)])
    assert winner(half, [SHORT, LONG]) is SHORT


class TableScorer:
    """Backward log-likelihoods from a table: this test is about how MMI combines the two scores."""

    def __init__(self, table: dict[tuple[str, str], float]):
        self.table, self.calls = table, []

    def mean_log_likelihoods(self, turn, replies):
        self.calls.append(turn)
        return [self.table[turn, r] for r in replies]


def test_mmi_adds_lambda_times_the_backward_score():
    turn = CONTEXT[-1]
    # The generic reply fits any turn, so the turn is unlikely given it; the specific reply predicts it.
    scorer = TableScorer({(turn, SHORT.text): -3.0, (turn, LONG.text): -1.0})
    meena_plus = MMIRanker(scorer, weight=0.5, length_penalty=0.0)
    # -2 + 0.5 * -3 = -3.5 against -6 + 0.5 * -1 = -6.5: the forward term still wins at lambda 0.5 ...
    assert meena_plus.scores(CONTEXT, [SHORT, LONG]) == pytest.approx([-3.5, -6.5])
    assert winner(meena_plus, [SHORT, LONG]) is SHORT
    # ... and the backward term at lambda 3: -2 - 9 = -11 against -6 - 3 = -9.
    assert winner(MMIRanker(scorer, weight=3.0, length_penalty=0.0), [SHORT, LONG]) is LONG
    normalised = MMIRanker(scorer, weight=1.0, length_penalty=1.0)
    assert normalised.scores(CONTEXT, [SHORT, LONG]) == pytest.approx([-2 / 3 - 3.0, -0.6 - 1.0])
    assert scorer.calls[-1] == turn  # the backward model reads the user's newest turn
    assert normalised.search_score(-6.0, 10) == pytest.approx(-0.6)  # beam search prunes on the forward part


def test_ranking_config_resolves_and_refuses_clearly(tmp_path):
    assert RankingConfig().resolved == "meena" and RankingConfig(mmi_model="dir").resolved == "mmi"
    assert RankingConfig("normalized", length_penalty=0.7).build() == LikelihoodRanker(0.7)
    assert RankingConfig("meena", length_penalty=0.7).build() == LikelihoodRanker(0.0)
    for kwargs, message in [({"ranking": "mmi"}, "needs --mmi-model"),
                            ({"ranking": "meena", "mmi_model": "dir"}, "only by --ranking mmi"),
                            ({"ranking": "longest"}, "--ranking must be one of"),
                            ({"length_penalty": -1}, "--length-penalty"),
                            ({"mmi_model": "dir", "mmi_weight": -1}, "--mmi-weight")]:
        with pytest.raises(RankingError, match=message):
            RankingConfig(**kwargs)
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        RankingConfig(mmi_model=str(tmp_path)).build()


# ----------------------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def forward(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def backward(tiny_backward_dir):
    return BackwardScorer.load(str(tiny_backward_dir))


def test_backward_model_is_marked_and_kept_apart(forward, backward, tiny_backward_dir):
    assert json.loads((tiny_backward_dir / "config.json").read_text())["direction"] == "backward"
    with pytest.raises(RankingError, match="must be a backward model"):
        BackwardScorer(forward.model, forward.tokenizer)
    with pytest.raises(GenerationError, match="backward model"):
        ReplyEngine(backward.model, backward.tokenizer)


def test_backward_scores_match_the_training_collation(backward, tmp_path):
    """log p(turn | reply) at inference is exactly the (negated) training loss of the backward example."""
    turns = ["what kind of music do you like?", "mostly jazz, some blues", "nice, me too"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "x", "turns": [{"speaker": str(i % 2), "text": t}
                                                      for i, t in enumerate(turns)]}) + "\n")
    split = write_split(jsonl_conversations(corpus), backward.tokenizer, tmp_path / "split", {}, progress=False)
    cfg = backward.model.config
    store = ExampleStore(split, cfg.max_source_len, cfg.max_target_len, direction="backward")
    for i in range(len(store)):  # example i: reply turns[i + 1] -> its context's last turn, turns[i]
        batch = store.collate([i])
        with torch.no_grad():
            nll, n = sequence_nll(backward.model(batch.src, batch.tgt_in), batch.tgt_out, cfg.pad_id)
        (score,) = backward.mean_log_likelihoods(turns[i], [turns[i + 1]])
        assert score == pytest.approx(-float(nll) / int(n), abs=1e-4)
    assert backward.mean_log_likelihoods("hi", ["", "hello"])[0] == float("-inf")  # an empty reply says nothing


def test_mmi_through_the_engine(forward, backward):
    config = DecodingConfig(num_candidates=8, temperature=1.0, max_new_tokens=12, seed=4)
    contexts = [CONTEXT, ["hi there, how are you?"]]
    plain = ReplyEngine(forward.model, forward.tokenizer, ranker=LikelihoodRanker(1.0))
    mmi = ReplyEngine(forward.model, forward.tokenizer, ranker=MMIRanker(backward, weight=2.0, length_penalty=1.0))
    for context, base, reply in zip(contexts, plain.reply(contexts, config, return_candidates=True),
                                    mmi.reply(contexts, config, return_candidates=True)):
        # Ranking changes only the order: the same seed samples the same candidates.
        assert sorted(c.text for c in base.candidates) == sorted(c.text for c in reply.candidates)
        back = backward.mean_log_likelihoods(context[-1], [c.text for c in reply.candidates])
        for cand, b in zip(reply.candidates, back):
            assert cand.score == pytest.approx(cand.normalized_log_likelihood + 2.0 * b, abs=1e-5)
        assert [c.score for c in reply.candidates] == sorted((c.score for c in reply.candidates), reverse=True)
        assert reply.text == next(c.text for c in reply.candidates if c.dropped_by is None)


def test_mmi_from_the_command_line(tiny_model_dir, tiny_backward_dir):
    from tests.test_chat import chat

    result = chat(tiny_model_dir, "--seed", "1", "--num-candidates", "4", "--show-candidates",
                  "--mmi-model", str(tiny_backward_dir), "--mmi-weight", "2")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3 and result.stderr.count("candidates, best first") == 3
    refused = chat(tiny_model_dir, "--ranking", "mmi")
    assert refused.returncode == 2 and "needs --mmi-model" in refused.stderr


def test_serve_config_builds_the_ranker(tiny_backward_dir):
    from chatbot.serve.config import ServeConfig

    config = ServeConfig(ranking=RankingConfig(mmi_model=str(tiny_backward_dir), mmi_weight=0.5), min_new_tokens=3)
    ranker = config.ranking.build()
    assert isinstance(ranker, MMIRanker) and ranker.weight == 0.5
    from chatbot.serve.app import decoding_config

    assert decoding_config(config).min_new_tokens == 3


def test_the_cli_reaches_the_serve_config(tiny_backward_dir, monkeypatch):
    """`chatbot serve --ranking ...` arrives in ServeConfig (the service itself is tested elsewhere)."""
    from chatbot.cli import build_parser
    from chatbot.serve import cli as serve_cli

    seen = {}

    async def fake_serve(config):  # stands in for the server: this test is about flag parsing
        seen["config"] = config

    monkeypatch.setattr(serve_cli, "serve", fake_serve)
    args = build_parser().parse_args(["serve", "--ranking", "normalized", "--length-penalty", "0.8",
                                      "--min-new-tokens", "4"])
    assert args.func(args) == 0
    assert seen["config"].ranking == RankingConfig("normalized", 0.8) and seen["config"].min_new_tokens == 4


def test_init_from_copies_the_weights_and_refuses_another_shape(tmp_path, small_corpus, tiny_model_dir, forward):
    from chatbot.train import Trainer, TrainConfig

    common = dict(data=str(small_corpus), tokenizer=str(tiny_model_dir / "tokenizer.json"), direction="backward",
                  init_from=str(tiny_model_dir), max_steps=1, progress=False)
    trainer = Trainer(TrainConfig(out=str(tmp_path / "ok"), preset="tiny", **common))
    expected = forward.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in trainer.raw_model.state_dict().items())
    assert trainer.model_cfg.direction == "backward"
    with pytest.raises(ValueError, match="shape or tokenizer differs"):
        Trainer(TrainConfig(out=str(tmp_path / "bad"), preset="tiny", model_overrides=(("d_model", 64),), **common))


def test_train_direction_flag(tmp_path):
    from chatbot.train import TrainConfig

    assert TrainConfig(out=str(tmp_path), direction="backward").model_config(512).direction == "backward"
    assert TrainConfig(out=str(tmp_path)).model_config(512).direction == "forward"


def test_the_bench_reranks_exactly_as_the_engine_ranks(forward, backward):
    """bench_decoding_quality samples once and reranks; that must be the reply the engine gives."""
    from chatbot.generate import choose, rank_candidates

    config = DecodingConfig(num_candidates=6, temperature=1.0, max_new_tokens=10, seed=11)
    contexts = [CONTEXT, ["hi there, how are you?"], ["what do you study?"]]
    sampled = ReplyEngine(forward.model, forward.tokenizer, ranker=LikelihoodRanker(0.0)).reply(
        contexts, config, return_candidates=True)
    for ranker in (LikelihoodRanker(1.0), LikelihoodRanker(0.5), MMIRanker(backward, 1.0, 1.0)):
        direct = ReplyEngine(forward.model, forward.tokenizer, ranker=ranker).reply(contexts, config)
        for context, reply, expected in zip(contexts, sampled, direct):
            chosen, all_filtered = choose(rank_candidates(ranker, context, list(reply.candidates)))
            assert (chosen.text, all_filtered) == (expected.text, expected.all_filtered)


def test_ranking_bench_runs_end_to_end(tiny_model_dir, tiny_backward_dir):
    from bench.bench_decoding_quality import markdown, run

    result = run(str(tiny_model_dir), limit=3, batch_size=2, seed=0, samples=1, rows="ranking",
                 mmi_model=str(tiny_backward_dir))
    names = [row["strategy"] for row in result["rows"]]
    assert names[0] == "Meena (total log-likelihood)" and names[-1].startswith("human")
    assert any(n.startswith("MMI") for n in names) and any(n.startswith("min length") for n in names)
    assert len(result["generic_replies"]) == 100
    for row in result["rows"]:
        assert 0 <= row["generic"] <= 1 and 0 <= row["nidf"] <= 1 and row["mean_words"] >= 0
    assert "| human (the test split's responses) |" in markdown(result)


def test_the_served_default_is_a_minimum_length_of_five_with_meenas_ranking() -> None:
    """docs/generation.md chooses this by measurement; chat, serve and the SSA tools share it."""
    from chatbot.ranking import DEFAULT_MIN_NEW_TOKENS, served_min_new_tokens
    from chatbot.serve.config import ServeConfig

    assert DEFAULT_MIN_NEW_TOKENS == 5 and ServeConfig().min_new_tokens == 5
    assert ServeConfig().ranking.resolved == "meena"
    assert served_min_new_tokens(40) == 5 and served_min_new_tokens(3) == 3  # never above a short maximum
