"""Run `chatbot train` until its cumulative training CPU time reaches a budget, then stop it.

    python -m bench.train_for_cpu_budget --budget 1500 -- --preset default --data chitchat --out runs/x ...

Everything after ``--`` goes to `chatbot train` unchanged.  The trainer records cumulative
``cpu_seconds`` (its own process's CPU time in training steps, summed over resumes) in metrics.jsonl;
this watches that file and sends SIGTERM once the budget is reached.  CPU time rather than wall time, so
a shared box does not bias a comparison between runs.  Re-running resumes from the last checkpoint (the
trainer's own resume) and returns at once when the budget was already reached.  Give the trainer a
schedule that does not depend on --max-steps (``--schedule inverse_sqrt`` or ``constant``) and a large
--max-steps, and --snapshot-every/--save-every often enough that a checkpoint lands close to the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def cpu_seconds(metrics: Path) -> float:
    """The latest cumulative training CPU seconds metrics.jsonl records (0 when none yet)."""
    latest = 0.0
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                latest = max(latest, float(json.loads(line).get("cpu_seconds", 0.0)))
            except (ValueError, AttributeError):
                continue  # a line being written right now
    return latest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: python -m bench.train_for_cpu_budget --budget SECONDS -- TRAIN_ARGS...")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, required=True, help="training CPU seconds to stop at")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between looks at metrics.jsonl")
    args = p.parse_args(argv[:split])
    train_args = argv[split + 1:]
    out = Path(train_args[train_args.index("--out") + 1])
    metrics = out / "metrics.jsonl"
    if cpu_seconds(metrics) >= args.budget:
        print(f"{out}: already at {cpu_seconds(metrics):.0f} >= {args.budget:.0f} CPU s", flush=True)
        return 0
    proc = subprocess.Popen([sys.executable, "-m", "chatbot.cli", "train", *train_args], env=os.environ)
    try:
        while proc.poll() is None:
            time.sleep(args.poll)
            used = cpu_seconds(metrics)
            if used >= args.budget:
                print(f"{out}: {used:.0f} CPU s >= budget {args.budget:.0f}: stopping", flush=True)
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                return 0
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
