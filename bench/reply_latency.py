"""Reply time of model directories side by side, as a ratio to the first (the model in service today).

    python -m bench.reply_latency chatbot/assets/default runs/new-model [--threads 2] [--out FILE.json]

Sample-and-rank with 20 candidates, each decoding exactly ``--reply-tokens`` tokens (so a model's taste
for short replies does not make it look fast), on held-out test contexts, at batch 1 and at the serving
batch (32 contexts a call), the models interleaved call by call so machine noise hits all alike; medians.
Issue 9's rule for a new shipped model: at most 1.5x today's reply time at the serving settings.
``--knowledge default`` gives every engine the default knowledge base, as `chatbot serve` does: a model
trained to read passages then encodes them too (the embedding and search are timed as well).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.bench_compress import reply_times, test_contexts
from bench.common import header, write_json
from chatbot.generate import ReplyEngine
from chatbot.modeldir import load_model
from chatbot.serve.config import ServeConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path, help="model directories; the first is the reference")
    p.add_argument("--reply-tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=8, help="batch-1 calls per model (the serving batch: a quarter)")
    p.add_argument("--batch", type=int, default=ServeConfig().max_batch_size, help="the serving batch")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the serving box: 2 cores)")
    p.add_argument("--knowledge", choices=["none", "default"], default="none",
                   help="retrieve from the default knowledge base, as the service does (default: none)")
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    retriever = None
    if args.knowledge == "default":
        from chatbot.chat import open_retriever

        retriever = open_retriever("default", True)
    engines = {}
    for directory in args.models:
        loaded = load_model(directory)
        engines[str(directory)] = ReplyEngine(loaded.model, loaded.tokenizer, retriever=retriever)
    contexts = test_contexts(loaded.tokenizer, max(args.repeats, args.batch * max(args.repeats // 4, 1)))
    single = reply_times(engines, contexts, batch=1, repeats=args.repeats, reply_tokens=args.reply_tokens)
    batched = reply_times(engines, contexts, batch=args.batch, repeats=max(args.repeats // 4, 1),
                          reply_tokens=args.reply_tokens)
    reference = str(args.models[0])
    rows = [{"model": name, "batch1_s": single[name]["wall_s"], "batch1_cpu_s": single[name]["cpu_s"],
             "batch1_ratio": single[name]["wall_s"] / single[reference]["wall_s"],
             "batched_s": batched[name]["wall_s"], "batched_cpu_s": batched[name]["cpu_s"],
             "batched_ratio": batched[name]["wall_s"] / batched[reference]["wall_s"]} for name in engines]
    print(f"| model | batch 1 s (x) | batch {args.batch} s (x) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch1_s']:.3f} ({r['batch1_ratio']:.2f}x) "
              f"| {r['batched_s']:.2f} ({r['batched_ratio']:.2f}x) |")
    if args.out:
        write_json(args.out, {**header(), "threads": args.threads, "reply_tokens": args.reply_tokens,
                              "knowledge": args.knowledge,
                              "batch": args.batch, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
