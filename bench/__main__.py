"""`make bench`: every benchmark in turn, JSON results under bench/results/, tables on stdout.

Record what it prints in docs/benchmarks.md with the date and machine it prints.  Benchmarks over
training runs or several model directories take them as arguments and are run by hand (docs/benchmarks.md
gives each command): bench.model_choice, bench.train_large_then_compress, bench.reply_latency.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCHMARKS = [
    "bench.bench_training",
    "bench.bench_trainer",  # P4: the trainer before and after issue 9, side by side
    "bench.bench_decoding",
    "bench.bench_decoding_quality",
    "bench.bench_service",
    "bench.bench_knowledge",
    "bench.bench_cluster",  # needs Debian's redis-server and nginx (make system-deps)
    "bench.bench_index_scale",
    "bench.bench_compress",
    "bench.bench_int8_kernels",
    "bench.bench_memory",  # builds a 2% datastore and reply memory unless given --knn / --reply-memory
]


def main() -> int:
    results = Path(__file__).parent / "results"
    only = set(sys.argv[1:])
    for name in BENCHMARKS:
        short = name.rsplit(".", 1)[1]
        if only and short not in only:
            continue
        print(f"\n## {short}\n", flush=True)
        importlib.import_module(name).main(["--out", str(results / f"{short}.json")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
