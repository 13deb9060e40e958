"""Which model to ship, chosen at equal training compute (issue 9, item 2).

    python -m bench.model_choice runs/choice-default runs/choice-wide runs/choice-ctx64 \
        [--plot docs/img/model_choice.png] [--out bench/results/model_choice.json]

Each RUN is a `chatbot train --out` directory trained by `bench.train_for_cpu_budget` with the same
budget, data, seed and schedule (the first RUN is the baseline: today's preset).  For each run:

- parameters and the size of its weights stored fp16, as the package ships them (limit 48 MB);
- validation perplexity at the common budget (the last evaluation at or below the smallest final CPU
  time of all runs) and at quarters of it, and the whole curve against training CPU time (plotted);
- reply time at the serving settings on 2 cores' worth of work: sample-and-rank with 20 candidates,
  each decoding exactly ``--reply-tokens`` tokens (so a model's taste for short replies does not make it
  look fast), batch 1, runs interleaved call by call, as a ratio to the baseline (limit 1.5x).

CPU time, not wall time, is the budget: the trainer counts its own process's CPU seconds in training
steps, so a shared box does not favour either run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bench.bench_compress import reply_times, test_contexts  # noqa: E402
from bench.common import header, write_json  # noqa: E402
from bench.train_large_then_compress import parameters, valid_curve  # noqa: E402
from chatbot.config import ModelConfig  # noqa: E402
from chatbot.generate import ReplyEngine  # noqa: E402
from chatbot.modeldir import CONFIG, load_model  # noqa: E402

PACKAGE_LIMIT_BYTES = 48e6
LATENCY_LIMIT = 1.5


def describe(config: ModelConfig) -> str:
    return (f"d={config.d_model}, {config.n_encoder_layers}+{config.n_decoder_layers} blocks, "
            f"{config.max_source_len}-token context")


def at_budget(curve: list[tuple[float, float, int]], budget: float) -> tuple[float, float, int] | None:
    """The last validation (CPU s, perplexity, step) at or below ``budget`` CPU seconds."""
    before = [point for point in curve if point[0] <= budget * 1.001]
    return before[-1] if before else None


def plot(curves: dict[str, list], budget: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, curve in curves.items():
        ax.plot([c / 60 for c, _, _ in curve], [p for _, p, _ in curve], marker="o", ms=3, label=label)
    ax.axvline(budget / 60, color="grey", ls="--", lw=1, label=f"equal budget: {budget / 60:.0f} CPU minutes")
    ax.set(xlabel="training CPU time (minutes, cumulative)", ylabel="validation perplexity (tokens)", yscale="log",
           title="Model choice at equal training compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="training runs; the first is the baseline")
    p.add_argument("--budget", type=float, help="CPU seconds to compare at (default: the smallest final one)")
    p.add_argument("--reply-tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=8, help="timed batch-1 calls per run")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the reply timing (the serving box: 2)")
    p.add_argument("--plot", type=Path, default=Path("docs/img/model_choice.png"))
    p.add_argument("--out", default="bench/results/model_choice.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    curves = {run: valid_curve(run) for run in args.runs}
    empty = [str(run) for run, curve in curves.items() if not curve]
    if empty:
        raise SystemExit(f"no validation events with CPU time in: {', '.join(empty)}")
    budget = args.budget or min(curve[-1][0] for curve in curves.values())
    rows = []
    for run in args.runs:
        config = ModelConfig.load(run / CONFIG)
        n = parameters(run)
        point = at_budget(curves[run], budget)
        quarters = [at_budget(curves[run], budget * q / 4) for q in (1, 2, 3)]
        rows.append({"run": str(run), "config": describe(config), "parameters": n, "fp16_bytes": 2 * n,
                     "budget_cpu_s": budget, "valid_ppl": point[1] if point else None,
                     "valid_step": point[2] if point else None, "valid_cpu_s": point[0] if point else None,
                     "valid_ppl_quarters": [q[1] if q else None for q in quarters], "curve": curves[run]})
        print(f"{run}: {rows[-1]['config']}, {n / 1e6:.2f}M parameters, valid {rows[-1]['valid_ppl']} "
              f"at step {rows[-1]['valid_step']}", file=sys.stderr, flush=True)
    engines = {}
    for run in args.runs:
        loaded = load_model(run)
        engines[str(run)] = ReplyEngine(loaded.model, loaded.tokenizer)
    contexts = test_contexts(loaded.tokenizer, args.repeats)
    times = reply_times(engines, contexts, batch=1, repeats=args.repeats, reply_tokens=args.reply_tokens)
    base = times[str(args.runs[0])]["wall_s"]
    for row in rows:
        t = times[row["run"]]
        row.update(reply_wall_s=t["wall_s"], reply_cpu_s=t["cpu_s"], reply_ratio=t["wall_s"] / base,
                   fits_package=row["fp16_bytes"] <= PACKAGE_LIMIT_BYTES,
                   serves_well=t["wall_s"] / base <= LATENCY_LIMIT)
    plot({f"{Path(r['run']).name}: {r['config']}, {r['parameters'] / 1e6:.1f}M": r["curve"] for r in rows},
         budget, args.plot)
    write_json(args.out, {**header(), "budget_cpu_s": budget, "threads": args.threads,
                          "reply_tokens": args.reply_tokens, "rows": rows})
    print(f"| run | model | parameters | fp16 MB | valid ppl at {budget / 60:.0f} CPU min (step) "
          "| at 1/4, 1/2, 3/4 of it | reply s, batch 1 (x baseline) | fits 48 MB | within 1.5x |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        quarters = ", ".join(f"{q:.1f}" if q else "-" for q in r["valid_ppl_quarters"])
        ppl = f"{r['valid_ppl']:.1f} ({r['valid_step']})" if r["valid_ppl"] else "-"
        print(f"| {Path(r['run']).name} | {r['config']} | {r['parameters'] / 1e6:.2f}M | {r['fp16_bytes'] / 1e6:.1f} "
              f"| {ppl} | {quarters} | {r['reply_wall_s']:.3f} ({r['reply_ratio']:.2f}x) "
              f"| {'yes' if r['fits_package'] else 'no'} | {'yes' if r['serves_well'] else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
