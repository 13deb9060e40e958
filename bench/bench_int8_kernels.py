"""Where int8 can speed a reply up: one dynamically quantized linear layer against its fp32 twin, at
the shapes of the shipped model's decoding step, per quantized engine.

    python -m bench.bench_int8_kernels [--rows 20,640] [--engines x86,fbgemm,onednn,qnnpack]

Shapes (d = 256): attention projections d x d, FFN d x 4d and 4d x d, the output projection d x 8192.
Rows: 20 (one context, 20 sample-and-rank candidates) and 640 (32 contexts).  CPU microseconds per call,
median of --repeats timings of --calls calls each; the ratio is int8 / fp32 in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from bench.common import header, write_json


def per_call_us(layer: nn.Module, x: torch.Tensor, calls: int, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            for _ in range(calls):
                layer(x)
            times.append((time.process_time() - t0) / calls * 1e6)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="20,640")
    p.add_argument("--engines", default=",".join(e for e in ("x86", "fbgemm", "onednn", "qnnpack")
                                                 if e in torch.backends.quantized.supported_engines))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/bench_int8_kernels.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    h = header()
    print(f"{h['date']}  {h['machine']['cpu']}  torch {torch.__version__}, {args.threads} thread(s), "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    rows_out: list[dict] = []
    print("| engine | weights | in x out | rows | fp32 us | int8 us | int8 / fp32 |\n|---|---|---|---|---|---|---|")
    for engine in args.engines.split(","):
        torch.backends.quantized.engine = engine
        for d_in, d_out in ((256, 256), (256, 1024), (1024, 256), (256, 8192)):
            for qconfig, scheme in ((per_channel_dynamic_qconfig, "per-channel"), (default_dynamic_qconfig, "per-tensor")):
                try:
                    fp32 = nn.Sequential(nn.Linear(d_in, d_out)).eval()
                    int8 = quantize_dynamic(nn.Sequential(nn.Linear(d_in, d_out)).eval(), {nn.Linear: qconfig},
                                            dtype=torch.qint8)
                    for rows in (int(r) for r in args.rows.split(",")):
                        x = torch.randn(rows, d_in)
                        calls = max(2, 4000 // rows)
                        t_fp32, t_int8 = per_call_us(fp32, x, calls, args.repeats), per_call_us(int8, x, calls, args.repeats)
                        rows_out.append({"engine": engine, "scheme": scheme, "shape": [d_in, d_out], "rows": rows,
                                         "fp32_us": t_fp32, "int8_us": t_int8})
                        print(f"| {engine} | {scheme} | {d_in} x {d_out} | {rows} | {t_fp32:.0f} | {t_int8:.0f} "
                              f"| {t_int8 / t_fp32:.2f} |", flush=True)
                except (RuntimeError, AssertionError) as e:  # an engine without this scheme
                    print(f"| {engine} | {scheme} | {d_in} x {d_out} | - | - | - | unsupported: {str(e)[:60]} |")
    write_json(args.out, {**h, "threads": args.threads, "results": rows_out})


if __name__ == "__main__":
    main()
