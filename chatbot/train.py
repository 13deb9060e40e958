"""Training: one loop, correct on one device and on N DDP/FSDP ranks (``torchrun``), resumable exactly.

The output directory is a model directory (the latest weights) plus the checkpoint files described in
``chatbot/checkpoint.py``.  Resuming restores model, optimizer, scheduler, RNG and the position in the
epoch's batch list, which is rebuilt from (seed, epoch), so an interrupted run continues on the same
trajectory as an unbroken one.

On CPUs the trainer picks its precision and threads from what the machine has (``machine_settings``):
bf16 autocast only where the CPU multiplies bf16 natively (AMX or AVX512-BF16), as many threads as the
process may use.  It logs what it chose and why.
"""

from __future__ import annotations

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

from chatbot import checkpoint
from chatbot.checkpoint import METRICS, Progress, ResumeError, rank_batches
from chatbot.config import ModelConfig, preset
from chatbot.data import SPLITS, ExampleStore, MixedExamples, conversations, prepare_grounded, prepare_splits, split_of
from chatbot.model import ChatModel, sequence_nll
from chatbot.modeldir import TOKENIZER
from chatbot.tokenizer import ChatTokenizer
from eval.perplexity import evaluate_perplexity

log = logging.getLogger(__name__)

__all__ = ["ResumeError", "TrainConfig", "lr_factor", "machine_settings", "train"]


