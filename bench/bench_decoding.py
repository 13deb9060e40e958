"""Decoding speed on CPU.

P1  Incremental decoding (k/v caches and conv windows, ``decode_step``) against recomputing the whole
    decoder over the prefix every step (``decode``), greedy, 64 new tokens forced (end-of-turn masked),
    one context.  Both must pick the same tokens; the largest logit difference is reported.
P2  One sample-and-rank reply (N = 20, T = 0.88, up to 32 new tokens) from the reply engine against
    Hugging Face ``T5ForConditionalGeneration`` with a config of about the same parameter count (random
    weights): ``generate(do_sample=True, num_return_sequences=20)`` plus ranking the 20 by model
    log-likelihood, on the same context's token ids, in the same process.  Two rows: replies of natural
    length (ours end at end-of-turn; a random-weight T5 rarely emits its end token, so it runs all 32
    steps) and all 32 tokens forced on both sides (the like-for-like row).  Goal: ours <= 0.7x.
    Then the time per reply when 1, 8 and 32 held-out contexts are decoded in one engine call.

Each timing is the median of --repeats runs after one warm-up run; the two sides of a comparison
alternate run by run and their ratio is the median of the per-pair ratios.  Wall time and this
process's CPU time are both kept: on a shared machine the CPU time is the steadier of the two.

--profile  instead: torch.profiler over a one-row greedy decode (P1's) and one 20-row sample-and-rank
    reply (P2's, 32 tokens forced): where a step's time goes, and how much of it is matmuls against
    weights (aten::mm / addmm; attention uses bmm) and the output projection alone.

Usage:  python -m bench.bench_decoding [--model DIR] [--out FILE.json] [--threads 2] [--profile]
"""

from __future__ import annotations

import argparse
import os

import torch

from bench.bench_decoding_quality import held_out_contexts
from bench.common import header, median_timed, paired, write_json
from chatbot.generate import DecodingConfig, ReplyEngine, contexts_to_tensor
from chatbot.model import ChatModel
from chatbot.modeldir import load_model
from chatbot.tokenizer import BOS_ID, EOT_ID, PAD_ID

P1_NEW_TOKENS = 64
P2_CANDIDATES, P2_TEMPERATURE, P2_NEW_TOKENS = 20, 0.88, 32
BATCH_SIZES = (1, 8, 32)


# ----------------------------------------------------------------------------------------- P1


def greedy_tokens(model: ChatModel, src: torch.Tensor, steps: int, incremental: bool) -> tuple[list[int], torch.Tensor]:
    """Greedy decode of ``steps`` tokens with end-of-turn masked; returns the tokens and all step logits."""
    enc = model.encode(src)
    state = model.start_decoding(enc) if incremental else None
    ids, all_logits = [BOS_ID], []
    for _ in range(steps):
        if incremental:
            logits = model.decode_step(torch.tensor([[ids[-1]]]), state)[0, -1]
        else:
            logits = model.decode(torch.tensor([ids]), enc)[0, -1]
        all_logits.append(logits)
        logits = logits.clone()
        logits[[PAD_ID, BOS_ID, EOT_ID]] = float("-inf")
        ids.append(int(logits.argmax()))
    return ids[1:], torch.stack(all_logits)


def bench_p1(model: ChatModel, src: torch.Tensor, repeats: int) -> dict:
    with torch.inference_mode():
        inc_ids, inc_logits = greedy_tokens(model, src, P1_NEW_TOKENS, incremental=True)
        full_ids, full_logits = greedy_tokens(model, src, P1_NEW_TOKENS, incremental=False)
        t = paired(repeats, (greedy_tokens, model, src, P1_NEW_TOKENS, True),
                   (greedy_tokens, model, src, P1_NEW_TOKENS, False))
    return {"new_tokens": P1_NEW_TOKENS, "incremental_s": t["a_s"], "full_recompute_s": t["b_s"],
            "incremental_cpu_s": t["a_cpu_s"], "full_recompute_cpu_s": t["b_cpu_s"],
            "incremental_ms_per_token": 1000 * t["a_s"] / P1_NEW_TOKENS,
            "full_recompute_ms_per_token": 1000 * t["b_s"] / P1_NEW_TOKENS,
            "speedup": 1 / t["ratio"], "cpu_speedup": 1 / t["cpu_ratio"],
            "same_tokens": inc_ids == full_ids, "max_abs_logit_diff": float((inc_logits - full_logits).abs().max())}


# ----------------------------------------------------------------------------------------- P2


def t5_like(model: ChatModel):
    """A T5 of about our model's parameter count: d_model, heads and vocabulary ours; layers and d_ff
    chosen so the non-embedding weights match (2 + 7 layers of 12 d^2 and 16 d^2 with d_ff = 4d, the
    same sizing as the project's default-vanilla preset)."""
    from transformers import T5Config, T5ForConditionalGeneration

    c = model.config
    config = T5Config(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_model // c.n_heads, d_ff=4 * c.d_model,
                      num_layers=2, num_decoder_layers=7, num_heads=c.n_heads, feed_forward_proj="relu",
                      dropout_rate=0.0, tie_word_embeddings=True, pad_token_id=PAD_ID, eos_token_id=EOT_ID,
                      decoder_start_token_id=BOS_ID)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).eval()


