"""Compression trade-offs on one model directory: size on disk, resident memory, reply time, test perplexity.

    python -m bench.bench_compress [--model DIR] [--out bench/results/bench_compress.json]

Variants (written with ``chatbot.compress`` into --work): original, 50% unstructured, 50% structured,
int8, 50% structured + int8 (``--fraction`` changes the 50%; ``--recover-steps N`` adds structured
variants fine-tuned N steps on chitchat).  Per variant:

- bytes of model.safetensors (ratio to the original's file, and to the original's fp32 weights);
- resident memory in the server: a real `chatbot serve --model DIR` process (1 torch thread, Redis on
  loopback) after it started and answered one websocket message, VmRSS and its peak VmHWM; and, in a
  bare process that loaded the model and made one reply, how much the model adds over that process
  before loading;
- time per reply call, sample-and-rank (20 candidates) on test-split contexts, batch 1 and batch 32.
  Every candidate decodes exactly ``--reply-tokens`` tokens (min = max new tokens) so the time measures
  the model's compute, not how long each variant's replies happen to be.  Variants alternate within
  each repeat, so a change in the machine's load hits all of them alike; medians of wall and CPU time;
- test perplexity on the first ``--test-examples`` examples of the chitchat test split.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from bench.common import header, timed, write_json
from chatbot.compress import CompressConfig, compress
from chatbot.generate import DecodingConfig, ReplyEngine
from chatbot.modeldir import DEFAULT_MODEL_DIR, WEIGHTS, load_model

# name -> compress flags (None: the original directory itself)
def variants(fraction: float, recover_steps: int) -> dict[str, dict | None]:
    pct = round(fraction * 100)
    out: dict[str, dict | None] = {
        "original": None,
        f"unstructured {pct}%": {"prune": fraction},
        f"structured {pct}%": {"prune": fraction, "structured": True},
        "int8": {"quantize": "int8"},
        f"structured {pct}% + int8": {"prune": fraction, "structured": True, "quantize": "int8"},
    }
    if recover_steps:
        out[f"structured {pct}% +{recover_steps} steps"] = {"prune": fraction, "structured": True,
                                                            "recover_steps": recover_steps, "data": "chitchat"}
        out[f"structured {pct}% +{recover_steps} steps + int8"] = {"prune": fraction, "structured": True, "quantize": "int8",
                                                                   "recover_steps": recover_steps, "data": "chitchat"}
    return out


def build(model: Path, work: Path, flags: dict | None, name: str) -> Path:
    if flags is None:
        return model
    out = work / name.replace(" ", "_").replace("%", "pct").replace("+", "plus")
    if not (out / WEIGHTS).exists():
        print(f"  compressing: {name}", file=sys.stderr, flush=True)
        compress(CompressConfig(model=str(model), out=str(out), progress=False, **flags))
    return out


RSS_PROBE = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(int(sys.argv[2]))
    def rss():
        return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
    from chatbot.generate import DecodingConfig, ReplyEngine
    from chatbot.modeldir import load_model
    import chatbot.compress, torch.ao.quantization  # imported before the baseline, like the model code
    before = rss()
    loaded = load_model(sys.argv[1])
    engine = ReplyEngine(loaded.model, loaded.tokenizer)
    engine.reply([["hello, how are you?"]], DecodingConfig(num_candidates=20, max_new_tokens=20, seed=0))
    print(json.dumps({"rss": rss(), "model_rss": rss() - before}))
""")


