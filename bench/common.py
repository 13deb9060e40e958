"""What every benchmark records beside its numbers: the machine, the date, the command."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def header() -> dict:
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "command": " ".join([Path(sys.executable).name, "-m", *sys.argv[0:1]][-1:] + sys.argv[1:])}


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def timed(fn: Callable[..., object], *args: object) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call.  On a shared machine the CPU time is
    the steadier measure of the work done: waiting for a core does not count."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def median_timed(repeats: int, fn: Callable[..., object], *args: object) -> tuple[float, float]:
    fn(*args)  # warm-up: first-call allocations and kernel selection are not what we measure
    runs = [timed(fn, *args) for _ in range(repeats)]
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def paired(repeats: int, a: tuple, b: tuple) -> dict[str, float]:
    """Median wall and CPU times of ``a`` and ``b`` (each a (fn, *args) tuple) and the medians of their
    per-pair ratios a / b.  The two alternate, so a change in load hits both alike."""
    for fn, *args in (a, b):
        fn(*args)  # warm-up
    pairs = [(timed(*a), timed(*b)) for _ in range(repeats)]
    med = statistics.median
    return {"a_s": med(x[0] for x, _ in pairs), "b_s": med(y[0] for _, y in pairs),
            "ratio": med(x[0] / y[0] for x, y in pairs),
            "a_cpu_s": med(x[1] for x, _ in pairs), "b_cpu_s": med(y[1] for _, y in pairs),
            "cpu_ratio": med(x[1] / y[1] for x, y in pairs)}
