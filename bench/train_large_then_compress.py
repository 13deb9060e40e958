""""Train large, then compress" (Li, Wallace et al. 2020) at our scale: two training runs given the same
compute, a small preset and a larger one; is the larger one, compressed to the small one's size, better?

    python -m bench.train_large_then_compress RUN_A RUN_B [--plot docs/img/train_large_then_compress.png]

RUN_A/RUN_B are `chatbot train --out` directories whose metrics.jsonl events carry ``cpu_seconds``
(cumulative training CPU time).  Only read: each checkpoint used is copied into --work first.

1. Plot validation perplexity against training CPU time for both runs.
2. Equal budget: B = the smaller of the two runs' latest checkpoint CPU times; each run contributes its
   checkpoint (latest or a snapshot in snapshots/) with the most CPU time <= B.  Both figures are printed.
3. Compress the larger model to at most the small one's size in bytes (the small one stored fp16, as we
   ship models): int8 with the least structured pruning that fits (steps of --grid), and structured
   pruning alone in fp16.  The small model in int8 is shown too: compression is open to it as well.
4. Test perplexity and reply time (sample-and-rank, fixed reply length, batch 1 and 32, variants
   interleaved; see bench.bench_compress) of every variant, side by side.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bench.bench_compress import reply_times, test_contexts, test_perplexity  # noqa: E402
from bench.common import header, write_json  # noqa: E402
from chatbot.compress import CompressConfig, compress, weight_count  # noqa: E402
from chatbot.config import ModelConfig  # noqa: E402
from chatbot.generate import ReplyEngine  # noqa: E402
from chatbot.model import ChatModel  # noqa: E402
from chatbot.modeldir import CONFIG, TOKENIZER, WEIGHTS, load_model, save_model  # noqa: E402


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def cpu_at(evs: list[dict], step: int) -> float | None:
    """Cumulative training CPU seconds at ``step`` (the last event at or before it that records them)."""
    known = [(e["step"], e["cpu_seconds"]) for e in evs if "cpu_seconds" in e and e.get("step", 0) <= step]
    return max(known)[1] if known else None


def valid_curve(run: Path) -> list[tuple[float, float, int]]:
    """(CPU seconds, validation perplexity, step) of every validation event."""
    evs = events(run)
    curve = []
    for e in evs:
        if e.get("event") == "valid":
            cpu = e.get("cpu_seconds", cpu_at(evs, e["step"]))
            if cpu is not None:
                curve.append((cpu, e["perplexity"], e["step"]))
    return curve


def parameters(model_dir: Path) -> int:
    with torch.device("meta"):
        return ChatModel(ModelConfig.load(model_dir / CONFIG)).num_parameters()


def checkpoints(run: Path) -> list[tuple[float, int, Path]]:
    """(CPU seconds, step, directory) of the run's model directories: its latest weights and snapshots."""
    evs = events(run)
    found = []
    state = run / "train_state" / "trainer.json"
    if state.exists() and (run / WEIGHTS).exists():
        found.append((json.loads(state.read_text())["step"], run))
    for snap in sorted((run / "snapshots").glob("*")) if (run / "snapshots").is_dir() else []:
        digits = re.findall(r"\d+", snap.name)
        if digits and (snap / WEIGHTS).exists() and (snap / CONFIG).exists():
            found.append((int(digits[-1]), snap))
    return sorted((cpu_at(evs, step) or 0.0, step, d) for step, d in found)


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, WEIGHTS):
        shutil.copy2(src / name, dst / name)
    tok = src / TOKENIZER if (src / TOKENIZER).exists() else src.parent.parent / TOKENIZER  # snapshots may share it
    shutil.copy2(tok, dst / TOKENIZER)
    return dst


