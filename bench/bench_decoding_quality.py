"""Decoding quality on held-out chitchat contexts: the table that makes the case for the defaults.

Two tables, both from the same held-out contexts (a seeded draw from the test split):

**strategies** (``--rows strategies``): for each strategy, every context gets one reply from the reply
engine (default filters on, as replies ship).

**ranking** (``--rows ranking``, issue 9): how sample-and-rank picks among its N = 20 candidates.  The
candidates are sampled once per sampling setting, and every ranking rule picks from the same
candidates with the engine's own ``rank_candidates`` and ``choose`` (so each row is exactly the reply
the engine would give with that ranker and seed, and differences are the rule's alone):

    Meena                  total log-likelihood
    normalised (alpha)     log-likelihood / tokens^alpha
    min length K + Meena   a separate sampling pass with min_new_tokens = K, ranked by Meena's rule
    MMI (lambda, alpha)    normalised score + lambda x mean log p(last context turn | reply), from the
                           backward model given with --mmi-model (rows only when it is given)
    human                  the test split's actual responses to the same contexts, for reference

Measures (eval/reply_metrics.py):

    mean words / tokens   reply length
    distinct-1 / -2       unique word unigrams / bigrams over all replies, divided by their total
    generic               share of replies equal (after lowercasing and dropping punctuation) to one of
                          the 100 most frequent responses of the training split
    generic (list)        the same against GENERIC_REPLIES, the hand-made list of earlier runs
    NIDF                  mean normalised inverse document frequency of a reply's words (See et al.
                          2019), document frequencies from the training split's responses
    repeats a turn        share of replies the repetition filter calls a copy of a context turn
    all filtered          share of replies where every candidate was dropped (a fallback reply)

Usage:  python -m bench.bench_decoding_quality [--model DIR] [--mmi-model DIR] [--rows all|strategies|ranking]
                                               [--limit 500] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from collections.abc import Iterator

import torch

from bench.common import header, write_json
from chatbot.data import chitchat_conversations, split_of
from chatbot.filters import RepetitionFilter
from chatbot.generate import MAX_TURN_CHARS, DecodingConfig, ReplyEngine, choose, rank_candidates
from chatbot.model_input import MAX_CONTEXT_TURNS
from chatbot.modeldir import load_model
from chatbot.ranking import BackwardScorer, LikelihoodRanker, MMIRanker
from eval.reply_metrics import ReplyStatistics, normalized, reply_metrics

GENERIC_REPLIES = (
    "i don't know", "idk", "i'm not sure", "not sure", "i don't care", "ok", "okay", "k", "lol", "haha", "hahaha",
    "lmao", "yes", "yeah", "yep", "yup", "no", "nope", "nah", "me too", "same", "same here", "me neither", "cool",
    "nice", "good", "great", "awesome", "that's cool", "that's nice", "that's good", "that's great",
    "that's awesome", "oh", "oh ok", "oh okay", "oh cool", "oh nice", "ah", "hmm", "wow", "really", "sure",
    "thanks", "thank you", "i see", "true", "right", "i agree", "why", "what", "hi", "hello", "hey",
)

# (row name, engine variant, config): the issue's five strategies, then two sample-and-rank variants.
# The engines rank by Meena's total log-likelihood, as these rows always have.
STRATEGIES = [
    ("greedy", "default", DecodingConfig(strategy="greedy")),
    ("beam (4)", "default", DecodingConfig(strategy="beam", beam_size=4)),
    ("sampling (T = 1.0)", "default", DecodingConfig(strategy="sample", temperature=1.0)),
    ("top-k 40 (T = 1.0)", "default", DecodingConfig(strategy="sample", temperature=1.0, top_k=40)),
    ("sample-and-rank (N = 20, T = 0.88)", "default", DecodingConfig()),
    ("sample-and-rank, length-normalised ranking", "normalized", DecodingConfig()),
    ("sample-and-rank, no repetition filter", "no_repetition_filter", DecodingConfig()),
]

# The ranking comparison: length penalties, minimum lengths (tokens) and MMI weights it tries.
LENGTH_PENALTIES = (0.5, 1.0)
MIN_LENGTHS = (5,)
MMI_WEIGHTS = (0.5, 1.0, 2.0)
MMI_LENGTH_PENALTY = 1.0


def held_out_contexts(n: int, seed: int = 0) -> list[list[str]]:
    """``n`` contexts (up to 7 turns, oldest first) from the chitchat test split, a seeded random draw.

    The test split is the training code's (a hash of the conversation id), so no context was trained on.
    """
    return [context for context, _ in held_out_examples(n, seed)]


def held_out_examples(n: int, seed: int = 0) -> list[tuple[list[str], str]]:
    """``held_out_contexts`` with the response the test split gives to each."""
    examples = list(_test_examples())
    random.Random(seed).shuffle(examples)
    if len(examples) < n:
        raise ValueError(f"the test split has {len(examples)} contexts, fewer than the {n} asked for")
    return examples[:n]


def _test_examples() -> Iterator[tuple[list[str], str]]:
    for conv in chitchat_conversations():
        if split_of(conv.id) != "test":
            continue
        texts = [t.text for t in conv.turns]
        for j in range(1, len(texts)):
            context = texts[max(0, j - MAX_CONTEXT_TURNS):j]
            if all(len(t) <= MAX_TURN_CHARS for t in context):
                yield context, texts[j]


def training_statistics() -> ReplyStatistics:
    """Response statistics of the training split: the generic list and the document frequencies."""
    return ReplyStatistics.from_conversations(c for c in chitchat_conversations() if split_of(c.id) == "train")


def measure(contexts: list[list[str]], texts: list[str], token_counts: list[int] | None, all_filtered: list[bool],
            seconds: float, stats: ReplyStatistics) -> dict:
    repetition = RepetitionFilter()
    generic = set(GENERIC_REPLIES)
    n = len(texts)
    return {
        **reply_metrics(texts, stats),
        "mean_tokens": sum(token_counts) / n if token_counts is not None else None,
        "generic_list": sum(normalized(t) in generic for t in texts) / n,
        "repeats_turn": sum(repetition.check(c, [t])[0] == "repetition" for c, t in zip(contexts, texts)) / n,
        "all_filtered": sum(all_filtered) / n,
        "seconds_per_reply": seconds / n,
    }


def reply_rows(name: str, contexts, replies, seconds: float, stats: ReplyStatistics, samples: int, **extra) -> dict:
    return {"strategy": name, **extra,
            **measure(contexts, [r.text for r in replies], [len(r.token_ids) for r in replies],
                      [r.all_filtered for r in replies], seconds, stats),
            "samples": [{"context": c, "reply": r.text} for c, r in zip(contexts[:samples], replies)]}


def decode(engine: ReplyEngine, contexts, config: DecodingConfig, batch_size: int, **kwargs) -> tuple[list, float]:
    replies, start = [], time.perf_counter()
    for i in range(0, len(contexts), batch_size):
        replies += engine.reply(contexts[i:i + batch_size], config, **kwargs)
    return replies, time.perf_counter() - start


def strategy_rows(loaded, contexts, batch_size: int, seed: int, samples: int, stats: ReplyStatistics) -> list[dict]:
    meena = LikelihoodRanker(0.0)
    engines = {"default": ReplyEngine(loaded.model, loaded.tokenizer, ranker=meena),
               "normalized": ReplyEngine(loaded.model, loaded.tokenizer, ranker=LikelihoodRanker(1.0)),
               "no_repetition_filter": ReplyEngine(loaded.model, loaded.tokenizer, repetition_filter=None, ranker=meena)}
    rows = []
    for name, variant, config in STRATEGIES:
        config = dataclasses.replace(config, seed=seed)  # greedy and beam ignore it
        replies, seconds = decode(engines[variant], contexts, config, batch_size)
        rows.append(reply_rows(name, contexts, replies, seconds, stats, samples, table="strategies",
                               config=dataclasses.asdict(config), engine=variant))
        print(f"{name}: {seconds:.0f} s", flush=True)
    return rows


class CachedBackward:
    """A backward scorer that remembers its answers: the MMI rows share one pass over the candidates."""

    def __init__(self, scorer: BackwardScorer):
        self.scorer, self.cache, self.seconds = scorer, {}, 0.0

    def mean_log_likelihoods(self, turn: str, replies: list[str]) -> list[float]:
        missing = [r for r in dict.fromkeys(replies) if (turn, r) not in self.cache]
        if missing:
            start = time.perf_counter()
            for r, v in zip(missing, self.scorer.mean_log_likelihoods(turn, missing)):
                self.cache[turn, r] = v
            self.seconds += time.perf_counter() - start
        return [self.cache[turn, r] for r in replies]


def ranking_rows(loaded, contexts, responses, batch_size: int, seed: int, samples: int, stats: ReplyStatistics,
                 mmi_model: str | None) -> list[dict]:
    """Every ranking rule picks from the same sampled candidates (see the module docstring)."""
    engine = ReplyEngine(loaded.model, loaded.tokenizer, ranker=LikelihoodRanker(0.0))
    base = DecodingConfig(seed=seed)
    rankers = [("Meena (total log-likelihood)", LikelihoodRanker(0.0))]
    rankers += [(f"normalised (alpha {a:g})", LikelihoodRanker(a)) for a in LENGTH_PENALTIES]
    backward = None
    if mmi_model:
        backward = CachedBackward(BackwardScorer.load(mmi_model))
        rankers += [(f"MMI (lambda {w:g}, alpha {MMI_LENGTH_PENALTY:g})", MMIRanker(backward, w, MMI_LENGTH_PENALTY))
                    for w in MMI_WEIGHTS]
    passes = [("", base, rankers)]
    passes += [(f"min length {k} tokens + ", dataclasses.replace(base, min_new_tokens=k), rankers[:1])
               for k in MIN_LENGTHS]
    rows = []
    for prefix, config, pass_rankers in passes:
        replies, sample_seconds = decode(engine, contexts, config, batch_size, return_candidates=True)
        print(f"sampling{' with ' + prefix.rstrip(' +') if prefix else ''}: {sample_seconds:.0f} s", flush=True)
        for name, ranker in pass_rankers:
            start, before = time.perf_counter(), backward.seconds if backward else 0.0
            texts, tokens, filtered = [], [], []
            for context, reply in zip(contexts, replies):
                chosen, all_filtered = choose(rank_candidates(ranker, context, list(reply.candidates)))
                if chosen is None:  # every candidate unsafe: the engine's fallback reply
                    chosen, all_filtered = reply, True
                texts.append(chosen.text)
                tokens.append(len(chosen.token_ids))
                filtered.append(all_filtered)
            seconds = sample_seconds + time.perf_counter() - start
            if isinstance(ranker, MMIRanker):  # each MMI row costs the whole backward pass, though the first paid it
                seconds += before  # (backward.seconds - before was spent now: already in the wall time)
            rows.append({"strategy": prefix + name, "table": "ranking", "ranker": getattr(ranker, "name", name),
                         "config": dataclasses.asdict(config),
                         **measure(contexts, texts, tokens, filtered, seconds, stats),
                         "samples": [{"context": c, "reply": t} for c, t in zip(contexts[:samples], texts)]})
            print(f"  {prefix + name}: ranking {time.perf_counter() - start:.0f} s"
                  + (f" (backward model {backward.seconds - before:.0f} s)" if backward else ""), flush=True)
    rows.append({"strategy": "human (the test split's responses)", "table": "ranking",
                 **measure(contexts, responses, None, [False] * len(responses), 0.0, stats),
                 "samples": [{"context": c, "reply": t} for c, t in zip(contexts[:samples], responses)]})
    return rows


def run(model_dir: str | None, limit: int, batch_size: int, seed: int, samples: int, rows: str = "all",
        mmi_model: str | None = None) -> dict:
    loaded = load_model(model_dir)
    examples = held_out_examples(limit, seed)
    contexts, responses = [c for c, _ in examples], [r for _, r in examples]
    stats = training_statistics()
    result_rows = []
    if rows in ("all", "strategies"):
        result_rows += strategy_rows(loaded, contexts, batch_size, seed, samples, stats)
    if rows in ("all", "ranking"):
        result_rows += ranking_rows(loaded, contexts, responses, batch_size, seed, samples, stats, mmi_model)
    return {**header(), "model": str(loaded.directory), "mmi_model": mmi_model, "contexts": len(contexts),
            "context_seed": seed, "generic_replies": sorted(stats.generic), "generic_list": list(GENERIC_REPLIES),
            "rows": result_rows}


def markdown(result: dict) -> str:
    lines = [f"Decoding quality, {result['contexts']} held-out chitchat contexts, model {result['model']}"
             + (f", MMI model {result['mmi_model']}" if result.get("mmi_model") else "") + f", {result['date']}"]
    for table in ("strategies", "ranking"):
        rows = [r for r in result["rows"] if r.get("table", "strategies") == table]
        if not rows:
            continue
        lines += ["", "| " + ("strategy" if table == "strategies" else "ranking") + " | mean words | mean tokens | "
                  "distinct-1 | distinct-2 | generic | generic (list) | NIDF | repeats a turn | all filtered | s / reply |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            tokens = f"{row['mean_tokens']:.1f}" if row.get("mean_tokens") is not None else "-"
            lines.append(f"| {row['strategy']} | {row['mean_words']:.1f} | {tokens} | {row['distinct_1']:.3f} | "
                         f"{row['distinct_2']:.3f} | {row['generic']:.1%} | {row['generic_list']:.1%} | "
                         f"{row['nidf']:.3f} | {row['repeats_turn']:.1%} | {row['all_filtered']:.1%} | "
                         f"{row['seconds_per_reply']:.3f} |")
    lines += ["", "generic: one of the training split's 100 most frequent responses (listed in the JSON); "
              "generic (list): one of " + ", ".join(f'"{g}"' for g in result["generic_list"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--mmi-model", help="backward model directory: adds the MMI rows to the ranking table")
    p.add_argument("--rows", choices=["all", "strategies", "ranking"], default="all", help="which tables to run")
    p.add_argument("--limit", type=int, default=500, help="held-out contexts (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per engine call")
    p.add_argument("--seed", type=int, default=0, help="picks the contexts and seeds the sampling")
    p.add_argument("--samples", type=int, default=10, help="example replies per row kept in the JSON")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.model, args.limit, args.batch_size, args.seed, args.samples, args.rows, args.mmi_model)
    print(markdown(result))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