def resident_memory(model_dir: Path, threads: int) -> dict:
    """VmRSS of a fresh process holding the model after one reply (what a server process holds)."""
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(model_dir), str(threads)], capture_output=True,
                         text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def server_memory(models: dict[str, Path], work: Path) -> dict[str, dict]:
    """VmRSS and VmHWM (MiB) of `chatbot serve --model DIR` after one chat message, per model, one
    server at a time against one Redis (bench.bench_service's server and Redis processes)."""
    import asyncio

    from bench.bench_service import ServerProcess
    from chatbot.client import ChatClient
    from chatbot.testing import RedisProcess

    async def one_message(url: str) -> None:
        async with ChatClient(url, retries=0) as client:
            await client.say("hello, how are you today?")

    found = {}
    with RedisProcess(work.resolve() / "redis") as redis:  # redis-server chdirs into it: absolute
        for name, model in models.items():
            print(f"  server memory: {name}", file=sys.stderr, flush=True)
            server = ServerProcess(str(model), redis.url, work, ["--torch-threads", "1"])
            server.start(timeout_s=900)
            try:
                asyncio.run(one_message(server.url))
                found[name] = server.memory_mb()
            finally:
                server.stop()
    return found


def test_contexts(tokenizer, n: int) -> list[list[str]]:
    """The first n test-split contexts, as turn texts (what a chat client sends)."""
    from chatbot.data import ExampleStore, prepare_splits

    store = ExampleStore(prepare_splits("chitchat", tokenizer, ["test"])["test"])
    contexts = []
    for i in range(min(n, len(store))):
        response_turn, first = (int(x) for x in store.examples[i])
        contexts.append([tokenizer.decode(store.turn(t).tolist()) for t in range(first, response_turn)])
    return contexts


def test_perplexity(model, tokenizer, examples: int) -> dict:
    from chatbot.data import ExampleStore, prepare_splits
    from eval.perplexity import evaluate_perplexity

    cfg = model.config
    store = ExampleStore(prepare_splits("chitchat", tokenizer, ["test"])["test"], cfg.max_source_len, cfg.max_target_len)
    return evaluate_perplexity(model, store, 4096, progress=False, max_examples=examples).to_dict()


def reply_times(engines: dict[str, ReplyEngine], contexts: list[list[str]], batch: int, repeats: int,
                reply_tokens: int) -> dict[str, dict]:
    """Median wall and CPU seconds per reply call of ``batch`` contexts, variants interleaved."""
    config = DecodingConfig(num_candidates=20, max_new_tokens=reply_tokens, min_new_tokens=reply_tokens, seed=0)
    calls = [contexts[(i * batch) % len(contexts):][:batch] for i in range(repeats)]
    for engine in engines.values():
        engine.reply(calls[0], config)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for call in calls:
        for name, engine in engines.items():
            runs[name].append(timed(engine.reply, call, config))
    return {name: {"wall_s": statistics.median(w for w, _ in r), "cpu_s": statistics.median(c for _, c in r)}
            for name, r in runs.items()}


