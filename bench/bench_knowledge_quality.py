"""Q4: do retrieved passages make replies more factual?  On the held-out articles' questions.

    chatbot index training-data --out data/grounded          # once: heldout.jsonl (synthetic, docs/knowledge.md)
    python -m bench.bench_knowledge_quality --data data/grounded --model runs/knowledge-model --n 200

For each held-out example (its articles never appear in training): the reply with and without
retrieval (same seed, sample-and-rank), the unigram F1 between the reply and the gold sentence (the
fact the synthetic reply states), the perplexity of the gold reply given the context with and without
the retrieved passages (teacher-forced, token-weighted, base e: docs/evaluation.md's definition), and
the share of turns whose top source is the gold article.  The goal: F1 with retrieval at least 2x
without.  Meaningful only for a model trained on knowledge (``knowledge_passages`` > 0 in its config);
for another, ``--knowledge-passages N`` forces N passages into its input anyway.

``--chitchat-baseline DIR`` adds the shipping rule's check in the same run: chitchat test perplexity
(``chatbot eval perplexity``'s definition) of the model and of DIR, the model it started from; ship the
knowledge model only if its ratio is <= 1.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections import Counter

import torch

from bench.common import header, write_json

_TOKEN = re.compile(r"[a-z0-9]+")
OPENERS = ("Sure. ", "Sure! ", "Yes! ", "I do. ")


def unigram_f1(prediction: str, gold: str) -> float:
    p, g = Counter(_TOKEN.findall(prediction.lower())), Counter(_TOKEN.findall(gold.lower()))
    overlap = sum((p & g).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(p.values()), overlap / sum(g.values())
    return 2 * precision * recall / (precision + recall)


def abstain_pattern() -> "re.Pattern[str]":
    """Replies in the form of the training data's no-gold replies ("I don't know much about {topic}. ..."),
    whatever topic the model put in them: the share says how often the model declines instead of stating
    a fact."""
    from retrieval.grounded_data import NO_GOLD_REPLIES

    heads = [re.escape(t.split("{topic}")[0].strip()) for t in NO_GOLD_REPLIES]
    return re.compile("^(" + "|".join(heads) + ")", re.IGNORECASE)


def gold_sentence(reply: str) -> str:
    for opener in OPENERS:
        if reply.startswith(opener):
            return reply[len(opener):]
    return reply


def gold_nll(engine, context: list[str], reply: str, knowledge) -> tuple[float, int]:
    """Summed NLL (nats) and token count of ``reply`` + end-of-turn given the context (and passages)."""
    from chatbot.generate import contexts_to_tensor
    from chatbot.tokenizer import BOS_ID, EOT_ID

    model, tok = engine.model, engine.tokenizer
    src = contexts_to_tensor(tok, [context], model.config.max_source_len, [knowledge] if knowledge else None)
    ids = tok.encode(reply)[: model.config.max_target_len - 1]
    with torch.inference_mode():
        enc = model.encode(src.to(engine.device))
        tgt_in = torch.tensor([[BOS_ID] + ids], device=engine.device)
        targets = torch.tensor([ids + [EOT_ID]], device=engine.device)
        logprobs = model.decode(tgt_in, enc).float().log_softmax(-1)
        return -float(logprobs.gather(2, targets[..., None]).sum()), len(ids) + 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a `chatbot index training-data` output directory")
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--index", help="knowledge index directory (default: the default knowledge base)")
    p.add_argument("--n", type=int, default=200, help="held-out examples")
    p.add_argument("--knowledge-passages", type=int, help="passages the model reads (default: its config's)")
    p.add_argument("--num-candidates", type=int, default=12)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--min-new-tokens", type=int,
                   help="minimum reply length in tokens (default: the served default, chatbot.ranking)")
    p.add_argument("--chitchat-baseline", metavar="DIR",
                   help="also chitchat test perplexity of --model and of DIR (the model it started from), side by side")
    p.add_argument("--chitchat-max-examples", type=int, help="first N test examples for the perplexities (default: all)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", help="JSON results file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    from chatbot.generate import DecodingConfig, ReplyEngine
    from chatbot.modeldir import load_model
    from retrieval.default_kb import ensure_default_index
    from retrieval.embedder import load_embedder
    from retrieval.grounded_data import read_examples
    from retrieval.knowledge import KnowledgeIndex
    from retrieval.retriever import KnowledgeRetriever

    loaded = load_model(args.model)
    embedder = load_embedder()
    kb = KnowledgeIndex.open(args.index or ensure_default_index(embedder), embedder)
    plain = ReplyEngine(loaded.model, loaded.tokenizer)
    reading = ReplyEngine(loaded.model, loaded.tokenizer, retriever=KnowledgeRetriever(kb),
                          knowledge_passages=args.knowledge_passages)
    n_read = reading.knowledge_passages
    examples = list(read_examples(f"{args.data}/heldout.jsonl"))[: args.n]
    from chatbot.ranking import served_min_new_tokens

    min_len = served_min_new_tokens(DecodingConfig.max_new_tokens) if args.min_new_tokens is None else args.min_new_tokens
    cfg = DecodingConfig(num_candidates=args.num_candidates, seed=args.seed, min_new_tokens=min_len)
    f1_with, f1_without, nll_with, nll_without, tokens, top_gold = [], [], 0.0, 0.0, 0, 0
    abstains, samples = abstain_pattern(), []
    abstained_with = abstained_without = 0
    t0 = time.perf_counter()
    for ex in tqdm(examples, desc="Q4", unit=" question", disable=None):
        context = [t["text"] for t in ex["turns"][:-1]]
        gold = ex["turns"][-1]["text"]
        (without,) = plain.reply([context], cfg)
        (with_kb,) = reading.reply([context], cfg)
        sentence = gold_sentence(gold)
        f1_without.append(unigram_f1(without.text, sentence))
        f1_with.append(unigram_f1(with_kb.text, sentence))
        abstained_with += bool(abstains.match(with_kb.text))
        abstained_without += bool(abstains.match(without.text))
        if len(samples) < 10:
            samples.append({"question": context[-1], "gold": sentence, "with": with_kb.text, "without": without.text})
        top_gold += bool(with_kb.sources) and with_kb.sources[0]["id"].split("#")[0] == ex["article"]
        passages = reading.retrieve([context])[0][:n_read] if n_read else []
        a, n = gold_nll(plain, context, gold, None)
        b, _ = gold_nll(plain, context, gold, passages)
        nll_without, nll_with, tokens = nll_without + a, nll_with + b, tokens + n
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    result = {"header": header(), "model": str(loaded.directory), "examples": len(examples),
              "knowledge_passages_read": n_read, "min_new_tokens": min_len, "f1_without": mean(f1_without), "f1_with": mean(f1_with),
              "f1_ratio": mean(f1_with) / max(mean(f1_without), 1e-9),
              "ppl_gold_without": math.exp(nll_without / max(tokens, 1)),
              "ppl_gold_with": math.exp(nll_with / max(tokens, 1)), "top_source_is_gold": top_gold / max(len(examples), 1),
              "abstain_with": abstained_with / max(len(examples), 1),
              "abstain_without": abstained_without / max(len(examples), 1), "samples": samples,
              "q4_seconds": round(time.perf_counter() - t0, 1)}
    print(f"{len(examples)} held-out questions, model reads {n_read} passages: unigram F1 {result['f1_without']:.3f} "
          f"without retrieval, {result['f1_with']:.3f} with ({result['f1_ratio']:.2f}x; goal >= 2x); gold-reply "
          f"perplexity {result['ppl_gold_without']:.1f} -> {result['ppl_gold_with']:.1f}; top source is the gold "
          f"article {100 * result['top_source_is_gold']:.0f}%; replies that decline (the no-gold template) "
          f"{100 * result['abstain_without']:.0f}% without retrieval, {100 * result['abstain_with']:.0f}% with")
    kb.close()
    if args.chitchat_baseline:
        from eval.perplexity import model_dir_perplexity

        t0 = time.perf_counter()
        ppl = {}
        for name, directory in (("model", args.model), ("baseline", args.chitchat_baseline)):
            ppl[name] = model_dir_perplexity(directory, "test", max_examples=args.chitchat_max_examples)[1].perplexity
        ratio = ppl["model"] / ppl["baseline"]
        result.update(chitchat_baseline=args.chitchat_baseline, chitchat_test_ppl=ppl["model"],
                      chitchat_test_ppl_baseline=ppl["baseline"], chitchat_ppl_ratio=ratio,
                      ship_rule_met=ratio <= 1.0, chitchat_seconds=round(time.perf_counter() - t0, 1))
        print(f"chitchat test perplexity {ppl['model']:.2f} vs {ppl['baseline']:.2f} for {args.chitchat_baseline} "
              f"({ratio:.3f}x): {'no worse, may ship' if ratio <= 1 else 'WORSE, do not ship'}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
