"""The ``chatbot`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from chatbot.config import PRESETS

log = logging.getLogger("chatbot")


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (works under torchrun for DDP/FSDP)",
                       description="Train a chat model; OUT becomes a model directory plus train_state/ for exact resume. "
                                   "Re-running with the same flags resumes; different flags are refused.")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="model size preset (default: %(default)s)")
    p.add_argument("--block-type", choices=["evolved", "vanilla"], help="override the preset's block type")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field, e.g. --set n_decoder_layers=7 (repeatable)")
    p.add_argument("--data", default="chitchat", help="'chitchat' (bundled) or a JSONL corpus file (see docs/data.md)")
    p.add_argument("--grounded", metavar="DIR",
                   help="add a `chatbot index training-data` directory's SYNTHETIC knowledge-grounded examples (with "
                        "their passages) to the train split; needs --set knowledge_passages=N (docs/knowledge.md)")
    p.add_argument("--grounded-share", type=float, metavar="S",
                   help="grounded examples' share of the train mix, repeating them as needed (default: each once)")
    p.add_argument("--out", required=True, help="output directory (model directory + train_state/)")
    p.add_argument("--direction", default="forward", choices=["forward", "backward"],
                   help="forward: a chat model, p(reply | context); backward: p(last context turn | reply), "
                        "the scorer for --mmi-model reranking (default: %(default)s)")
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training one on the train split")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from this model directory's weights (same preset and tokenizer), e.g. a backward "
                        "model from the chat model")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size to train (default: the preset's, 8192)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed JSONL lines (reports how many) instead of failing")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "inverse_sqrt", "constant"], help="decay after warm-up")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps in total (default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded source+target tokens per micro-batch and rank")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--dropout", type=float, help="override the preset's dropout")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--eval-every", type=int, default=500, help="validation perplexity every N steps")
    p.add_argument("--valid-examples", type=int, help="validate on the first N valid examples (default: all)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--snapshot-every", type=int, default=0,
                   help="also keep a packed fp16 model directory every N steps in OUT/snapshots/ (default: never)")
    p.add_argument("--log-every", type=int, default=20, help="metrics.jsonl train event every N steps")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP under torchrun (presets that do not fit one GPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA and on CPUs with AMX or AVX512-BF16, else fp32 (default: %(default)s)")
    p.add_argument("--threads", type=int,
                   help="CPU threads per process (default: the cores this process may use, shared among local ranks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def parse_overrides(pairs: list[str]) -> tuple[tuple[str, object], ...]:
    out = []
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects FIELD=VALUE, got {pair!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.append((field, parsed))
    return tuple(out)


def run_train(args: argparse.Namespace) -> int:
    # Before torch loads OpenMP: idle threads sleep instead of spinning, so a training step next to another
    # busy process slows in proportion instead of collapsing (6x measured with spinning threads).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from chatbot.train import TrainConfig, train

    cfg = TrainConfig(
        out=args.out, preset=args.preset, data=args.data, grounded=args.grounded, grounded_share=args.grounded_share, direction=args.direction, block_type=args.block_type,
        model_overrides=parse_overrides(args.set), tokenizer=args.tokenizer, init_from=args.init_from, vocab_size=args.vocab_size,
        skip_bad_lines=args.skip_bad_lines, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, schedule=args.schedule, max_steps=args.max_steps,
        batch_tokens=args.batch_tokens, grad_accum=args.grad_accum, clip=args.clip,
        label_smoothing=args.label_smoothing, dropout=args.dropout, seed=args.seed, eval_every=args.eval_every,
        valid_examples=args.valid_examples, save_every=args.save_every, snapshot_every=args.snapshot_every,
        log_every=args.log_every, device=args.device, fsdp=args.fsdp, precision=args.precision, threads=args.threads,
        progress=not args.no_progress,
    )
    result = train(cfg)
    if result:
        print(json.dumps({"valid": result}))
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluation commands")
    esub = p.add_subparsers(dest="eval_command", required=True)
    ppl = esub.add_parser("perplexity", help="token and per-word perplexity of a model on held-out data",
                          description="Prints JSON: perplexity (response tokens incl. end-of-turn, token-weighted, base e), "
                                      "per_word_perplexity, nll, tokens, words, examples.")
    ppl.add_argument("--model", help="model directory (default: the shipped model)")
    ppl.add_argument("--data", default="test",
                     help="'test' or 'valid' (that split of the bundled corpus), or a JSONL file (all of it)")
    ppl.add_argument("--batch-tokens", type=int, default=8192)
    ppl.add_argument("--max-examples", type=int, help="evaluate only the first N examples")
    ppl.add_argument("--device", default="cpu")
    ppl.add_argument("--skip-bad-lines", action="store_true", help="skip malformed JSONL lines instead of failing")
    ppl.add_argument("--knn", metavar="DIR", help="also report perplexity with this kNN-LM datastore (chatbot memory build)")
    ppl.add_argument("--knn-k", type=int, help="neighbours (default: the datastore's tuned value)")
    ppl.add_argument("--knn-lambda", type=float, help="weight of the neighbours' distribution (default: tuned)")
    ppl.add_argument("--knn-temperature", type=float, help="softmax temperature over -distance (default: tuned)")
    ppl.set_defaults(func=run_perplexity)
    from eval.cli import add_ssa_commands

    add_ssa_commands(esub)


def run_perplexity(args: argparse.Namespace) -> int:
    from eval.perplexity import model_dir_perplexity

    if args.knn:
        from chatbot.memory import knn_perplexity

        print(json.dumps(knn_perplexity(args.model, args.knn, args.data, args.knn_k, args.knn_lambda,
                                        args.knn_temperature, args.max_examples)))
        return 0

    directory, result = model_dir_perplexity(args.model, args.data, args.batch_tokens, args.max_examples, args.device,
                                             args.skip_bad_lines)
    print(json.dumps({"model": directory, "data": args.data, **result.to_dict()}))
    return 0


def add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="copy a trained model directory for shipping (weights only, optional fp16)",
                       description="Writes config.json, model.safetensors and tokenizer.json of SRC to DST, "
                                   "without train_state/ or metrics; --fp16 halves the weights' size (they load as fp32).")
    p.add_argument("src", help="a model directory, e.g. a `chatbot train --out` directory")
    p.add_argument("dst", help="where to write the packed model directory")
    p.add_argument("--fp16", action="store_true", help="store weights as float16")
    p.set_defaults(func=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    import torch

    from chatbot.modeldir import WEIGHTS, load_model, save_model

    loaded = load_model(args.src)
    out = save_model(loaded.model, loaded.tokenizer, args.dst, dtype=torch.float16 if args.fp16 else None)
    print(json.dumps({"dst": str(out), "parameters": loaded.model.num_parameters(),
                      "bytes": (out / WEIGHTS).stat().st_size}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatbot", description="Build, serve and evaluate a Meena-style chatbot.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train(sub)
    add_eval(sub)
    add_pack(sub)
    from chatbot.chat import add_chat
    from chatbot.client import add_client
    from chatbot.index_cli import add_index
    from chatbot.compress import add_compress
    from chatbot.memory import add_memory
    from chatbot.serve.cli import add_serve

    add_chat(sub)
    add_serve(sub)
    add_client(sub)
    add_index(sub)
    add_compress(sub)
    add_memory(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # our typed errors derive from these
        if args.verbose:
            raise
        print(f"chatbot {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
