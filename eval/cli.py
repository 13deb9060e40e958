"""``chatbot eval static-set | import | rate | report``: argument parsing only; each command's work
lives in its own module (static_set, transcripts, rating_app, report)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

log = logging.getLogger("chatbot.eval")


def add_ssa_commands(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("static-set", help="build a static SSA rating set: fixed contexts, each model's reply",
                        description="Draws N contexts of 1-3 turns (seeded) from held-out conversations and writes "
                                    "each model's reply, all decoded with the same settings (recorded in the set).")
    p.add_argument("--models", nargs="+", required=True, metavar="[NAME=]DIR",
                   help="model directories (training output or packed); 'shipped' is the packaged model")
    p.add_argument("--contexts", default="test", help="'test' (the chitchat test split) or a JSONL conversations file")
    p.add_argument("--n", type=int, default=200, help="number of contexts (default: %(default)s)")
    p.add_argument("--out", required=True, help="the set file to write (JSON)")
    p.add_argument("--name", help="set name (default: the file's stem)")
    p.add_argument("--seed", type=int, default=0, help="seeds the contexts, the decoding and the item order")
    p.add_argument("--human", action="store_true", help="add a 'human' system: the real next turn of each context")
    p.add_argument("--num-candidates", type=int, default=20, help="sample-and-rank N (default: %(default)s, Meena)")
    p.add_argument("--temperature", type=float, default=0.88, help="default: %(default)s (Meena)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8, help="contexts decoded together")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_static_set)

    p = esub.add_parser("import", help="a rating set from transcripts: JSONL conversations or Meena-log text",
                        description="Every turn by --bot that follows another turn becomes an item (context: the "
                                    "conversation before it).  A malformed file fails naming the file and line.")
    p.add_argument("file")
    p.add_argument("--layout", choices=["jsonl", "meena"], required=True,
                   help="jsonl: our corpus format; meena: '<Bot> Conversation <N>' headers and 'Speaker: text' lines")
    p.add_argument("--bot", required=True, help="the bot's speaker name in the file")
    p.add_argument("--system", help="the system name in reports (default: --bot)")
    p.add_argument("--out", required=True, help="the set file to write")
    p.add_argument("--name", help="set name (default: FILE stem and system)")
    p.add_argument("--seed", type=int, default=0, help="item order")
    p.set_defaults(func=run_import)

    p = esub.add_parser("rate", help="the SSA rating web form (raters, admin page, interactive sessions)",
                        description="Serves the rating form.  The admin token is written to DATA_DIR/admin-token "
                                    "on first start; the admin page is /admin, raters use /.")
    p.add_argument("--set", action="append", default=[], metavar="SET", help="a set file to load (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--data-dir", help="where ratings.sqlite and admin-token live (default: $CHATBOT_DATA/ssa)")
    p.add_argument("--raters-per-item", type=int, default=5, help="k: raters per item (default: %(default)s, Meena)")
    p.add_argument("--lease", type=float, default=3600.0, help="seconds an unanswered item stays reserved for its rater")
    p.add_argument("--session-max-age", type=float, default=12 * 3600.0, metavar="SECONDS",
                   help="a sign-in lasts this long (default: 12 hours)")
    p.add_argument("--chat-model", action="append", default=[], metavar="[NAME=]DIR",
                   help="a model raters can chat with in interactive sessions (repeatable; 'shipped' works)")
    p.add_argument("--chat-turns", type=int, default=14, help="turns of an interactive session, both sides (Meena: 14-28)")
    p.add_argument("--num-candidates", type=int, default=20, help="sample-and-rank N for interactive replies")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--new-admin-token", action="store_true", help="replace the admin token")
    p.set_defaults(func=run_rate)

    p = esub.add_parser("report", help="SSA report with intervals, agreement and the perplexity-vs-SSA fit",
                        description="Writes report.html, report.md, report.json and ppl_vs_ssa.png into --out.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--db", help="the rating form's ratings.sqlite")
    src.add_argument("--ratings", help="a CSV: system,item_id,rater_id,sensible,specific")
    p.add_argument("--perplexities", help="a CSV: system,perplexity (for systems not computed here)")
    p.add_argument("--compute-perplexity", action="store_true",
                   help="compute each model system's perplexity now (models named by the sets and --model)")
    p.add_argument("--set", action="append", default=[], help="set files naming the systems' model directories")
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help="a system's model directory")
    p.add_argument("--ppl-data", default="test", help="perplexity data: 'test', 'valid' or a JSONL file")
    p.add_argument("--ppl-max-examples", type=int, help="perplexity on the first N examples only")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--title", default="SSA report")
    p.add_argument("--simulated", action="store_true", help="the ratings come from simulated raters: say so everywhere")
    p.add_argument("--note", action="append", default=[], help="a line of context for the report (repeatable)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_report)


def run_static_set(args: argparse.Namespace) -> int:
    from chatbot.generate import DecodingConfig
    from chatbot.ranking import served_min_new_tokens
    from eval.static_set import build_static_set, draw_contexts, parse_model_specs, source_conversations

    specs = parse_model_specs(args.models)
    decoding = DecodingConfig(num_candidates=args.num_candidates, temperature=args.temperature, top_k=args.top_k,
                              max_new_tokens=args.max_new_tokens, min_new_tokens=served_min_new_tokens(args.max_new_tokens),
                              seed=args.seed)
    contexts = draw_contexts(source_conversations(args.contexts), args.n, args.seed)
    name = args.name or Path(args.out).stem
    rating_set = build_static_set(specs, contexts, decoding, name, args.seed, args.human, args.batch_size, args.device)
    rating_set.save(args.out)
    print(json.dumps({"set": args.out, "name": name, "contexts": len(contexts), "items": len(rating_set.items),
                      "systems": sorted(rating_set.systems)}))
    return 0


def run_import(args: argparse.Namespace) -> int:
    from eval.transcripts import import_transcripts

    rating_set = import_transcripts(args.file, args.layout, args.bot, args.system, args.name, args.seed)
    rating_set.save(args.out)
    print(json.dumps({"set": args.out, "name": rating_set.name, "items": len(rating_set.items)}))
    return 0


def model_map(specs: list[str]) -> dict[str, str | None]:
    from eval.static_set import parse_model_specs

    return {s.name: (str(s.directory) if s.directory else None) for s in parse_model_specs(specs)} if specs else {}


def ensure_admin_token(db, path: Path, renew: bool) -> None:
    if db.has_admin_token() and not renew and path.is_file():
        return
    token = "admin." + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    db.set_admin_token(token)
    print(f"a new admin token was written to {path}", file=sys.stderr)


def run_rate(args: argparse.Namespace) -> int:
    from chatbot.serve.config import default_data_dir
    from eval.itemset import load_set
    from eval.rating_app import RateConfig, start_runner
    from eval.ratings_db import RatingsDB

    data = Path(args.data_dir) if args.data_dir else default_data_dir() / "ssa"
    data.mkdir(parents=True, exist_ok=True)
    config = RateConfig(host=args.host, port=args.port, db_path=str(data / "ratings.sqlite"),
                        raters_per_item=args.raters_per_item, lease_s=args.lease,
                        session_max_age_s=args.session_max_age, chat_models=model_map(args.chat_model),
                        chat_turns=args.chat_turns, num_candidates=args.num_candidates, max_new_tokens=args.max_new_tokens)
    sets = [load_set(path) for path in args.set]  # bad files fail before anything starts
    db = RatingsDB(config.db_path)
    try:
        ensure_admin_token(db, data / "admin-token", args.new_admin_token)
        for rating_set in sets:
            added = db.load_set(rating_set)
            print(f"set {rating_set.name}: {len(rating_set.items)} items ({added} new)", file=sys.stderr)
    finally:
        db.close()

    async def serve() -> None:
        runner = await start_runner(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        host, port = runner.addresses[0][:2]
        print(f"rating form: http://{host}:{port}/  admin: http://{host}:{port}/admin  "
              f"(database {config.db_path})", file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())
    return 0


def run_report(args: argparse.Namespace) -> int:
    from eval.itemset import load_set
    from eval.ratings import read_ratings_csv
    from eval.report import compute_report, read_perplexity_csv, write_report

    models: dict[str, str | None] = {}
    if args.db:
        from eval.ratings_db import RatingsDB

        if not Path(args.db).is_file():
            raise FileNotFoundError(f"--db {args.db}: no such database")
        db = RatingsDB(args.db)
        try:
            ratings = db.ratings()
            models.update(db.system_models())
        finally:
            db.close()
    else:
        ratings = read_ratings_csv(args.ratings)
    for path in args.set:
        models.update({n: i["model"] for n, i in load_set(path).systems.items() if i["kind"] == "model" and i["model"]})
    models.update(model_map(args.model))
    perplexities = read_perplexity_csv(args.perplexities) if args.perplexities else {}
    rated = {r.system for r in ratings}
    if args.compute_perplexity:
        from eval.perplexity import model_dir_perplexity

        for system, directory in sorted(models.items()):
            if system in rated and system not in perplexities:
                _, result = model_dir_perplexity(directory, args.ppl_data, max_examples=args.ppl_max_examples)
                perplexities[system] = {"perplexity": result.perplexity,
                                        "per_word_perplexity": result.per_word_perplexity,
                                        "examples": result.examples, "data": args.ppl_data}
                log.info("perplexity of %s: %.3f", system, result.perplexity)
    report = compute_report(ratings, perplexities, title=args.title, simulated=args.simulated, notes=args.note,
                            n_boot=args.bootstrap, seed=args.seed)
    out = write_report(report, args.out)
    print(json.dumps({"out": str(out), "systems": [s["system"] for s in report["systems"]],
                      "pearson_r": report["fit"]["pearson_r"], "r2": report["fit"]["r2"]}))
    return 0