@dataclass(frozen=True)
class TrainConfig:
    out: str
    preset: str = "default"
    data: str = "chitchat"
    # A `chatbot index training-data` directory whose train.jsonl joins the train split, each example with
    # its passages (SYNTHETIC: docs/knowledge.md); validation stays on data's valid split.
    grounded: str | None = None
    grounded_share: float | None = None  # grounded examples' share of the train mix (None: each once)
    direction: Literal["forward", "backward"] = "forward"  # backward: p(last context turn | reply), for MMI
    block_type: Literal["evolved", "vanilla"] | None = None  # overrides the preset's
    model_overrides: tuple[tuple[str, Any], ...] = ()  # (field, value) pairs applied to the preset
    tokenizer: str | None = None  # an existing tokenizer.json; default: train one on the train split
    init_from: str | None = None  # start from this model directory's weights (same shape and tokenizer)
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
    snapshot_every: int = 0  # also keep a packed fp16 copy every N steps under snapshots/ (0: never)
    log_every: int = 20
    device: str = "auto"
    fsdp: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16
    threads: int | None = None  # CPU threads per process (None: every core this process may use)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.grad_accum < 1 or self.batch_tokens < 16:
            raise ValueError("max_steps and grad_accum must be >= 1, batch_tokens >= 16")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0 and warmup_steps >= 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.snapshot_every < 0:
            raise ValueError("snapshot_every must be >= 0")
        if self.grounded_share is not None and not (self.grounded and 0 < self.grounded_share < 1):
            raise ValueError("grounded_share needs grounded data and must be in (0, 1)")

    def model_config(self, vocab_size: int) -> ModelConfig:
        overrides = dict(self.model_overrides)
        if self.block_type:
            overrides["block_type"] = self.block_type
        if self.dropout is not None:
            overrides["dropout"] = self.dropout
        if self.direction != "forward":
            overrides["direction"] = self.direction
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
    # The fused kernel updates every parameter in one pass (on `default`, 8.7 ms vs 24.6 ms a step for the
    # per-tensor loop, as profiled on an AMX Xeon); FSDP's DTensor parameters take the foreach path.
    fused = not (cfg.fsdp and dist.is_initialized())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9, fused=fused)


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

    def close(self) -> None:
        """Leave the process group together: a rank that exits while gloo's threads still run can abort
        in their destructors ("terminate called without an active exception", seen under load)."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


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
    if cfg.grounded:
        splits = dict(splits, grounded=prepare_grounded(cfg.grounded, tokenizer))
    return tokenizer, splits


# ----------------------------------------------------------------------------------------- machine


@dataclass(frozen=True)
class MachineSettings:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for fp32
    threads: int | None  # CPU threads set for this process (None on CUDA)
    why: str

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16: bf16 GEMMs run several times faster than fp32.  Elsewhere (AVX2 EPYCs,
    older Xeons) bf16 is emulated and slower, so autocast would only cost precision."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_settings(cfg: TrainConfig, device: torch.device, local_world: int = 1) -> MachineSettings:
    """Precision and threads for this machine, with the reason, from the config's requests."""
    reasons = []
    if cfg.precision == "fp32":
        amp = None
        reasons.append("fp32 (asked for)")
    elif cfg.precision == "bf16":
        amp = torch.bfloat16
        reasons.append("bf16 autocast (asked for)")
    elif device.type == "cuda":
        amp = torch.bfloat16
        reasons.append("bf16 autocast (CUDA)")
    elif cpu_has_native_bf16():
        amp = torch.bfloat16
        reasons.append("bf16 autocast (this CPU has AMX or AVX512-BF16)")
    else:
        amp = None
        reasons.append(f"fp32 (this CPU, {torch.backends.cpu.get_cpu_capability()}, has no native bf16; "
                       "--precision bf16 forces it)")
    threads = None
    if device.type == "cpu":
        threads = cfg.threads or max(1, usable_cores() // local_world)
        torch.set_num_threads(threads)
        wait = os.environ.get("OMP_WAIT_POLICY", "unset")
        reasons.append(f"{threads} thread(s) ({'asked for' if cfg.threads else f'{usable_cores()} usable cores / {local_world} process(es)'}), "
                       f"OMP_WAIT_POLICY={wait}")
    return MachineSettings(device, amp, threads, "; ".join(reasons))


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


# ----------------------------------------------------------------------------------------- trainer


class Trainer:
    """One training run: set up (or resume) in ``__init__``, then ``run()`` until ``max_steps``."""

    def __init__(self, cfg: TrainConfig, initial_model: ChatModel | None = None):
        self.cfg = cfg
        device = pick_device(cfg)
        self.ddp = ddp = Distributed.from_env(device.type)
        if device.type == "cuda":
            device = torch.device("cuda", ddp.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.machine = machine_settings(cfg, device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        self.out = out = Path(cfg.out)

        if ddp.is_main:
            out.mkdir(parents=True, exist_ok=True)
            self.tokenizer, splits = prepare_data(cfg, out)
            if not (out / TOKENIZER).exists():
                self.tokenizer.save(out / TOKENIZER)
        ddp.barrier()
        if not ddp.is_main:
            self.tokenizer, splits = prepare_data(cfg, out)  # cached: loads what rank 0 wrote

        if initial_model is not None:
            if ddp.world > 1:
                raise ValueError("training from an initial model runs in one process, not under torchrun")
            if initial_model.config.vocab_size < self.tokenizer.vocab_size:
                raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} entries but the model "
                                 f"{initial_model.config.vocab_size}")
        self.model_cfg = model_cfg = initial_model.config if initial_model is not None else cfg.model_config(self.tokenizer.vocab_size)
        saved = checkpoint.check_resume(out, cfg, model_cfg)
        torch.manual_seed(cfg.seed)
        self.raw_model = (initial_model if initial_model is not None else ChatModel(model_cfg)).to(device)
        if cfg.init_from and not saved:
            self.init_weights(cfg.init_from)
        self.progress = checkpoint.restore(out, saved, self.raw_model, device) if saved else Progress()
        self.sharded = cfg.fsdp and ddp.world > 1
        self.model = self.wrap(self.raw_model)
        self.optimizer = make_optimizer(self.model, cfg)  # after sharding: FSDP replaces the parameters
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        if saved:
            checkpoint.restore_optimizer(out, saved, self.model, self.optimizer, self.scheduler, ddp, device, self.sharded)
            log.info("resumed %s at step %d (epoch %d, %d of its batches done)", out, self.progress.step,
                     self.progress.epoch, self.progress.epoch_batches_done)

        self.train_store, self.valid_store = (
            ExampleStore(splits[s], model_cfg.max_source_len, model_cfg.max_target_len, model_cfg.direction)
            for s in ("train", "valid"))
        if cfg.grounded:
            if model_cfg.knowledge_passages < 1 or model_cfg.direction != "forward":
                raise ValueError("--grounded trains a forward model to read passages: set knowledge_passages "
                                 "(e.g. --set knowledge_passages=3)")
            grounded = ExampleStore(splits["grounded"], model_cfg.max_source_len, model_cfg.max_target_len,
                                    max_passages=model_cfg.knowledge_passages)
            self.train_store = MixedExamples.with_share(self.train_store, grounded, cfg.grounded_share)
            if ddp.is_main:
                log.info("train mix: %d chitchat + %d grounded examples (%d distinct)", len(self.train_store) - len(
                    self.train_store.local[1]), len(self.train_store.local[1]), len(grounded))
        if ddp.is_main:  # work after the checkpoint (or all of it, starting afresh) is being redone
            checkpoint.drop_events_after(out / METRICS, self.progress.step)
        self.metrics_file = open(out / METRICS, "a") if ddp.is_main else None

    def init_weights(self, directory: str) -> None:
        """Weights from another model directory: a backward model learns far faster from a chat model's
        weights (it already reads and writes turns) than from scratch."""
        from chatbot.modeldir import load_model

        source = load_model(directory)
        # What may differ: none is a weight's shape (positions are sinusoidal, so the length limits are free
        # too): a chat model learns to read passages, in a longer source, from its own weights.
        free = ("direction", "dropout", "attention_dropout", "knowledge_passages", "max_source_len", "max_target_len")
        shape = [{k: v for k, v in c.to_dict().items() if k not in free} for c in (source.model.config, self.model_cfg)]
        if shape[0] != shape[1] or source.tokenizer.fingerprint() != self.tokenizer.fingerprint():
            raise ValueError(f"--init-from {directory}: its shape or tokenizer differs from this run's "
                             f"(use its preset and --tokenizer {directory}/tokenizer.json)")
        self.raw_model.load_state_dict(source.model.state_dict())
        log.info("initialised from %s", directory)

    def wrap(self, model: ChatModel) -> torch.nn.Module:
        if self.ddp.world == 1:
            return model
        if self.cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in [*model.encoder, *model.decoder]:
                fully_shard(block)
            return fully_shard(model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # -- the loop

    def run(self) -> dict:
        cfg, ddp, progress = self.cfg, self.ddp, self.progress
        batches = self.epoch_batches(progress.epoch)
        if len(batches) < cfg.grad_accum:
            raise ValueError(f"the train split gives {len(batches)} batches per rank, fewer than grad_accum={cfg.grad_accum}")
        if ddp.is_main:
            log.info("model: %s, %.2fM parameters; %d train examples, %d batches/epoch/rank; %s",
                     self.model_cfg.block_type, self.raw_model.num_parameters() / 1e6, len(self.train_store),
                     len(batches), self.machine.why)
        bar = tqdm(total=cfg.max_steps, initial=progress.step, desc="train", unit=" step", dynamic_ncols=True,
                   disable=not (cfg.progress and ddp.is_main))
        self.model.train()
        window = Window()
        last_valid: dict = {}
        while progress.step < cfg.max_steps:
            batch_pos = progress.epoch_batches_done // ddp.world
            if batch_pos + cfg.grad_accum > len(batches):
                progress.epoch, progress.epoch_batches_done, batch_pos = progress.epoch + 1, 0, 0
                batches = self.epoch_batches(progress.epoch)
            micro = [self.train_store.collate(b) for b in batches[batch_pos:batch_pos + cfg.grad_accum]]
            wall, cpu = time.perf_counter(), time.process_time()
            loss_sum, tokens, grad_norm = self.train_step(micro)
            progress.train_seconds += time.perf_counter() - wall
            progress.cpu_seconds += time.process_time() - cpu
            progress.step += 1
            progress.epoch_batches_done = (batch_pos + cfg.grad_accum) * ddp.world
            window.add(loss_sum, tokens)
            bar.update(1)
            last_step = progress.step == cfg.max_steps
            if progress.step % cfg.log_every == 0 or last_step:
                event = self.record_train(window, grad_norm)
                bar.set_postfix(loss=f"{event['loss']:.3f}", lr=f"{event['lr']:.2e}", tok_s=f"{event['tokens_per_s']:.0f}")
                window = Window()
            if progress.step % cfg.eval_every == 0 or last_step:
                last_valid = self.validate()
            if progress.step % cfg.save_every == 0 or last_step:
                self.save()
            if cfg.snapshot_every and progress.step % cfg.snapshot_every == 0 and ddp.is_main:
                checkpoint.snapshot(self.out, progress.step)
        bar.close()
        if self.metrics_file:
            self.metrics_file.close()
        self.ddp.close()
        return last_valid

    def epoch_batches(self, epoch: int) -> list:
        batches = self.train_store.batches(self.cfg.batch_tokens, seed=self.cfg.seed, epoch=epoch)
        return rank_batches(batches, self.ddp.rank, self.ddp.world)

    def train_step(self, micro: list) -> tuple[float, float, float]:
        """One optimizer step over the micro-batches; returns (summed loss, target tokens, grad norm),
        loss and tokens summed over all ranks."""
        ddp, model = self.ddp, self.model
        step_tokens = ddp.all_sum(sum(b.target_tokens for b in micro))
        loss_sum = 0.0
        for i, b in enumerate(micro):
            sync = i == len(micro) - 1 or ddp.world == 1 or self.cfg.fsdp
            no_sync = model.no_sync() if not sync and hasattr(model, "no_sync") else nullcontext()
            with no_sync, self.machine.autocast():
                logits = model(b.src.to(self.device), b.tgt_in.to(self.device))
                loss, _ = sequence_nll(logits, b.tgt_out.to(self.device), self.model_cfg.pad_id, self.cfg.label_smoothing)
                # DDP averages gradients over ranks; scaling by world/total makes the step token-weighted.
                (loss * ddp.world / step_tokens).backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return ddp.all_sum(loss_sum), step_tokens, float(grad_norm)

    # -- bookkeeping

    def record(self, event: dict) -> None:
        if self.metrics_file:
            self.metrics_file.write(json.dumps(event) + "\n")
            self.metrics_file.flush()

    def record_train(self, window: "Window", grad_norm: float) -> dict:
        p = self.progress
        elapsed = time.perf_counter() - window.start
        event = {"event": "train", "step": p.step, "epoch": p.epoch, "loss": window.loss / max(window.tokens, 1),
                 "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                 "tokens_per_s": window.tokens / max(elapsed, 1e-9), "train_seconds": round(p.train_seconds, 2),
                 "cpu_seconds": round(p.cpu_seconds, 2), "time": time.time()}
        self.record(event)
        return event

    def validate(self) -> dict:
        result = None
        if self.ddp.is_main or self.sharded:  # every rank must take part in a sharded forward
            model = self.model if self.sharded else self.raw_model
            with self.machine.autocast():
                result = evaluate_perplexity(model, self.valid_store, self.cfg.batch_tokens, self.device, progress=False,
                                             max_examples=self.cfg.valid_examples).to_dict()
            self.record({"event": "valid", "step": self.progress.step, "train_seconds": round(self.progress.train_seconds, 2),
                         "cpu_seconds": round(self.progress.cpu_seconds, 2), **result})
            if self.ddp.is_main:
                log.info("step %d: valid perplexity %.2f", self.progress.step, result["perplexity"])
        self.ddp.barrier()
        return result if self.ddp.is_main else {}

    def save(self) -> None:
        checkpoint.save(self.out, model=self.model, raw_model=self.raw_model, optimizer=self.optimizer,
                        scheduler=self.scheduler, tokenizer=self.tokenizer, progress=self.progress, cfg=self.cfg,
                        ddp=self.ddp, device=self.device, sharded=self.sharded)


@dataclass
class Window:
    """Loss and tokens since the last train event."""

    loss: float = 0.0
    tokens: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, loss: float, tokens: float) -> None:
        self.loss += loss
        self.tokens += tokens


def train(cfg: TrainConfig, initial_model: ChatModel | None = None) -> dict:
    """Train until ``max_steps``; returns the final validation result (and writes everything to cfg.out).

    ``initial_model`` (single process only) starts from that model, its config and weights, instead of a
    fresh preset model, and trains it in place: ``chatbot compress`` fine-tunes a pruned model with it
    (the pruning masks' hooks stay active, so pruned weights stay zero).  cfg.tokenizer must be its
    tokenizer."""
    return Trainer(cfg, initial_model).run()