def measure(models: dict[str, Path], args: argparse.Namespace, fp32_bytes: int) -> dict[str, dict]:
    """Everything but building: per variant size, memory, reply times and perplexity.  What is measured
    so far is also written to OUT.partial after each phase: a long run on a busy machine keeps it."""
    results: dict[str, dict] = {}
    partial = lambda: write_json(args.out + ".partial", {**header(), "results": results})  # noqa: E731
    loaded = {name: load_model(d) for name, d in models.items()}
    first = next(iter(models))
    for name, d in models.items():
        size = (d / WEIGHTS).stat().st_size
        results[name] = {"dir": str(d), "bytes": size, "parameters": loaded_count(loaded[name].model),
                         "config_compression": loaded[name].model.config.compression}
        print(f"  memory: {name}", file=sys.stderr, flush=True)
        results[name].update(resident_memory(d, args.threads))
    for name, mem in server_memory(models, args.work).items():
        results[name]["server"] = mem
    partial()
    base = results[first]
    for r in results.values():
        r["size_ratio"] = base["bytes"] / r["bytes"]
        r["size_ratio_vs_fp32"] = fp32_bytes / r["bytes"]
    engines = {name: ReplyEngine(m.model, m.tokenizer) for name, m in loaded.items()}
    contexts = test_contexts(loaded[first].tokenizer, max(64, args.batch))
    for batch, repeats in ((1, args.repeats), (args.batch, max(3, args.repeats // 4))):
        print(f"  reply times, batch {batch}", file=sys.stderr, flush=True)
        times = reply_times(engines, contexts, batch, repeats, args.reply_tokens)
        for name, t in times.items():
            results[name][f"batch{batch}"] = {**t, "ratio": t["wall_s"] / times[first]["wall_s"],
                                              "cpu_ratio": t["cpu_s"] / times[first]["cpu_s"]}
        partial()
    for name, m in loaded.items():
        print(f"  perplexity: {name}", file=sys.stderr, flush=True)
        results[name]["test"] = test_perplexity(m.model, m.tokenizer, args.test_examples)
        results[name]["ppl_change"] = results[name]["test"]["perplexity"] / results[first]["test"]["perplexity"] - 1
        partial()
    return results


def loaded_count(model) -> int:
    from chatbot.compress import weight_count

    return weight_count(model)


def table(results: dict[str, dict], batch: int) -> str:
    rows = [f"| variant | MB on disk | x smaller (file / fp32) | server RSS MB (peak) | model's MB in a bare process "
            f"| batch 1 s (x) | batch {batch} s (x) | CPU x b1 / b{batch} | test ppl (change) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        b1, bn = r["batch1"], r[f"batch{batch}"]
        rows.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {r['size_ratio']:.2f} / {r['size_ratio_vs_fp32']:.2f} "
                    f"| {r['server']['rss_mb']:.0f} ({r['server']['peak_rss_mb']:.0f}) | {r['model_rss'] / 2**20:.0f} "
                    f"| {b1['wall_s']:.3f} ({b1['ratio']:.2f}) "
                    f"| {bn['wall_s']:.2f} ({bn['ratio']:.2f}) | {b1['cpu_ratio']:.2f} / {bn['cpu_ratio']:.2f} "
                    f"| {r['test']['perplexity']:.2f} ({100 * r['ppl_change']:+.1f}%) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model directory (default: the shipped one)")
    p.add_argument("--work", type=Path, default=Path("bench/results/compress"), help="where the variants are written")
    p.add_argument("--fresh", action="store_true", help="rebuild variants that already exist in --work")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--recover-steps", type=int, default=0, help="also structured variants fine-tuned N steps")
    p.add_argument("--test-examples", type=int, default=500, help="test-split examples for perplexity")
    p.add_argument("--reply-tokens", type=int, default=20, help="tokens every candidate decodes")
    p.add_argument("--batch", type=int, default=32, help="contexts per call for the batched figure")
    p.add_argument("--repeats", type=int, default=12, help="batch-1 calls per variant (batched: a quarter)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the service uses cores - 1)")
    p.add_argument("--out", default="bench/results/bench_compress.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    models = {name: build(args.model, args.work, flags, name)
              for name, flags in variants(args.fraction, args.recover_steps).items()}
    fp32_bytes = 4 * sum(v.numel() for v in load_model(args.model).model.state_dict().values())
    results = measure(models, args, fp32_bytes)
    payload = {**header(), "model": str(args.model), "threads": args.threads, "reply_tokens": args.reply_tokens,
               "test_examples": args.test_examples, "fp32_bytes": fp32_bytes, "results": results}
    write_json(args.out, payload)
    print(f"{payload['date']}  {payload['machine']['cpu']}  torch {torch.__version__}, {args.threads} thread(s), "
          f"quantized engine {torch.backends.quantized.engine} (supported: "
          f"{', '.join(torch.backends.quantized.supported_engines)}), CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"model {args.model}; replies: sample-and-rank, 20 candidates x {args.reply_tokens} tokens; "
          f"perplexity: first {args.test_examples} test examples\n")
    print(table(results, args.batch))


if __name__ == "__main__":
    main()
