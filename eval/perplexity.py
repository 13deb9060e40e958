"""Perplexity, defined once for the whole project (see docs/evaluation.md):

    perplexity          = exp(sum of NLL over response tokens incl. </t> / number of those tokens)
    per_word_perplexity = exp(the same NLL sum / number of whitespace words in the responses + one per </t>)

Token-weighted over the whole corpus (not a mean of per-example perplexities), natural log, context
and padding excluded.  The per-word figure compares across tokenizers; the per-token one only within one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from chatbot.data import ExampleStore
from chatbot.model import ChatModel, sequence_nll


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    per_word_perplexity: float
    nll: float  # mean NLL per token, nats
    tokens: int
    words: int
    examples: int

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity_from_totals(total_nll: float, tokens: int, words: int, examples: int) -> PerplexityResult:
    if tokens == 0:
        raise ValueError("no response tokens to evaluate")
    return PerplexityResult(math.exp(total_nll / tokens), math.exp(total_nll / max(words, 1)),
                            total_nll / tokens, tokens, words, examples)


@torch.no_grad()
def evaluate_perplexity(model: ChatModel, store: ExampleStore, batch_tokens: int = 8192,
                        device: str | torch.device = "cpu", progress: bool = True,
                        max_examples: int | None = None) -> PerplexityResult:
    was_training = model.training
    model.eval()
    total_nll, tokens, words, examples = 0.0, 0, 0, 0
    batches = store.batches(batch_tokens)  # length-sorted, deterministic
    if max_examples is not None:  # a fixed subset: the first examples in storage order
        keep = set(range(min(max_examples, len(store))))
        batches = [b for b in ([i for i in batch if i in keep] for batch in batches) if b]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")
    for idx in tqdm(batches, desc="perplexity", unit=" batch", disable=None if progress else True, leave=False):  # None: no bar off a terminal
        batch = store.collate(idx)
        with autocast:
            logits = model(batch.src.to(device), batch.tgt_in.to(device))
        nll, n = sequence_nll(logits, batch.tgt_out.to(device), model.config.pad_id)
        total_nll += float(nll)
        tokens += int(n)
        words += batch.words
        examples += len(idx)
    model.train(was_training)
    return perplexity_from_totals(total_nll, tokens, words, examples)


def model_dir_perplexity(model_dir: str | None, data: str = "test", batch_tokens: int = 8192,
                         max_examples: int | None = None, device: str = "cpu", skip_bad_lines: bool = False,
                         progress: bool = True) -> tuple[str, PerplexityResult]:
    """Perplexity of a model directory (None: the shipped model) on 'test' / 'valid' / 'train' of the
    bundled corpus, or on all of a JSONL file; returns (the directory loaded, the result)."""
    from chatbot.data import prepare_splits
    from chatbot.modeldir import load_model

    loaded = load_model(model_dir, device)
    if data in ("test", "valid", "train"):
        directory = prepare_splits("chitchat", loaded.tokenizer, [data])[data]
    else:
        directory = prepare_splits(data, loaded.tokenizer, ["test"], skip_bad_lines=skip_bad_lines,
                                   whole_file_as="test")["test"]
    cfg = loaded.model.config
    store = ExampleStore(directory, cfg.max_source_len, cfg.max_target_len, cfg.direction)
    return str(loaded.directory), evaluate_perplexity(loaded.model, store, batch_tokens, device, progress, max_examples)
