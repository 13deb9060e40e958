"""Decoding quality on held-out chitchat contexts: the table that makes the case for the default.

For each strategy, every held-out context gets one reply from the reply engine (default filters on, as
replies ship), and the replies are measured:

    mean words / tokens   reply length
    distinct-1 / -2       unique word unigrams / bigrams over all replies, divided by their total
    repeats a turn        share of replies the repetition filter calls a copy of a context turn
    generic               share of replies that are one of GENERIC_REPLIES (after lowercasing and
                          dropping punctuation): the "I don't know" / "ok" replies that SSA's
                          specificity punishes
    all filtered          share of replies where every candidate was dropped (a fallback reply)

Two extra rows measure choices inside sample-and-rank: ranking by length-normalised likelihood instead
of total likelihood (the ranking default), and no repetition filter (what the filter buys).

Usage:  python -m bench.bench_decoding_quality [--model DIR] [--limit 500] [--out FILE.json]
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
from chatbot.model_input import MAX_CONTEXT_TURNS
from chatbot.filters import RepetitionFilter, words
from chatbot.generate import MAX_TURN_CHARS, DecodingConfig, ReplyEngine
from chatbot.modeldir import load_model

GENERIC_REPLIES = (
    "i don't know", "idk", "i'm not sure", "not sure", "i don't care", "ok", "okay", "k", "lol", "haha", "hahaha",
    "lmao", "yes", "yeah", "yep", "yup", "no", "nope", "nah", "me too", "same", "same here", "me neither", "cool",
    "nice", "good", "great", "awesome", "that's cool", "that's nice", "that's good", "that's great",
    "that's awesome", "oh", "oh ok", "oh okay", "oh cool", "oh nice", "ah", "hmm", "wow", "really", "sure",
    "thanks", "thank you", "i see", "true", "right", "i agree", "why", "what", "hi", "hello", "hey",
)

# (row name, engine variant, config): the five strategies, then two sample-and-rank variants.
STRATEGIES = [
    ("greedy", "default", DecodingConfig(strategy="greedy")),
    ("beam (4)", "default", DecodingConfig(strategy="beam", beam_size=4)),
    ("sampling (T = 1.0)", "default", DecodingConfig(strategy="sample", temperature=1.0)),
    ("top-k 40 (T = 1.0)", "default", DecodingConfig(strategy="sample", temperature=1.0, top_k=40)),
    ("sample-and-rank (N = 20, T = 0.88)", "default", DecodingConfig()),
    ("sample-and-rank, length-normalised ranking", "default", DecodingConfig(length_normalize=True)),
    ("sample-and-rank, no repetition filter", "no_repetition_filter", DecodingConfig()),
]


def held_out_contexts(n: int, seed: int = 0) -> list[list[str]]:
    """``n`` contexts (up to 7 turns, oldest first) from the chitchat test split, a seeded random draw.

    The test split is the training code's (a hash of the conversation id), so no context was trained on.
    """
    examples = list(_test_examples())
    random.Random(seed).shuffle(examples)
    if len(examples) < n:
        raise ValueError(f"the test split has {len(examples)} contexts, fewer than the {n} asked for")
    return examples[:n]


def _test_examples() -> Iterator[list[str]]:
    for conv in chitchat_conversations():
        if split_of(conv.id) != "test":
            continue
        texts = [t.text for t in conv.turns]
        for j in range(1, len(texts)):
            context = texts[max(0, j - MAX_CONTEXT_TURNS):j]
            if all(len(t) <= MAX_TURN_CHARS for t in context):
                yield context


def normalized(text: str) -> str:
    return " ".join(words(text))


def distinct(replies: list[list[str]], n: int) -> float:
    grams = [tuple(r[i:i + n]) for r in replies for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def measure(contexts: list[list[str]], replies, seconds: float) -> dict:
    tokens = [words(r.text) for r in replies]
    repetition = RepetitionFilter()
    generic = set(GENERIC_REPLIES)
    n = len(replies)
    return {
        "mean_words": sum(map(len, tokens)) / n,
        "mean_tokens": sum(len(r.token_ids) for r in replies) / n,
        "distinct_1": distinct(tokens, 1),
        "distinct_2": distinct(tokens, 2),
        "repeats_turn": sum(repetition.check(c, [r.text])[0] == "repetition" for c, r in zip(contexts, replies)) / n,
        "generic": sum(normalized(r.text) in generic for r in replies) / n,
        "all_filtered": sum(r.all_filtered for r in replies) / n,
        "seconds_per_reply": seconds / n,
    }


def run(model_dir: str | None, limit: int, batch_size: int, seed: int, samples: int) -> dict:
    loaded = load_model(model_dir)
    engines = {"default": ReplyEngine(loaded.model, loaded.tokenizer),
               "no_repetition_filter": ReplyEngine(loaded.model, loaded.tokenizer, repetition_filter=None)}
    contexts = held_out_contexts(limit, seed)
    rows = []
    for name, variant, config in STRATEGIES:
        config = dataclasses.replace(config, seed=seed)  # greedy and beam ignore it
        replies, start = [], time.perf_counter()
        for i in range(0, len(contexts), batch_size):
            replies += engines[variant].reply(contexts[i:i + batch_size], config)
        seconds = time.perf_counter() - start
        rows.append({"strategy": name, "config": dataclasses.asdict(config), "engine": variant,
                     **measure(contexts, replies, seconds),
                     "samples": [{"context": c, "reply": r.text} for c, r in zip(contexts[:samples], replies)]})
        print(f"{name}: {seconds:.0f} s", flush=True)
    return {**header(), "model": str(loaded.directory), "contexts": len(contexts), "context_seed": seed,
            "generic_replies": list(GENERIC_REPLIES), "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Decoding quality, {result['contexts']} held-out chitchat contexts, model {result['model']}, "
             f"{result['date']}", "",
             "| strategy | mean words | mean tokens | distinct-1 | distinct-2 | repeats a turn | generic | "
             "all filtered | s / reply |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['strategy']} | {row['mean_words']:.1f} | {row['mean_tokens']:.1f} | "
                     f"{row['distinct_1']:.3f} | {row['distinct_2']:.3f} | {row['repeats_turn']:.1%} | "
                     f"{row['generic']:.1%} | {row['all_filtered']:.1%} | {row['seconds_per_reply']:.3f} |")
    lines += ["", "Generic replies: " + ", ".join(f'"{g}"' for g in result["generic_replies"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--limit", type=int, default=500, help="held-out contexts (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per engine call")
    p.add_argument("--seed", type=int, default=0, help="picks the contexts and seeds the sampling")
    p.add_argument("--samples", type=int, default=10, help="example replies per strategy kept in the JSON")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.model, args.limit, args.batch_size, args.seed, args.samples)
    print(markdown(result))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
