"""``chatbot chat``: a terminal chat with a model directory (the shipped model by default).

Interactive: a prompt per message.  Piped stdin: one message per line in, one reply per line out, so
it can be scripted.  The model sees the last 7 turns; longer context is cut from the left.
"""

from __future__ import annotations

import argparse
import sys

from chatbot.data import MAX_CONTEXT_TURNS


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat in the terminal", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--temperature", type=float, default=0.88, help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="reply length limit in tokens")
    p.add_argument("--seed", type=int, help="seed: the same seed and input give the same replies")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    import torch

    from chatbot.generate import contexts_to_tensor, sample_candidates
    from chatbot.modeldir import load_model

    if args.temperature <= 0:
        raise ValueError("--temperature must be > 0")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    loaded = load_model(args.model, args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {loaded.directory} (Ctrl-D to quit)", file=sys.stderr)
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
        src = contexts_to_tensor(tokenizer, [history[-MAX_CONTEXT_TURNS:]], model.config.max_source_len).to(args.device)
        seed = None if args.seed is None else args.seed + turn
        batch = sample_candidates(model, src, 1, args.temperature, top_k=args.top_k,
                                  max_new_tokens=args.max_new_tokens, seed=seed)
        reply = tokenizer.decode(batch.candidates[0][0].token_ids).strip()
        history.append(reply)
        turn += 1
        print(f"bot> {reply}" if interactive else reply, flush=True)
    return 0
