"""Training: one script, correct on one device and on N DDP ranks (``torchrun``), resumable exactly.

The output directory is a model directory (config.json, model.safetensors, tokenizer.json: the latest
weights) plus ``train_state/`` (optimizer and scheduler state, RNG states, the data position and the
training config), and ``metrics.jsonl`` (one JSON object per log or validation event).

Resuming restores model, optimizer, scheduler, RNG and the position in the epoch's batch list, which is
rebuilt from (seed, epoch), so an interrupted run continues on the same trajectory as an unbroken one.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from chatbot.config import ModelConfig, preset
from chatbot.data import SPLITS, ExampleStore, conversations, prepare_splits, split_of
from chatbot.model import ChatModel, sequence_nll
from chatbot.modeldir import CONFIG, TOKENIZER, WEIGHTS, save_model
from chatbot.tokenizer import ChatTokenizer
from eval.perplexity import evaluate_perplexity

log = logging.getLogger(__name__)

STATE_DIR = "train_state"
# Fields that may change between a run and its resumption: they do not alter the trajectory.
RESUMABLE_CHANGES = {"out", "eval_every", "save_every", "log_every", "progress", "valid_examples", "max_steps"}


class ResumeError(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainConfig:
    out: str
    preset: str = "default"
    data: str = "chitchat"
    block_type: Literal["evolved", "vanilla"] | None = None  # overrides the preset's
    model_overrides: tuple[tuple[str, Any], ...] = ()  # (field, value) pairs applied to the preset
    tokenizer: str | None = None  # an existing tokenizer.json; default: train one on the train split
    vocab_size: int | None = None  # BPE entries to train; default: the preset's vocabulary size
    skip_bad_lines: bool = False
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 500
    schedule: Literal["cosine", "inverse_sqrt", "constant"] = "cosine"
    max_steps: int = 1000
    batch_tokens: int = 8192  # per rank and micro-batch, padded source + target tokens
    grad_accum: int = 1
    clip: float = 1.0
    label_smoothing: float = 0.1
    dropout: float | None = None  # overrides the preset's residual dropout
    seed: int = 1234
    eval_every: int = 500
    valid_examples: int | None = None  # evaluate on a fixed subset of the valid split (None: all)
    save_every: int = 500
    log_every: int = 20
    device: str = "auto"
    fsdp: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.grad_accum < 1 or self.batch_tokens < 16:
            raise ValueError("max_steps and grad_accum must be >= 1, batch_tokens >= 16")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0 and warmup_steps >= 0")

    def model_config(self, vocab_size: int) -> ModelConfig:
        overrides = dict(self.model_overrides)
        if self.block_type:
            overrides["block_type"] = self.block_type
        if self.dropout is not None:
            overrides["dropout"] = self.dropout
        return preset(self.preset, **overrides, vocab_size=vocab_size)  # the model's vocabulary is the tokenizer's

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_overrides"] = [list(p) for p in self.model_overrides]
        return d


# ----------------------------------------------------------------------------------------- helpers


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then the chosen decay (cosine to 0 at max_steps, or 1/sqrt)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "inverse_sqrt":
        return math.sqrt(max(cfg.warmup_steps, 1) / (step + 1))
    progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() > 1 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)


def rng_state(device: torch.device) -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, str], device: torch.device) -> None:
    decode = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(decode(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(decode(state["cuda"]), device)


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "Distributed":
        if "RANK" not in os.environ:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))

    def all_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


# ----------------------------------------------------------------------------------------- data


def prepare_data(cfg: TrainConfig, out: Path) -> tuple[ChatTokenizer, dict[str, Path]]:
    """The tokenizer (given, resumed, or trained on the train split) and the tokenized splits."""
    tok_path = out / TOKENIZER
    if cfg.tokenizer:
        tokenizer = ChatTokenizer.load(cfg.tokenizer)
    elif tok_path.exists():
        tokenizer = ChatTokenizer.load(tok_path)
    else:
        vocab_size = cfg.vocab_size or preset(cfg.preset).vocab_size
        log.info("training a %d-entry byte-level BPE on the train split of %s", vocab_size, cfg.data)
        texts = (t.text for c in conversations(cfg.data, cfg.skip_bad_lines) if split_of(c.id) == "train" for t in c.turns)
        tokenizer = ChatTokenizer.train(texts, vocab_size=vocab_size, show_progress=False)
    splits = prepare_splits(cfg.data, tokenizer, SPLITS, skip_bad_lines=cfg.skip_bad_lines)
    return tokenizer, splits


# ----------------------------------------------------------------------------------------- trainer


def check_resume(out: Path, cfg: TrainConfig, model_cfg: ModelConfig) -> dict | None:
    """The saved trainer state if ``out`` holds a run; refuses a run with a different config."""
    state_file = out / STATE_DIR / "trainer.json"
    if not state_file.exists():
        return None
    saved = json.loads(state_file.read_text())
    ours = cfg.to_dict()
    diffs = [f"{k}: saved {saved['train_config'].get(k)!r}, now {ours[k]!r}"
             for k in ours if k not in RESUMABLE_CHANGES and saved["train_config"].get(k) != ours[k]]
    saved_model = ModelConfig.load(out / CONFIG)
    diffs += [f"model.{k}: saved {v!r}, now {getattr(model_cfg, k)!r}"
              for k, v in saved_model.to_dict().items() if getattr(model_cfg, k) != v]
    if diffs:
        raise ResumeError(f"{out} holds a run with a different configuration; refusing to resume it.\n  "
                          + "\n  ".join(diffs) + "\nUse the original flags to resume, or a new --out to start afresh.")
    return saved


def train(cfg: TrainConfig, initial_model: ChatModel | None = None) -> dict:
    """Train until ``max_steps``; returns the final validation result (and writes everything to cfg.out).

    ``initial_model`` (single process only) starts from that model, its config and weights, instead of a
    fresh preset model, and trains it in place: ``chatbot compress`` fine-tunes a pruned model with it
    (the pruning masks' hooks stay active, so pruned weights stay zero).  cfg.tokenizer must be its
    tokenizer."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    ddp = Distributed.from_env(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    if ddp.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer, splits = prepare_data(cfg, out)
        if not (out / TOKENIZER).exists():
            tokenizer.save(out / TOKENIZER)
    ddp.barrier()
    if not ddp.is_main:
        tokenizer, splits = prepare_data(cfg, out)  # cached: loads what rank 0 wrote

    if initial_model is not None:
        if ddp.world > 1:
            raise ValueError("training from an initial model runs in one process, not under torchrun")
        if initial_model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} entries but the model {initial_model.config.vocab_size}")
    model_cfg = initial_model.config if initial_model is not None else cfg.model_config(tokenizer.vocab_size)
    saved = check_resume(out, cfg, model_cfg)
    torch.manual_seed(cfg.seed)
    model = raw_model = (initial_model if initial_model is not None else ChatModel(model_cfg)).to(device)
    step, epoch, batch_pos = 0, 0, 0
    if saved:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(out / WEIGHTS), device=str(device)))
        step, epoch, batch_pos = saved["step"], saved["epoch"], saved["batch_pos"]
    if ddp.world > 1:
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in [*model.encoder, *model.decoder]:
                fully_shard(block)
            model = fully_shard(model)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, cfg)  # after sharding: FSDP replaces the parameters
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if saved:
        opt_state = torch.load(out / STATE_DIR / "optimizer.pt", map_location="cpu", weights_only=True)
        if cfg.fsdp and ddp.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, opt_state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        set_rng_state(saved["rng"].get(str(ddp.rank), saved["rng"]["0"]), device)
        log.info("resumed %s at step %d (epoch %d, batch %d)", out, step, epoch, batch_pos)

    train_store = ExampleStore(splits["train"], model_cfg.max_source_len, model_cfg.max_target_len)
    valid_store = ExampleStore(splits["valid"], model_cfg.max_source_len, model_cfg.max_target_len)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def epoch_batches(e: int) -> list:
        batches = train_store.batches(cfg.batch_tokens, seed=cfg.seed, epoch=e)
        per_rank = len(batches) // ddp.world
        return batches[ddp.rank * per_rank:(ddp.rank + 1) * per_rank]  # every rank gets as many

    if ddp.is_main and saved:
        drop_events_after(out / "metrics.jsonl", step)  # work after the last checkpoint is being redone
    metrics_file = open(out / "metrics.jsonl", "a") if ddp.is_main else None

    def record(event: dict) -> None:
        if metrics_file:
            metrics_file.write(json.dumps(event) + "\n")
            metrics_file.flush()

    def save() -> None:
        state = gather_full_state(model, raw_model, optimizer, cfg)
        rngs = gather_rng(ddp, device)
        if ddp.is_main:
            save_model(raw_model if state is None else _with_state(raw_model, state[0]), tokenizer, out)
            (out / STATE_DIR).mkdir(exist_ok=True)
            tmp = out / STATE_DIR / "optimizer.pt.tmp"
            torch.save({"optimizer": state[1] if state else optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()}, tmp)
            tmp.replace(out / STATE_DIR / "optimizer.pt")
            trainer = {"step": step, "epoch": epoch, "batch_pos": batch_pos, "rng": rngs,
                       "train_config": cfg.to_dict(), "world_size": ddp.world}
            (out / STATE_DIR / "trainer.json").write_text(json.dumps(trainer, indent=1) + "\n")
        ddp.barrier()

    def validate() -> dict:
        result = None
        sharded = cfg.fsdp and ddp.world > 1  # every rank must take part in a sharded forward
        if ddp.is_main or sharded:
            result = evaluate_perplexity(model if sharded else raw_model, valid_store, cfg.batch_tokens, device, progress=False,
                                         max_examples=cfg.valid_examples).to_dict()
            record({"event": "valid", "step": step, **result})
        ddp.barrier()
        return result if ddp.is_main else {}

    batches = epoch_batches(epoch)
    if len(batches) < cfg.grad_accum:
        raise ValueError(f"the train split gives {len(batches)} batches per rank, fewer than grad_accum={cfg.grad_accum}")
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit=" step", disable=not (cfg.progress and ddp.is_main),
               dynamic_ncols=True)
    if ddp.is_main:
        log.info("model: %s, %.2fM parameters; %d train examples, %d batches/epoch/rank",
                 model_cfg.block_type, raw_model.num_parameters() / 1e6, len(train_store), len(batches))
    model.train()
    window_tokens, window_loss, window_start = 0, 0.0, time.perf_counter()
    last_valid: dict = {}
    while step < cfg.max_steps:
        if batch_pos + cfg.grad_accum > len(batches):
            epoch, batch_pos = epoch + 1, 0
            batches = epoch_batches(epoch)
        micro = [train_store.collate(batches[batch_pos + i]) for i in range(cfg.grad_accum)]
        batch_pos += cfg.grad_accum
        step_tokens = ddp.all_sum(sum(b.target_tokens for b in micro))
        step_loss = 0.0
        for i, b in enumerate(micro):
            sync = i == len(micro) - 1 or ddp.world == 1 or cfg.fsdp
            ctx = model.no_sync() if not sync and hasattr(model, "no_sync") else nullcontext()
            with ctx, autocast:
                logits = model(b.src.to(device), b.tgt_in.to(device))
                loss_sum, _ = sequence_nll(logits, b.tgt_out.to(device), model_cfg.pad_id, cfg.label_smoothing)
                # DDP averages gradients over ranks; scaling by world/total makes the step token-weighted.
                (loss_sum * ddp.world / step_tokens).backward()
            step_loss += loss_sum.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += int(step_tokens)
        window_loss += ddp.all_sum(step_loss)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            event = {"event": "train", "step": step, "epoch": epoch, "loss": window_loss / max(window_tokens, 1),
                     "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                     "tokens_per_s": window_tokens / max(elapsed, 1e-9), "time": time.time()}
            record(event)
            bar.set_postfix(loss=f"{event['loss']:.3f}", lr=f"{event['lr']:.2e}", tok_s=f"{event['tokens_per_s']:.0f}")
            window_tokens, window_loss, window_start = 0, 0.0, time.perf_counter()
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            last_valid = validate()
            if ddp.is_main:
                log.info("step %d: valid perplexity %.2f", step, last_valid["perplexity"])
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save()
    bar.close()
    if metrics_file:
        metrics_file.close()
    return last_valid


def drop_events_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def gather_full_state(model, raw_model, optimizer, cfg: TrainConfig):
    """For FSDP, the full (unsharded) model and optimizer state on rank 0; None otherwise."""
    if not cfg.fsdp or not dist.is_initialized():
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def _with_state(raw_model: ChatModel, state: dict) -> ChatModel:
    copy = ChatModel(raw_model.config)
    copy.load_state_dict(state)
    return copy


def gather_rng(ddp: Distributed, device: torch.device) -> dict[str, dict[str, str]]:
    """Every rank's RNG state (dropout differs per rank), keyed by rank, collected on all ranks."""
    mine = rng_state(device)
    if ddp.world == 1:
        return {"0": mine}
    everyone: list = [None] * ddp.world
    dist.all_gather_object(everyone, mine)
    return {str(r): s for r, s in enumerate(everyone)}
