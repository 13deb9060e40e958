"""Training throughput of the Evolved Transformer vs a vanilla Transformer of equal parameters, on real
chitchat batches, and the fraction of this machine's measured fp32 matmul throughput each reaches.

FLOPs are counted on each real batch (torch's FlopCounterMode over the forward pass, times 3 for training).
The two models alternate batch by batch (ABAB...) so machine noise hits both alike; the ratio is the figure.

    python -m bench.bench_training [--presets default,default-vanilla] [--steps 12] [--batch-tokens 4096]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import header, write_json
from chatbot.config import preset
from chatbot.data import ExampleStore, prepare_splits
from chatbot.model import ChatModel, sequence_nll
from chatbot.modeldir import load_model


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """Best-of fp32 GEMM throughput at the training thread count: the machine's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def step_flops(model: ChatModel, batch) -> int:
    """Training FLOPs of one batch = 3x the counted forward FLOPs (backward = 2x forward).

    The backward is not counted directly because torch's counter ignores `groups` in
    convolution_backward, charging a depthwise conv ~100x its real cost (seen: 82 GFLOP of conv backward
    for 0.77 GFLOP of conv forward in the default ET).
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(batch.src, batch.tgt_in)
    return 3 * counter.get_total_flops()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="default,default-vanilla")
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per model (after 2 warm-up)")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--model", help="model dir whose tokenizer to use (default: the shipped model)")
    p.add_argument("--out", help="write JSON results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = load_model(args.model).tokenizer
    store = ExampleStore(prepare_splits("chitchat", tokenizer, ["train"])["train"])
    batches = [store.collate(b) for b in store.batches(args.batch_tokens, seed=0)[: args.steps + 2]]
    names = args.presets.split(",")
    models, optims = {}, {}
    for name in names:
        torch.manual_seed(0)
        models[name] = ChatModel(preset(name, vocab_size=tokenizer.vocab_size)).train()
        optims[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    flops = {name: sum(step_flops(models[name], b) for b in batches[2:]) for name in names}
    elapsed = {name: 0.0 for name in names}
    tokens = sum(b.target_tokens for b in batches[2:])
    peak = matmul_gflops()
    for i, batch in enumerate(batches):
        for name in names:  # alternate models every batch
            model, opt = models[name], optims[name]
            t = time.perf_counter()
            loss, n = sequence_nll(model(batch.src, batch.tgt_in), batch.tgt_out, 0, 0.1)
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                elapsed[name] += time.perf_counter() - t
    peak_after = matmul_gflops()
    rows = []
    for name in names:
        gflops = flops[name] / elapsed[name] / 1e9
        rows.append({"preset": name, "block_type": models[name].config.block_type,
                     "params_M": round(models[name].num_parameters() / 1e6, 2),
                     "target_tokens_per_s": round(tokens / elapsed[name], 1),
                     "gflop_per_step": round(flops[name] / args.steps / 1e9, 1),
                     "achieved_gflops": round(gflops, 1),
                     "fraction_of_matmul_peak": round(gflops / max(peak, peak_after), 3)})
    result = {**header(), "matmul_gflops_fp32": round(max(peak, peak_after), 1), "steps": args.steps,
              "batch_tokens": args.batch_tokens, "rows": rows,
              "ratio_tokens_per_s": round(rows[0]["target_tokens_per_s"] / rows[-1]["target_tokens_per_s"], 3)}
    print(f"fp32 matmul peak (1024^3 GEMM, {args.threads} threads): {result['matmul_gflops_fp32']} GFLOP/s")
    print("| preset | block | params (M) | target tok/s | GFLOP/step | achieved GFLOP/s | of matmul peak |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['block_type']} | {r['params_M']} | {r['target_tokens_per_s']} | {r['gflop_per_step']} "
              f"| {r['achieved_gflops']} | {r['fraction_of_matmul_peak']:.1%} |")
    print(f"tokens/s ratio {names[0]} / {names[-1]}: {result['ratio_tokens_per_s']}")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
