"""The conversations as memory (issue 12, docs/memory.md): what kNN-LM and retrieved human replies buy.

Three tables from one run:

**Q3 perplexity**: test-split perplexity of the model alone and with each kNN-LM datastore given
(its tuned k / lambda / temperature, from `chatbot memory tune` on the validation split), the
datastore's size and build time, and what a build over the whole training split would take at the
measured rate.

**cost per reply**: seconds per reply at batch 1 (sample-and-rank as served: Meena's ranking with the
served minimum reply length) for generated-only, kNN-LM, retrieved candidates, and both, over the first
``--cost-contexts`` contexts, and at the serving batch (``--batch-size``, the service's default 32) over
all the quality contexts.

**quality**: on held-out contexts (a seeded draw from the test split, as bench_decoding_quality draws
them), reply length, distinct-1/2, generic share and NIDF (eval/reply_metrics.py) for the same four
variants, plus the share of replies that are copied human replies.

Usage:  python -m bench.bench_memory --knn DIR [--knn DIR2 ...] [--generation-knn DIR] [--reply-memory DIR]
                                     [--model DIR] [--ppl-examples N] [--contexts 100] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.bench_decoding_quality import held_out_examples, measure, training_statistics
from bench.common import header, write_json
from chatbot.data import ExampleStore, prepare_splits
from chatbot.generate import DecodingConfig, ReplyEngine
from chatbot.memory import Datastore, KnnLM, directory_sizes, knn_perplexity
from chatbot.modeldir import load_model
from chatbot.ranking import served_min_new_tokens
from chatbot.reply_memory import ReplyMemory
from chatbot.serve.config import ServeConfig


def full_training_keys(loaded) -> tuple[int, int]:
    """(keys, examples) of a datastore over the whole training split: every response token plus end-of-turn."""
    cfg = loaded.model.config
    store = ExampleStore(prepare_splits("chitchat", loaded.tokenizer, ["train"])["train"], cfg.max_source_len,
                         cfg.max_target_len)
    return int(store.target_lengths.sum()), len(store)


def perplexity_rows(model_dir, knn_dirs: list[str], ppl_examples: int | None, loaded) -> list[dict]:
    full_keys, full_examples = full_training_keys(loaded)
    rows = []
    for directory in knn_dirs:
        result = knn_perplexity(model_dir, directory, "test", max_examples=ppl_examples)
        manifest = {**json.loads((Path(directory) / "manifest.json").read_text()), **directory_sizes(Path(directory))}
        rate = manifest["tokens_per_s"]
        rows.append({"datastore": directory, "key_type": manifest["key_type"], "factory": manifest.get("factory"),
                     "keys": manifest["keys"], "examples": manifest["examples"], "key_bytes": manifest["key_bytes"],
                     "bytes": manifest["bytes"], "build_s": manifest["build_s"], "tokens_per_s": rate,
                     "full_split_keys": full_keys, "full_split_examples": full_examples,
                     "full_build_estimate_s": full_keys / rate,
                     "full_key_bytes_estimate": manifest["key_bytes"] / manifest["keys"] * full_keys,
                     "tuned": manifest.get("tuned"), "test_examples": result["examples"],
                     "test_tokens": result["tokens"], "perplexity": result["perplexity"],
                     "knn_perplexity": result["knn"]["perplexity"], "ratio": result["knn"]["ratio"],
                     "k": result["knn"]["k"], "lambda": result["knn"]["lambda"],
                     "temperature": result["knn"]["temperature"], "eval_seconds": result["seconds"]})
        print(f"{directory}: perplexity {result['perplexity']:.2f} -> {result['knn']['perplexity']:.2f} "
              f"({result['knn']['ratio']:.3f}x) in {result['seconds']:.0f} s", flush=True)
    return rows


def engines(loaded, knn_dir: str | None, memory_dir: str | None) -> dict[str, ReplyEngine]:
    out = {"generated only": ReplyEngine(loaded.model, loaded.tokenizer)}
    knn = KnnLM(Datastore.load(knn_dir, loaded)) if knn_dir else None
    memory = ReplyMemory(memory_dir, k=5) if memory_dir else None
    if knn:
        out["kNN-LM"] = ReplyEngine(loaded.model, loaded.tokenizer, processors=[knn])
    if memory:
        out["retrieved candidates"] = ReplyEngine(loaded.model, loaded.tokenizer, reply_memory=memory,
                                                  memory_candidates=5, memory_sources=3)
    if knn and memory:
        out["kNN-LM + retrieved candidates"] = ReplyEngine(loaded.model, loaded.tokenizer, processors=[knn],
                                                           reply_memory=memory, memory_candidates=5, memory_sources=3)
    return out


def run(model_dir: str | None, knn_dirs: list[str], generation_knn: str | None, memory_dir: str | None,
        ppl_examples: int | None, n_contexts: int, cost_contexts: int, batch_size: int, seed: int,
        samples: int, min_new_tokens: int | None = None) -> dict:
    loaded = load_model(model_dir)
    ppl = perplexity_rows(model_dir, knn_dirs, ppl_examples, loaded) if knn_dirs else []
    examples = held_out_examples(n_contexts, seed)
    contexts = [c for c, _ in examples]
    stats = training_statistics()
    # What the service does unless told otherwise (docs/generation.md, "The default, and why").
    min_len = served_min_new_tokens(DecodingConfig.max_new_tokens) if min_new_tokens is None else min_new_tokens
    config = DecodingConfig(seed=seed, min_new_tokens=min_len)
    cost, quality = [], []
    for name, engine in engines(loaded, generation_knn or (knn_dirs[0] if knn_dirs else None), memory_dir).items():
        start = time.perf_counter()
        for context in contexts[:cost_contexts]:
            engine.reply([context], config)
        per_reply = (time.perf_counter() - start) / cost_contexts
        cost.append({"variant": name, "batch": 1, "seconds_per_reply": per_reply, "contexts": cost_contexts})
        start, replies = time.perf_counter(), []
        for i in range(0, len(contexts), batch_size):
            replies += engine.reply(contexts[i:i + batch_size], config)
        seconds = time.perf_counter() - start
        cost.append({"variant": name, "batch": batch_size, "seconds_per_reply": seconds / len(contexts),
                     "contexts": len(contexts)})
        copied = [bool(r.sources) and bool(r.sources[0].get("copied")) for r in replies]
        row = {"variant": name, **measure(contexts, [r.text for r in replies], [len(r.token_ids) for r in replies],
                                          [r.all_filtered for r in replies], seconds, stats),
               "copied_human_reply": float(np.mean(copied)),
               "samples": [{"context": c, "reply": r.text, "copied": k} for c, r, k in
                           zip(contexts[:samples], replies, copied)]}
        quality.append(row)
        print(f"{name}: {per_reply:.2f} s/reply at batch 1; {len(contexts)} replies in {seconds:.0f} s", flush=True)
    return {**header(), "model": str(loaded.directory), "perplexity": ppl, "cost": cost, "quality": quality,
            "contexts": len(contexts), "context_seed": seed, "batch_size": batch_size, "min_new_tokens": min_len}


def markdown(result: dict) -> str:
    lines = [f"Memory benchmark, model {result['model']}, {result['date']}", ""]
    if result["perplexity"]:
        lines += ["| datastore | keys (examples) | key MB | build s (tok/s) | full split: est. build h, key GB "
                  "| k, lambda, T | test ppl | with kNN | ratio |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["perplexity"]:
            lines.append(f"| {r['key_type']} {r['factory'] or ''} | {r['keys']:,} ({r['examples']:,}) "
                         f"| {r['key_bytes'] / 1e6:.1f} | {r['build_s']:.0f} ({r['tokens_per_s']:.0f}) "
                         f"| {r['full_build_estimate_s'] / 3600:.1f}, {r['full_key_bytes_estimate'] / 1e9:.2f} "
                         f"| {r['k']}, {r['lambda']:g}, {r['temperature']:g} | {r['perplexity']:.2f} "
                         f"| {r['knn_perplexity']:.2f} | {r['ratio']:.3f} |")
        lines.append("")
    batch = result["batch_size"]
    lines += [f"minimum reply length {result.get('min_new_tokens', 1)} tokens, {result['contexts']} contexts", "",
              f"| variant | s/reply (batch 1) | s/reply (batch {batch}) | words | distinct-1 | distinct-2 | generic "
              "| NIDF | copied human reply |", "|---|---|---|---|---|---|---|---|---|"]
    costs = {(c["variant"], c["batch"]): c["seconds_per_reply"] for c in result["cost"]}
    for r in result["quality"]:
        lines.append(f"| {r['variant']} | {costs[r['variant'], 1]:.2f} | {costs[r['variant'], batch]:.3f} "
                     f"| {r['mean_words']:.2f} | {r['distinct_1']:.3f} "
                     f"| {r['distinct_2']:.3f} | {r['generic']:.3f} | {r['nidf']:.3f} | {r['copied_human_reply']:.3f} |")
    return "\n".join(lines)


def build_stores(model_dir: str | None, fraction: float) -> tuple[list[str], str]:
    from chatbot.memory import build_datastore, tune
    from chatbot.reply_memory import build_reply_memory

    root = Path(__file__).parent / "results" / "memory"
    knn, replies = root / "knn", root / "replies"
    build_datastore(model_dir, knn, fraction=fraction)
    tune(model_dir, str(knn), max_examples=200)
    build_reply_memory(replies, fraction=fraction)
    return [str(knn)], str(replies)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--knn", action="append", default=[], help="datastore(s) for the perplexity table")
    p.add_argument("--generation-knn", help="datastore used in generation (default: the first --knn)")
    p.add_argument("--reply-memory", help="reply memory directory (chatbot memory replies)")
    p.add_argument("--ppl-examples", type=int, help="first N test examples for perplexity (default: all)")
    p.add_argument("--contexts", type=int, default=100, help="held-out contexts for the quality table")
    p.add_argument("--cost-contexts", type=int, default=10, help="contexts timed at batch 1")
    p.add_argument("--batch-size", type=int, default=ServeConfig().max_batch_size,
                   help="the serving batch: quality replies are made, and timed, in batches of this size")
    p.add_argument("--min-new-tokens", type=int,
                   help="minimum reply length in tokens (default: the served default, chatbot.ranking)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--build-fraction", type=float, default=0.02,
                   help="without --knn / --reply-memory: build both over this fraction of the training split "
                        "under bench/results/memory/ (tuned on 200 validation examples) first")
    args = p.parse_args(argv)
    if not args.knn and not args.reply_memory:
        args.knn, args.reply_memory = build_stores(args.model, args.build_fraction)
    result = run(args.model, args.knn, args.generation_knn, args.reply_memory, args.ppl_examples, args.contexts,
                 args.cost_contexts, args.batch_size, args.seed, args.samples, args.min_new_tokens)
    print(markdown(result))
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
