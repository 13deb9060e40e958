"""The end-to-end example report, with SIMULATED raters: ``python -m eval.example`` (``make ssa-example``).

1. Models: the shipped model, every model directory under ``--ladder`` (checkpoints of one training
   run), and optionally a ``tiny`` model trained here for a few seconds on the shipped tokenizer (a low
   rung, so the ladder has a spread even early in a run).
2. A static set of ``--n`` test-split contexts with each model's reply (and the real next turn as
   "human"), through ``chatbot eval static-set``'s code.
3. The rating form started in-process on a free port; ``--raters`` simulated raters (the documented
   rule in eval/simulated_raters.py) rate over HTTP exactly as the page does, k = ``--raters``.
4. ``chatbot eval report``'s code with perplexities computed on the test split, marked SIMULATED.

The figures measure the simulated rule, not people; the report says so on every page.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("eval.example")


def is_model_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def ladder_models(ladder: Path) -> list[str]:
    if not ladder.is_dir():
        return []
    dirs = [p for p in sorted(ladder.iterdir()) if p.is_dir() and is_model_dir(p)]
    return [f"{ladder.resolve().parent.name}-{p.name}={p}" for p in dirs]


def train_tiny(out: Path, steps: int) -> Path:
    """A `tiny` preset on the shipped tokenizer (so its perplexity compares), trained for seconds."""
    from chatbot.modeldir import DEFAULT_MODEL_DIR
    from chatbot.train import TrainConfig, train

    if not is_model_dir(out):
        train(TrainConfig(out=str(out), preset="tiny", data="chitchat", tokenizer=str(DEFAULT_MODEL_DIR / "tokenizer.json"),
                          max_steps=steps, warmup_steps=max(1, steps // 5), lr=3e-3, batch_tokens=2048,
                          eval_every=steps, save_every=steps, valid_examples=200, progress=False))
    return out


async def rate_with_simulated_raters(set_dict: dict, work: Path, raters: int, noise: float, seed: int) -> Path:
    from eval.rating_app import RateConfig, start_runner
    from eval.rating_client import RatingClient
    from eval.ratings_db import RatingsDB
    from eval.simulated_raters import SimulatedRater, rate_over_http

    db_path = work / "ratings.sqlite"
    admin_token = "admin.example"
    db = RatingsDB(db_path)
    db.set_admin_token(admin_token)
    db.close()
    runner = await start_runner(RateConfig(db_path=str(db_path), raters_per_item=raters), engines={}, port=0)
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    try:
        async with RatingClient(url) as boss:
            await boss.sign_in(admin_token)
            await boss.load_set(set_dict)
            simulated = [SimulatedRater(f"simulated-{k}", seed, noise) for k in range(raters)]
            tokens = [(await boss.create_rater(r.name))["token"] for r in simulated]
            sent = await asyncio.gather(*(rate_over_http(url, t, r) for t, r in zip(tokens, simulated)))
            log.info("simulated raters sent %d answers", sum(map(len, sent)))
            (work / "ratings.csv").write_text(await boss.export_csv())
    finally:
        await runner.cleanup()
    return db_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.example", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/ssa-example", help="report directory (default: %(default)s)")
    p.add_argument("--ladder", default="runs/ladder", help="a folder of model directories (checkpoints of one run)")
    p.add_argument("--models", nargs="*", default=[], metavar="[NAME=]DIR", help="more model directories")
    p.add_argument("--tiny-steps", type=int, default=60, help="train a tiny extra rung for this many steps (0: none)")
    p.add_argument("--n", type=int, default=30, help="contexts in the static set (default: %(default)s)")
    p.add_argument("--num-candidates", type=int, default=20)
    p.add_argument("--raters", type=int, default=5, help="simulated raters, each rating every item (k)")
    p.add_argument("--noise", type=float, default=0.1, help="each simulated judgement flips with this probability")
    p.add_argument("--ppl-max-examples", type=int, default=500, help="perplexity on the first N test examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="keep intermediate files here (default: a temporary folder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from chatbot.generate import DecodingConfig
    from eval.perplexity import model_dir_perplexity
    from eval.report import compute_report, write_report
    from eval.static_set import build_static_set, draw_contexts, parse_model_specs, source_conversations

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ssa-example-"))
    work.mkdir(parents=True, exist_ok=True)
    model_args = ["shipped", *ladder_models(Path(args.ladder)), *args.models]
    if args.tiny_steps:
        model_args.append(f"tiny-{args.tiny_steps}steps={train_tiny(work / 'tiny', args.tiny_steps)}")
    specs = parse_model_specs(model_args)
    log.info("models: %s", ", ".join(f"{s.name} ({s.directory or 'shipped'})" for s in specs))

    decoding = DecodingConfig(num_candidates=args.num_candidates, seed=args.seed)
    contexts = draw_contexts(source_conversations("test"), args.n, args.seed)
    rating_set = build_static_set(specs, contexts, decoding, "example", args.seed, include_human=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rating_set.save(out / "set.json")

    db_path = asyncio.run(rate_with_simulated_raters(rating_set.to_dict(), work, args.raters, args.noise, args.seed))
    shutil.copy(work / "ratings.csv", out / "ratings.csv")

    from eval.ratings_db import RatingsDB

    db = RatingsDB(db_path)
    ratings = db.ratings()
    db.close()
    perplexities = {}
    for spec in specs:
        _, result = model_dir_perplexity(str(spec.directory) if spec.directory else None, "test",
                                         max_examples=args.ppl_max_examples)
        perplexities[spec.name] = {"perplexity": result.perplexity, "per_word_perplexity": result.per_word_perplexity}
        log.info("perplexity %s: %.2f", spec.name, result.perplexity)
    shipped = "the shipped model (chatbot/assets/default)"
    notes = ["models: " + ", ".join(f"{s.name} = {s.directory or shipped}" for s in specs),
             f"static set: {len(contexts)} contexts of 1-3 turns from the chitchat test split (seed {args.seed}); "
             "'human' is the real next turn of each context",
             f"decoding: sample-and-rank, {decoding.num_candidates} candidates, temperature {decoding.temperature}",
             f"{args.raters} SIMULATED raters per item (rule in eval/simulated_raters.py, flip probability {args.noise})",
             f"perplexity: chitchat test split, first {args.ppl_max_examples} examples, shared tokenizer"]
    report = compute_report(ratings, perplexities, title="SSA example report (SIMULATED raters)", simulated=True,
                            notes=notes, seed=args.seed)
    write_report(report, out)
    print(json.dumps({"out": str(out), "systems": [s["system"] for s in report["systems"]],
                      "pearson_r": report["fit"]["pearson_r"], "r2": report["fit"]["r2"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