def hf_sample_and_rank(t5, tokenizer, context: list[str], max_source_len: int, forced: bool) -> str:
    """Tokenize, sample 20, score each by the model's log-likelihood (T = 1), return the best text."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    src = contexts_to_tensor(tokenizer, [context], max_source_len)
    # A config-less cache grows a layer per decoder layer; the one generate() builds from the config
    # sizes the decoder cache by the encoder's depth (num_layers) and fails when the depths differ.
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    out = t5.generate(input_ids=src, attention_mask=src.ne(PAD_ID), do_sample=True, temperature=P2_TEMPERATURE,
                      top_k=0, top_p=1.0, num_return_sequences=P2_CANDIDATES, max_new_tokens=P2_NEW_TOKENS,
                      min_new_tokens=P2_NEW_TOKENS if forced else 0, past_key_values=cache,
                      return_dict_in_generate=True, output_logits=True)
    generated = out.sequences[:, 1:]  # (N, T) without the start token
    logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (N, T, V)
    token_lp = logprobs.gather(2, generated[..., None])[..., 0]
    # Tokens after a row's end token are padding: not part of that candidate.
    ended_before = (generated == EOT_ID).int().cumsum(1) - (generated == EOT_ID).int()
    scores = token_lp.masked_fill(ended_before > 0, 0.0).sum(1)
    best = int(scores.argmax())
    return tokenizer.decode(generated[best].tolist())


def bench_p2(loaded, context: list[str], repeats: int) -> dict:
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = ReplyEngine(model, tokenizer)
    t5 = t5_like(model)
    rows = {}
    with torch.inference_mode():
        for name, forced in (("natural_length", False), ("forced_32_tokens", True)):
            config = DecodingConfig(num_candidates=P2_CANDIDATES, temperature=P2_TEMPERATURE,
                                    max_new_tokens=P2_NEW_TOKENS, min_new_tokens=P2_NEW_TOKENS if forced else 1, seed=0)
            t = paired(repeats, (engine.reply, [context], config),
                       (hf_sample_and_rank, t5, tokenizer, context, model.config.max_source_len, forced))
            (reply,) = engine.reply([context], config)
            rows[name] = {"ours_s": t["a_s"], "hf_t5_s": t["b_s"], "ratio": t["ratio"], "ours_cpu_s": t["a_cpu_s"],
                          "hf_t5_cpu_s": t["b_cpu_s"], "cpu_ratio": t["cpu_ratio"],
                          "ours_decode_steps": reply.timings["decode_steps"]}
    return {"context": context, "ours_parameters": model.num_parameters(),
            "hf_t5_parameters": sum(p.numel() for p in t5.parameters()), **rows}


def bench_batches(loaded, contexts: list[list[str]], repeats: int) -> dict:
    engine = ReplyEngine(loaded.model, loaded.tokenizer)
    config = DecodingConfig(num_candidates=P2_CANDIDATES, temperature=P2_TEMPERATURE, max_new_tokens=P2_NEW_TOKENS,
                            seed=0)
    rows = {}
    with torch.inference_mode():
        for size in BATCH_SIZES:
            wall, cpu = median_timed(repeats, engine.reply, contexts[:size], config)
            rows[str(size)] = {"call_s": wall, "per_reply_s": wall / size, "call_cpu_s": cpu,
                               "per_reply_cpu_s": cpu / size}
    return rows


# ----------------------------------------------------------------------------------------- profile


def profile_steps(loaded, context: list[str]) -> dict:
    """Self CPU time per decoding step under torch.profiler, and the shares of weight matmuls."""
    from torch.profiler import profile

    model, d, vocab = loaded.model, loaded.model.config.d_model, loaded.model.config.vocab_size
    src = contexts_to_tensor(loaded.tokenizer, [context], model.config.max_source_len)
    engine = ReplyEngine(model, loaded.tokenizer)
    forced = DecodingConfig(num_candidates=P2_CANDIDATES, temperature=P2_TEMPERATURE, max_new_tokens=P2_NEW_TOKENS,
                            min_new_tokens=P2_NEW_TOKENS, seed=0)
    cases = {"one row: greedy, P1": (lambda: greedy_tokens(model, src, P1_NEW_TOKENS, True), P1_NEW_TOKENS),
             f"{P2_CANDIDATES} rows: sample-and-rank, P2 forced": (lambda: engine.reply([context], forced),
                                                                    P2_NEW_TOKENS)}
    out = {}
    with torch.inference_mode():
        for name, (fn, steps) in cases.items():
            fn()  # warm-up
            with profile(record_shapes=True) as prof:
                fn()
            events = prof.key_averages(group_by_input_shape=True)
            total = sum(e.self_cpu_time_total for e in events)
            weights = [e for e in events if e.key in ("aten::mm", "aten::addmm")]
            output = [e for e in weights if e.input_shapes and e.input_shapes[-1][-1:] == [vocab]]
            square = [e for e in weights if e.input_shapes and e.input_shapes[1] == [d, d]]
            def self_us(group: list) -> float:
                return sum(e.self_cpu_time_total for e in group)

            out[name] = {"ms_per_step": total / steps / 1000, "weight_matmul_share": self_us(weights) / total,
                         "output_projection_share": self_us(output) / total,
                         "us_per_dxd_matmul": self_us(square) / max(sum(e.count for e in square), 1),
                         "top": events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40,
                                             max_shapes_column_width=50)}
    return out


# ----------------------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    p1, p2, batches = result["p1"], result["p2"], result["batches"]
    m = result["machine"]
    lines = [f"{result['date']}, {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, load average "
             f"{result['load_average']:.1f} at start; model {result['model']} ({p2['ours_parameters'] / 1e6:.2f}M "
             f"parameters); medians of {result['repeats']} runs after a warm-up, compared sides alternating; "
             "CPU = this process's CPU time.", "",
             f"P1: greedy, {p1['new_tokens']} new tokens, one context",
             "", "| decoding | ms / token | wall s | CPU s |", "|---|---:|---:|---:|",
             f"| full recompute | {p1['full_recompute_ms_per_token']:.2f} | {p1['full_recompute_s']:.3f} | "
             f"{p1['full_recompute_cpu_s']:.3f} |",
             f"| incremental (caches) | {p1['incremental_ms_per_token']:.2f} | {p1['incremental_s']:.3f} | "
             f"{p1['incremental_cpu_s']:.3f} |",
             "", f"Speed-up {p1['speedup']:.1f}x wall, {p1['cpu_speedup']:.1f}x CPU (medians of per-pair ratios); "
             f"same tokens: {p1['same_tokens']}; max |logit difference| {p1['max_abs_logit_diff']:.2e}.", "",
             f"P2: one sample-and-rank reply, N = {P2_CANDIDATES}, T = {P2_TEMPERATURE}, up to {P2_NEW_TOKENS} new "
             f"tokens; HF T5 {p2['hf_t5_parameters'] / 1e6:.2f}M parameters, random weights",
             "", "| reply length | ours wall s | HF T5 generate + rank wall s | ours / HF wall | ours / HF CPU |",
             "|---|---:|---:|---:|---:|"]
    for name, label in (("natural_length", "natural (ours stops at end-of-turn)"),
                        ("forced_32_tokens", "32 tokens forced on both")):
        row = p2[name]
        lines.append(f"| {label} | {row['ours_s']:.3f} | {row['hf_t5_s']:.3f} | {row['ratio']:.2f} | "
                     f"{row['cpu_ratio']:.2f} |")
    lines += ["", f"Batched sample-and-rank (N = {P2_CANDIDATES}, up to {P2_NEW_TOKENS} tokens), held-out contexts",
              "", "| contexts per call | call wall s | wall s per reply | CPU s per reply |", "|---:|---:|---:|---:|"]
    for size, row in batches.items():
        lines.append(f"| {size} | {row['call_s']:.3f} | {row['per_reply_s']:.3f} | {row['per_reply_cpu_s']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default: %(default)s)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--profile", action="store_true", help="profile the decoding steps instead of timing them")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        loaded = load_model(args.model)
        result = {**header(), "profile": profile_steps(loaded, held_out_contexts(1, seed=0)[0])}
        for name, row in result["profile"].items():
            print(f"{name}: {row['ms_per_step']:.1f} ms of self CPU per step under the profiler; matmuls against "
                  f"weights {row['weight_matmul_share']:.0%}, the output projection alone "
                  f"{row['output_projection_share']:.0%}; {row['us_per_dxd_matmul']:.0f} us per d x d matmul\n")
            print(row["top"])
        write_json(args.out, result)
        return
    import transformers

    # Other processes on the machine slow every timing: the load average says how busy it was.
    result = {**header(), "load_average": os.getloadavg()[0], "transformers": transformers.__version__}
    loaded = load_model(args.model)
    # Loaded once, before any timing: reading the corpus never falls between timed runs.
    contexts = held_out_contexts(max(BATCH_SIZES), seed=0)
    src = contexts_to_tensor(loaded.tokenizer, contexts[:1], loaded.model.config.max_source_len)
    result.update({"model": str(loaded.directory), "repeats": args.repeats,
                   "p1": bench_p1(loaded.model, src, args.repeats), "p2": bench_p2(loaded, contexts[0], args.repeats),
                   "batches": bench_batches(loaded, contexts, args.repeats)})
    print(markdown(result))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
