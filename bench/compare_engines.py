"""The reply engine of another checkout against this one, in one process, runs alternating.

For performance work: check out the baseline (``git worktree add /tmp/base COMMIT``) and compare. Both
engines load the shipped model of their own checkout and decode the same held-out contexts with the
same seed; the ratio is the median of this checkout's time over the baseline's, run by run.

    python -m bench.compare_engines /tmp/base [--repeats 3] [--threads 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.common import header, paired, write_json

# (label, contexts per call, candidates, max new tokens, min new tokens)
CASES = [
    ("1 context, N = 20, up to 32 tokens", 1, 20, 32, 1),
    ("1 context, N = 20, 32 tokens forced", 1, 20, 32, 32),
    ("8 contexts, N = 20, up to 32 tokens", 8, 20, 32, 1),
    ("32 contexts, N = 12, up to 40 tokens (serving)", 32, 12, 40, 1),
]


def load_engine(root: Path):
    """Import ``chatbot`` from ``root`` (dropping any already imported) and build its engine."""
    for name in [n for n in sys.modules if n == "chatbot" or n.startswith("chatbot.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        from chatbot.generate import DecodingConfig, ReplyEngine
        from chatbot.modeldir import load_model

        loaded = load_model(None)
        return ReplyEngine(loaded.model, loaded.tokenizer), DecodingConfig
    finally:
        sys.path.pop(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline", type=Path, help="root of the baseline checkout")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench.bench_decoding_quality import held_out_contexts

    contexts = held_out_contexts(max(c[1] for c in CASES), seed=0)
    here = Path(__file__).resolve().parent.parent
    engines = {"baseline": load_engine(args.baseline.resolve()), "this": load_engine(here)}
    rows = []
    with torch.inference_mode():
        for label, n_contexts, candidates, max_new, min_new in CASES:
            calls = []  # (reply method, contexts, that checkout's DecodingConfig): this checkout first
            for engine, config_cls in (engines["this"], engines["baseline"]):
                config = config_cls(num_candidates=candidates, max_new_tokens=max_new, min_new_tokens=min_new, seed=0)
                calls.append((engine.reply, contexts[:n_contexts], config))
            t = paired(args.repeats, *calls)
            rows.append({"case": label, "baseline_s": round(t["b_s"], 3), "this_s": round(t["a_s"], 3),
                         "ratio": round(t["ratio"], 2)})
    print(f"baseline {args.baseline}, {args.threads} torch threads, medians of {args.repeats} alternating runs "
          "after a warm-up; the ratio is the median of the per-run ratios\n")
    print("| case | baseline s | this checkout s | this / baseline |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['baseline_s']:.3f} | {r['this_s']:.3f} | {r['ratio']:.2f} |")
    write_json(args.out, {**header(), "baseline": str(args.baseline), "rows": rows})


if __name__ == "__main__":
    main()
