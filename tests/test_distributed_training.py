"""Distributed training end to end on CPU: `torchrun --nproc_per_node 2` (gloo) trains the tiny preset
and lowers the loss; its checkpoint then resumes in a single process (a different process count),
continuing from the same data position."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def events(out: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def test_torchrun_two_processes_then_resume_on_one(tmp_path: Path, small_corpus: Path) -> None:
    out = tmp_path / "run"
    # inverse_sqrt: unlike cosine, the schedule does not depend on max_steps, so the run can be extended.
    flags = ["train", "--preset", "tiny", "--data", str(small_corpus), "--vocab-size", "512", "--out", str(out),
             "--warmup-steps", "2", "--schedule", "inverse_sqrt", "--lr", "5e-3", "--batch-tokens", "1024",
             "--eval-every", "10", "--valid-examples", "64", "--save-every", "10", "--log-every", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def run(cmd: list[str]) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-4000:]

    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "chatbot.cli",
         *flags, "--max-steps", "20"])
    state = json.loads((out / "train_state" / "trainer.json").read_text())
    assert state["step"] == 20 and state["world_size"] == 2
    assert state["progress"]["epoch_batches_done"] == 40  # both ranks' batches, one each a step
    train = events(out, "train")
    assert [e["step"] for e in train] == list(range(1, 21))
    first, last = train[:5], train[-5:]
    assert sum(e["loss"] for e in last) / 5 < sum(e["loss"] for e in first) / 5 - 0.2  # the loss comes down
    valid = [e["perplexity"] for e in events(out, "valid")]
    assert len(valid) == 2 and valid[1] < valid[0] < 512

    # Resume the 2-process checkpoint in one process (no torchrun) and train on.
    run([sys.executable, "-m", "chatbot.cli", *flags, "--max-steps", "30"])
    state = json.loads((out / "train_state" / "trainer.json").read_text())
    assert state["step"] == 30 and state["world_size"] == 1
    assert state["progress"]["epoch_batches_done"] == 50  # the data position carried over: 40 + 10
    assert [e["step"] for e in events(out, "train")] == list(range(1, 31))  # continued, not restarted
    valid = [e["perplexity"] for e in events(out, "valid")]
    assert len(valid) == 3 and valid[2] < valid[1]
