"""``chatbot chat``: a terminal chat with a model directory (the shipped model by default).

Interactive: a prompt per message, the reply printed as it streams.  Piped stdin: one message per line
in, one reply per line out (newlines inside a reply become spaces), so it can be scripted.  Replies
come from the reply engine (sample-and-rank with N = 20, T = 0.88 unless flags say otherwise); the
model sees the last 7 turns, and the repetition filter checks the whole conversation.

With --seed N the same input gives the same replies: turn t of the session uses seed N + t.
--show-candidates prints every ranked candidate with its scores to stderr, so stdout stays one reply a line.
With a knowledge index (--knowledge; a model trained to read passages uses the default one unless told
otherwise) each reply's sources, the passages it was given, print to stderr under it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from chatbot.client import print_sources
from chatbot.ranking import DEFAULT_MIN_NEW_TOKENS, add_ranking_arguments, ranking_config_from_args, served_min_new_tokens

# Decoding flags, named as DecodingConfig's fields.  Flags left out keep DecodingConfig's defaults (the
# engine is the one place they are defined).
DECODING_FIELDS = ("strategy", "num_candidates", "temperature", "top_k", "top_p", "beam_size", "max_new_tokens",
                   "min_new_tokens", "seed")


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat in the terminal", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the shipped model)")
    g = p.add_argument_group("decoding (defaults: the engine's, Meena's sample-and-rank)")
    g.add_argument("--strategy", help="sample_and_rank (default), sample, greedy or beam")
    g.add_argument("--num-candidates", type=int, help="samples ranked per reply, sample_and_rank (default 20)")
    g.add_argument("--temperature", type=float, help="sampling temperature, > 0 (default 0.88)")
    g.add_argument("--top-k", type=int, help="sample from the k most likely tokens (default 0: all)")
    g.add_argument("--top-p", type=float,
                   help="sample from the smallest set with this much probability (default 1.0: all)")
    g.add_argument("--beam-size", type=int, help="beams, for --strategy beam (default 4)")
    g.add_argument("--max-new-tokens", type=int, help="reply length limit in tokens (default 40)")
    g.add_argument("--min-new-tokens", type=int, help=f"no end of reply before this many tokens (default {DEFAULT_MIN_NEW_TOKENS})")
    g.add_argument("--seed", type=int, help="seed: the same seed and input give the same replies")
    add_ranking_arguments(p.add_argument_group("ranking of sample-and-rank candidates (docs/generation.md)"))
    from chatbot.memory import add_memory_arguments

    add_memory_arguments(p.add_argument_group("memory: kNN-LM and retrieved human replies (docs/memory.md)"))
    p.add_argument("--knowledge", default="auto", metavar="auto|default|DIR|none",
                   help="knowledge index the reply engine retrieves passages from: 'default' (the shipped Wikipedia "
                        "summaries), an index directory, or 'none'; auto (the default): 'default' when the model "
                        "was trained to read passages, else none.  A reply's sources print to stderr")
    p.add_argument("--show-candidates", action="store_true",
                   help="print the ranked candidates and their scores to stderr, and the training examples "
                        "behind the reply (with --reply-memory)")
    p.add_argument("--blocklist", metavar="FILE",
                   help="blocked words or phrases, one a line; replies never contain them")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_chat)


def print_candidates(reply, out) -> None:
    chosen = None if reply.all_filtered else next(c for c in reply.candidates if c.dropped_by is None)
    note = " (every candidate was dropped: fallback reply)" if reply.all_filtered else ""
    print(f"  candidates, best first; * = the reply{note}:", file=out)
    for cand in reply.candidates:
        mark = "*" if cand is chosen else " "
        dropped = f" [dropped: {cand.dropped_by}]" if cand.dropped_by else ""
        human = f" [human reply: {cand.source['id']}]" if cand.kind == "conversation" and cand.source else ""
        scores = f"{cand.log_likelihood:8.2f} ({cand.normalized_log_likelihood:6.2f}/token), score {cand.score:8.3f}"
        print(f"  {mark} {scores}{dropped}{human} {cand.text!r}", file=out)
    examples = [s for s in reply.sources if s.get("kind") == "conversation"]
    if examples:
        print("  training examples behind the reply:", file=out)
        for s in examples:
            note = "copied" if s["copied"] else f"similarity {s['similarity']:.2f}"
            print(f"    {s['id']} ({note}): {' / '.join(s['context'][-2:])!r} -> {s['reply']!r}", file=out)


def open_retriever(choice: str, reads_passages: bool):
    """The ``--knowledge`` choice as a retriever (None for none): ``auto`` follows the model."""
    if choice == "none" or (choice == "auto" and not reads_passages):
        return None
    from retrieval.default_kb import ensure_default_index
    from retrieval.embedder import load_embedder
    from retrieval.knowledge import KnowledgeIndex
    from retrieval.retriever import KnowledgeRetriever

    if choice not in ("auto", "default") and not Path(choice).is_dir():
        raise SystemExit(f"--knowledge {choice}: not a directory; give 'default', 'none' or an index directory "
                         "(chatbot index build --out DIR)")
    embedder = load_embedder()
    directory = ensure_default_index(embedder) if choice in ("auto", "default") else Path(choice)
    return KnowledgeRetriever(KnowledgeIndex.open(directory, embedder))


def run_chat(args: argparse.Namespace) -> int:
    from chatbot.filters import SafetyFilter
    from chatbot.generate import DecodingConfig, ReplyEngine
    from chatbot.modeldir import load_model

    overrides = {name: getattr(args, name) for name in DECODING_FIELDS if getattr(args, name) is not None}
    if "min_new_tokens" not in overrides:
        overrides["min_new_tokens"] = served_min_new_tokens(overrides.get("max_new_tokens", DecodingConfig.max_new_tokens))
    config = DecodingConfig(**overrides)  # bad flags fail here, before the model loads
    ranking = ranking_config_from_args(args)
    from chatbot.memory import memory_config_from_args

    memory = memory_config_from_args(args)
    safety = SafetyFilter.from_file(args.blocklist) if args.blocklist else SafetyFilter()
    loaded = load_model(args.model, args.device)
    from retrieval.knowledge import KnowledgeError

    try:
        retriever = open_retriever(args.knowledge, loaded.model.config.knowledge_passages > 0)
    except KnowledgeError as e:
        raise SystemExit(f"--knowledge {args.knowledge}: {e}") from None
    engine = ReplyEngine(loaded.model, loaded.tokenizer, args.device, safety_filter=safety,
                         ranker=ranking.build(args.device), retriever=retriever, **memory.engine_options(loaded))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {loaded.directory} (Ctrl-D to quit)", file=sys.stderr)

    def show(_: int, piece: str) -> None:
        print(piece.replace("\r", " ").replace("\n", " "), end="", flush=True)

    history: list[str] = []
    turn = 0
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        message = line.strip()
        if not message:
            continue
        history.append(message)
        turn_config = config if config.seed is None else dataclasses.replace(config, seed=(config.seed + turn) % 2**63)
        if interactive:
            print("bot> ", end="", flush=True)
        reply = engine.reply([history], turn_config, return_candidates=args.show_candidates, on_piece=show)[0]
        print(flush=True)
        print_sources([s for s in reply.sources if s.get("kind", "knowledge") == "knowledge"], sys.stderr)
        if args.show_candidates:
            print_candidates(reply, sys.stderr)
        if reply.text:  # an empty fallback reply is not a turn: the next context must not hold an empty turn
            history.append(reply.text)
        turn += 1
    return 0
