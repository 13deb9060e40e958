"""Plot validation perplexity against step (and target tokens seen) for one or more training runs.

    python -m bench.plot_training runs/default-et runs/default-vanilla --out docs/img/valid_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="training output directories (with metrics.jsonl)")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    fig, (ax_valid, ax_train) = plt.subplots(1, 2, figsize=(11, 4))
    for run in args.runs:
        events = read_events(run)
        config = json.loads((run / "config.json").read_text())
        label = f"{run.name} ({config['block_type']})"
        valid = [e for e in events if e["event"] == "valid"]
        train = [e for e in events if e["event"] == "train"]
        ax_valid.plot([e["step"] for e in valid], [e["perplexity"] for e in valid], marker="o", label=label)
        ax_train.plot([e["step"] for e in train], [e["loss"] for e in train], label=label, alpha=0.8)
    ax_valid.set(xlabel="optimizer step", ylabel="valid perplexity (8K BPE)", yscale="log", title="Validation perplexity")
    ax_train.set(xlabel="optimizer step", ylabel="train loss (label-smoothed, nats/token)", title="Training loss")
    for ax in (ax_valid, ax_train):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
