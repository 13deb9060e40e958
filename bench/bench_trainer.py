"""P4: the trainer before issue 9 and the trainer now, side by side in one process, on real chitchat batches.

"Before" reproduces the earlier trainer's step exactly as it was: ``nn.Dropout`` (a float Bernoulli draw
per element), the per-tensor AdamW loop, fp32.  "Now" is ``chatbot.train``'s step on this machine: the
cheap dropout mask, fused AdamW, and bf16 autocast where ``machine_settings`` picks it (AMX or
AVX512-BF16 CPUs, CUDA).  Both start from the same weights, see the same batches in the same order and
alternate step by step, so machine noise hits both alike; CPU seconds (this process, one thread by
default) are the steadier measure on a shared machine, wall seconds are reported too.  After the timed
steps both are validated on the same fixed valid subset: the speed-up must come at equal loss.

    python -m bench.bench_trainer [--presets default,base] [--steps 30] [--threads 1] [--valid-examples 500]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from bench.bench_training import step_flops
from bench.common import header, write_json
from chatbot.config import preset
from chatbot.data import ExampleStore, prepare_splits
from chatbot.model import ChatModel, Dropout, sequence_nll
from chatbot.modeldir import load_model
from chatbot.train import TrainConfig, machine_settings, make_optimizer
from eval.perplexity import evaluate_perplexity


def with_torch_dropout(model: ChatModel) -> ChatModel:
    """The model as the earlier trainer built it: every dropout an ``nn.Dropout``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Dropout):
                setattr(parent, name, nn.Dropout(child.p))
    return model


def per_tensor(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same AdamW (groups, betas, decay) on the per-tensor loop the earlier trainer ran on CPU."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = False, False
    return optimizer


def gemm_ceiling(dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """Best-of GEMM GFLOP/s per CPU-second of this process: what the cores do when they are ours."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t = time.process_time()
        a @ b
        best = max(best, 2 * n ** 3 / max(time.process_time() - t, 1e-9) / 1e9)
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="default,base")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per trainer (after 2 warm-up)")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--valid-examples", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", help="write JSON results here")
    args = p.parse_args(argv)

    tokenizer = load_model().tokenizer
    splits = prepare_splits("chitchat", tokenizer, ["train", "valid"])
    store, valid = ExampleStore(splits["train"]), ExampleStore(splits["valid"])
    batches = [store.collate(b) for b in store.batches(args.batch_tokens, seed=0)[: args.steps + 2]]
    tokens = sum(b.target_tokens for b in batches[2:])
    cfg = TrainConfig(out="-", lr=args.lr, threads=args.threads)
    settings = machine_settings(cfg, torch.device("cpu"))
    fp32_peak = gemm_ceiling(torch.float32)
    bf16_peak = gemm_ceiling(torch.bfloat16) if settings.amp_dtype == torch.bfloat16 else None
    rows = []
    for name in args.presets.split(","):
        torch.manual_seed(0)
        now = ChatModel(preset(name, vocab_size=tokenizer.vocab_size)).train()
        before = with_torch_dropout(copy.deepcopy(now))
        trainers = {
            "before": (before, per_tensor(make_optimizer(before, cfg)), lambda: torch.autocast("cpu", enabled=False)),
            "now": (now, make_optimizer(now, cfg), settings.autocast),
        }
        wall = {k: 0.0 for k in trainers}
        cpu = {k: 0.0 for k in trainers}
        flops = sum(step_flops(now, b) for b in batches[2:])
        for i, batch in enumerate(batches):
            for key, (model, opt, autocast) in trainers.items():  # alternate trainers every step
                torch.manual_seed(1000 + i)  # the same dropout stream position for both
                w, c = time.perf_counter(), time.process_time()
                with autocast():
                    loss, n = sequence_nll(model(batch.src, batch.tgt_in), batch.tgt_out, 0, 0.1)
                    (loss / n).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 2:
                    wall[key] += time.perf_counter() - w
                    cpu[key] += time.process_time() - c
        ppl = {}
        for key, (model, _, autocast) in trainers.items():
            with autocast():
                ppl[key] = evaluate_perplexity(model, valid, args.batch_tokens, "cpu", progress=False,
                                               max_examples=args.valid_examples).perplexity
            model.train()
        peak = bf16_peak or fp32_peak
        row = {"preset": name, "params_M": round(now.num_parameters() / 1e6, 2), "steps": args.steps}
        for key in trainers:
            row[f"{key}_tok_per_cpu_s"] = round(tokens / cpu[key], 1)
            row[f"{key}_tok_per_wall_s"] = round(tokens / wall[key], 1)
            row[f"{key}_valid_ppl"] = round(ppl[key], 2)
            row[f"{key}_fraction_of_gemm_ceiling"] = round(flops / cpu[key] / 1e9 / peak, 3)
        row["speedup_cpu"] = round(cpu["before"] / cpu["now"], 3)
        row["speedup_wall"] = round(wall["before"] / wall["now"], 3)
        rows.append(row)
    result = {**header(), "precision_now": settings.why, "matmul_gflops_fp32": round(fp32_peak, 1),
              "matmul_gflops_bf16": round(bf16_peak, 1) if bf16_peak else None, "batch_tokens": args.batch_tokens,
              "rows": rows}
    print(f"machine: {result['machine']['cpu']}; now: {settings.why}")
    print(f"GEMM ceiling (1024^3 GEMM per CPU-second, {args.threads} thread(s)): fp32 {result['matmul_gflops_fp32']} GFLOP/s"
          + (f", bf16 {result['matmul_gflops_bf16']} GFLOP/s" if bf16_peak else ""))
    print("| preset | params (M) | before tok/CPU-s | now tok/CPU-s | speed-up (CPU) | speed-up (wall) "
          "| before / now of GEMM ceiling | valid ppl before / now |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['params_M']} | {r['before_tok_per_cpu_s']} | {r['now_tok_per_cpu_s']} | "
              f"{r['speedup_cpu']}x | {r['speedup_wall']}x | {r['before_fraction_of_gemm_ceiling']:.1%} / "
              f"{r['now_fraction_of_gemm_ceiling']:.1%} | {r['before_valid_ppl']} / {r['now_valid_ppl']} |")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