def plot(curves: dict[str, list], budget: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    unit, per = ("minutes", 60) if budget < 2 * 3600 else ("hours", 3600)  # a short budget reads in minutes
    for label, curve in curves.items():
        ax.plot([c / per for c, _, _ in curve], [p for _, p, _ in curve], marker="o", ms=3, label=label)
    ax.axvline(budget / per, color="grey", ls="--", lw=1, label=f"equal budget: {budget / per:.1f} CPU {unit}")
    ax.set_xlabel(f"training CPU time ({unit}, cumulative)")
    ax.set_ylabel("validation perplexity (tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("Validation perplexity vs training compute")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def fit(large: Path, work: Path, target: float, grid: float, quantize: str | None, recover_steps: int) -> tuple[Path, float] | None:
    """The least structured pruning (on a grid of ``grid`` steps up to 95%, with or without int8) that
    brings ``large`` to <= target bytes; None when even 95% does not.  Size falls as the fraction grows,
    so the grid is bisected: a handful of compressions instead of one per step."""

    def build(fraction: float) -> Path:
        name = f"large-{'int8-' if quantize else ''}s{round(fraction * 100)}"
        out = work / name
        if not (out / WEIGHTS).exists():
            if fraction == 0.0 and not quantize:
                loaded = load_model(large)
                save_model(loaded.model, loaded.tokenizer, out, dtype=torch.float16)
            else:
                compress(CompressConfig(model=str(large), out=str(out), prune=fraction or None, structured=fraction > 0,
                                        quantize=quantize, fp16=True, progress=False,
                                        recover_steps=recover_steps if fraction else 0,
                                        data="chitchat" if recover_steps and fraction else None))
        print(f"  {name}: {(out / WEIGHTS).stat().st_size / 1e6:.2f} MB (target {target / 1e6:.2f})",
              file=sys.stderr, flush=True)
        return out

    fractions = [round(i * grid, 4) for i in range(int(0.95 / grid + 1e-9) + 1)]
    fits = lambda i: (build(fractions[i]) / WEIGHTS).stat().st_size <= target  # noqa: E731
    if not fits(len(fractions) - 1):
        return None
    lo, hi = -1, len(fractions) - 1  # fractions[hi] fits; fractions[lo] does not (or lo = -1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return build(fractions[hi]), fractions[hi]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs=2, type=Path, help="the two training run directories (either order)")
    p.add_argument("--work", type=Path, default=Path("bench/results/train_large_then_compress"))
    p.add_argument("--plot", type=Path, default=Path("docs/img/train_large_then_compress.png"))
    p.add_argument("--budget", type=float, help="CPU seconds per run (default: the smaller latest checkpoint's)")
    p.add_argument("--target-dtype", choices=["fp16", "fp32"], default="fp16",
                   help="the small model's stored form that sets the size target (default: fp16, as shipped)")
    p.add_argument("--grid", type=float, default=0.05, help="structured pruning fraction step")
    p.add_argument("--recover-steps", type=int, default=0, help="fine-tune pruned large variants N steps")
    p.add_argument("--test-examples", type=int, default=500)
    p.add_argument("--reply-tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--batch", type=int, default=32, help="contexts per call for the batched reply time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/train_large_then_compress.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    small_run, large_run = sorted(args.runs, key=parameters)
    curves = {f"{r.name} ({parameters(r) / 1e6:.1f}M)": valid_curve(r) for r in (small_run, large_run)}
    ckpts = {r: checkpoints(r) for r in (small_run, large_run)}
    if not all(ckpts.values()):
        raise SystemExit(f"no checkpoints yet in {[str(r) for r, c in ckpts.items() if not c]}")
    budget = args.budget or min(c[-1][0] for c in ckpts.values())
    chosen = {}
    for run, cands in ckpts.items():
        fitting = [c for c in cands if c[0] <= budget * 1.001]
        if not fitting:
            raise SystemExit(f"{run}: no checkpoint within the budget of {budget:.0f} CPU s")
        chosen[run] = fitting[-1]
    plot(curves, budget, args.plot)
    work = args.work
    small = copy_model(chosen[small_run][2], work / "small-checkpoint")
    large = copy_model(chosen[large_run][2], work / "large-checkpoint")

    models: dict[str, Path] = {}
    models["small fp16"] = work / "small-fp16"
    if not (models["small fp16"] / WEIGHTS).exists():
        loaded = load_model(small)
        save_model(loaded.model, loaded.tokenizer, models["small fp16"], dtype=torch.float16)
    target = (models["small fp16"] / WEIGHTS).stat().st_size * (2 if args.target_dtype == "fp32" else 1)
    models["large fp16"] = work / "large-s0"  # unpruned, fp16
    if not (models["large fp16"] / WEIGHTS).exists():
        loaded = load_model(large)
        save_model(loaded.model, loaded.tokenizer, models["large fp16"], dtype=torch.float16)
    fitted, unreachable = {}, []
    for quantize in ("int8", None):
        found = fit(large, work, target, args.grid, quantize, args.recover_steps)
        if not found:  # attention and embeddings are not pruned: a much larger model may not fit
            unreachable.append(f"large {'int8 + ' if quantize else ''}structured: even 95% pruning stays above "
                               f"{target / 1e6:.2f} MB")
        else:
            label = f"large {'int8 + ' if quantize else ''}structured {round(found[1] * 100)}%"
            if args.recover_steps and found[1]:
                label += f" +{args.recover_steps} steps"
            models[label], fitted[label] = found
    models["small int8"] = work / "small-int8"
    if not (models["small int8"] / WEIGHTS).exists():
        compress(CompressConfig(model=str(small), out=str(models["small int8"]), quantize="int8", fp16=True, progress=False))

    loaded = {name: load_model(d) for name, d in models.items()}
    results = {name: {"dir": str(d), "bytes": (d / WEIGHTS).stat().st_size, "parameters": weight_count(loaded[name].model)}
               for name, d in models.items()}
    engines = {name: ReplyEngine(m.model, m.tokenizer) for name, m in loaded.items()}
    contexts = test_contexts(loaded["small fp16"].tokenizer, max(64, args.batch))
    for batch, repeats in ((1, args.repeats), (args.batch, max(3, args.repeats // 3))):
        print(f"  reply times, batch {batch}", file=sys.stderr, flush=True)
        for name, t in reply_times(engines, contexts, batch, repeats, args.reply_tokens).items():
            results[name][f"batch{batch}"] = t
    for name, m in loaded.items():
        print(f"  perplexity: {name}", file=sys.stderr, flush=True)
        results[name]["test"] = test_perplexity(m.model, m.tokenizer, args.test_examples)
    runs = {str(r): {"parameters": parameters(r), "checkpoint_step": chosen[r][1], "checkpoint_cpu_s": chosen[r][0],
                     "latest_cpu_s": ckpts[r][-1][0], "valid_curve": curves[next(k for k in curves if k.startswith(r.name))]}
            for r in (small_run, large_run)}
    payload = {**header(), "budget_cpu_s": budget, "target_bytes": target, "target_dtype": args.target_dtype,
               "unreachable": unreachable, "runs": runs, "results": results}
    write_json(args.out, payload)

    print(f"{payload['date']}  {payload['machine']['cpu']}  {args.threads} thread(s)")
    for r, info in runs.items():
        print(f"run {r}: {info['parameters'] / 1e6:.1f}M parameters; checkpoint step {info['checkpoint_step']} at "
              f"{info['checkpoint_cpu_s'] / 3600:.2f} CPU h (latest {info['latest_cpu_s'] / 3600:.2f} CPU h)")
    print(f"equal budget: {budget / 3600:.2f} CPU hours per run; size target: {target / 1e6:.2f} MB "
          f"(small, {args.target_dtype})")
    for line in unreachable:
        print("not reachable: " + line)
    print(f"plot: {args.plot}\n")
    base = results["small fp16"]
    b = f"batch{args.batch}"
    print(f"| model | parameters | MB on disk | test ppl | batch 1 s (x small) | CPU x | batch {args.batch} s (x small) "
          f"| CPU x |\n|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['parameters']:,} | {r['bytes'] / 1e6:.2f} | {r['test']['perplexity']:.2f} "
              f"| {r['batch1']['wall_s']:.3f} ({r['batch1']['wall_s'] / base['batch1']['wall_s']:.2f}) "
              f"| {r['batch1']['cpu_s'] / base['batch1']['cpu_s']:.2f} "
              f"| {r[b]['wall_s']:.2f} ({r[b]['wall_s'] / base[b]['wall_s']:.2f}) | {r[b]['cpu_s'] / base[b]['cpu_s']:.2f} |")


if __name__ == "__main__":
    main()
