"""A training run's checkpoint: everything needed to continue it exactly, in one place.

Layout of a run directory ``OUT/``::

    config.json, model.safetensors, tokenizer.json   the latest weights: OUT is a model directory
    train_state/optimizer.pt                         optimizer and LR-scheduler state
    train_state/trainer.json                         progress, every rank's RNG state, the TrainConfig
    snapshots/step-NNNNNNN/                          packed fp16 model directories kept along the way
    metrics.jsonl                                    one JSON object per log or validation event

The data position is stored as the number of batches of the epoch consumed by all ranks together
(ranks take interleaved batches, see ``rank_batches``), so a run may resume on a different number of
processes; with the same number it continues bit-exactly.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from chatbot.config import ModelConfig
from chatbot.model import ChatModel
from chatbot.modeldir import CONFIG, WEIGHTS, save_model
from chatbot.tokenizer import ChatTokenizer

if TYPE_CHECKING:
    from chatbot.train import Distributed, TrainConfig

log = logging.getLogger(__name__)

STATE_DIR = "train_state"
SNAPSHOT_DIR = "snapshots"
METRICS = "metrics.jsonl"
# TrainConfig fields that may change when a run resumes: they leave the trajectory alone (bookkeeping),
# or are meant to be switched mid-run (precision, threads: the machine may change between sessions).
RESUMABLE_CHANGES = {"out", "eval_every", "save_every", "snapshot_every", "log_every", "progress", "valid_examples",
                     "max_steps", "precision", "threads"}


class ResumeError(RuntimeError):
    pass


@dataclass
class Progress:
    """Where a run stands.  ``epoch_batches_done`` counts the epoch's batches consumed by all ranks."""

    step: int = 0
    epoch: int = 0
    epoch_batches_done: int = 0
    train_seconds: float = 0.0  # wall-clock seconds of training (validation and saving excluded), all sessions
    cpu_seconds: float = 0.0  # this process's CPU seconds over the same spans (rank 0), all sessions


def rank_batches(batches: list, rank: int, world: int) -> list:
    """Rank ``rank``'s share of an epoch's batches: every world-th, so that after each rank has taken
    n batches the epoch's first n * world batches are the ones consumed, whatever ``world`` is."""
    per_rank = len(batches) // world
    return batches[rank:per_rank * world:world]


def rng_state(device: torch.device) -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, str], device: torch.device) -> None:
    def decode(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(decode(state["cuda"]), device)


def gather_rng(ddp: "Distributed", device: torch.device) -> dict[str, dict[str, str]]:
    """Every rank's RNG state (dropout differs per rank), keyed by rank, collected on all ranks."""
    mine = rng_state(device)
    if ddp.world == 1:
        return {"0": mine}
    everyone: list = [None] * ddp.world
    dist.all_gather_object(everyone, mine)
    return {str(r): s for r, s in enumerate(everyone)}


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool):
    """The whole model and optimizer state: gathered onto rank 0's CPU when FSDP shards them."""
    if not sharded:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def check_resume(out: Path, cfg: "TrainConfig", model_cfg: ModelConfig) -> dict | None:
    """The saved trainer state if ``out`` holds a run; refuses a run with a different config."""
    state_file = out / STATE_DIR / "trainer.json"
    if not state_file.exists():
        return None
    saved = json.loads(state_file.read_text())
    ours = cfg.to_dict()
    diffs = [f"{k}: saved {saved['train_config'].get(k)!r}, now {ours[k]!r}"
             for k in ours if k not in RESUMABLE_CHANGES and k in saved["train_config"]
             and saved["train_config"][k] != ours[k]]
    saved_model = ModelConfig.load(out / CONFIG)
    diffs += [f"model.{k}: saved {v!r}, now {getattr(model_cfg, k)!r}"
              for k, v in saved_model.to_dict().items() if getattr(model_cfg, k) != v]
    if diffs:
        raise ResumeError(f"{out} holds a run with a different configuration; refusing to resume it.\n  "
                          + "\n  ".join(diffs) + "\nUse the original flags to resume, or a new --out to start afresh.")
    return saved


def saved_progress(saved: dict) -> Progress:
    if "progress" in saved:
        return Progress(**saved["progress"])
    # a run written before the data position was process-count independent (contiguous shards)
    return Progress(saved["step"], saved["epoch"], saved["batch_pos"] * saved.get("world_size", 1))


def restore(out: Path, saved: dict, raw_model: ChatModel, device: torch.device) -> Progress:
    """Load the weights into the (unwrapped) model; returns the progress to continue from."""
    from safetensors.torch import load_file

    raw_model.load_state_dict(load_file(str(out / WEIGHTS), device=str(device)))
    return saved_progress(saved)


def restore_optimizer(out: Path, saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler, ddp: "Distributed", device: torch.device, sharded: bool) -> None:
    """Optimizer, scheduler and this rank's RNG; a rank that did not exist in the saved run takes
    rank 0's RNG state advanced by its own rank (different dropout streams per rank)."""
    opt_state = torch.load(out / STATE_DIR / "optimizer.pt", map_location="cpu", weights_only=True)
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, opt_state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(opt_state["optimizer"])
    scheduler.load_state_dict(opt_state["scheduler"])
    rngs = saved["rng"]
    if str(ddp.rank) in rngs:
        set_rng_state(rngs[str(ddp.rank)], device)
    else:
        set_rng_state(rngs["0"], device)
        torch.manual_seed(torch.initial_seed() + ddp.rank)
    saved_world = saved.get("world_size", 1)
    if saved_world != ddp.world and ddp.is_main:
        log.warning("resuming a %d-process run on %d processes: the data position carries over (up to %d batches "
                    "may repeat), the trajectory is no longer bit-identical to an unbroken run",
                    saved_world, ddp.world, ddp.world - 1)


def save(out: Path, *, model: torch.nn.Module, raw_model: ChatModel, optimizer: torch.optim.Optimizer, scheduler,
         tokenizer: ChatTokenizer, progress: Progress, cfg: "TrainConfig", ddp: "Distributed",
         device: torch.device, sharded: bool) -> None:
    """Write the checkpoint; files are replaced atomically, the trainer state last (it marks completion)."""
    model_state, opt_state = full_state(model, optimizer, sharded)
    rngs = gather_rng(ddp, device)
    if ddp.is_main:
        save_model(raw_model if model_state is None else _with_state(raw_model, model_state), tokenizer, out)
        (out / STATE_DIR).mkdir(exist_ok=True)
        tmp = out / STATE_DIR / "optimizer.pt.tmp"
        torch.save({"optimizer": opt_state, "scheduler": scheduler.state_dict()}, tmp)
        tmp.replace(out / STATE_DIR / "optimizer.pt")
        trainer = {"progress": dataclasses.asdict(progress), "step": progress.step, "rng": rngs,
                   "train_config": cfg.to_dict(), "world_size": ddp.world}
        tmp_json = out / STATE_DIR / "trainer.json.tmp"
        tmp_json.write_text(json.dumps(trainer, indent=1) + "\n")
        tmp_json.replace(out / STATE_DIR / "trainer.json")
    ddp.barrier()


def snapshot(out: Path, step: int) -> Path:
    """Pack the just-saved weights as an fp16 model directory ``OUT/snapshots/step-NNNNNNN``: the
    checkpoint ladder that evaluation uses (perplexity-vs-SSA over one run)."""
    from chatbot.modeldir import load_model

    loaded = load_model(out)
    return save_model(loaded.model, loaded.tokenizer, out / SNAPSHOT_DIR / f"step-{step:07d}", dtype=torch.float16)


def drop_events_after(path: Path, step: int) -> None:
    """A resumed run redoes the work after its checkpoint: forget the metrics logged for it."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def _with_state(raw_model: ChatModel, state: dict[str, Any]) -> ChatModel:
    copy = ChatModel(raw_model.config)
    copy.load_state_dict(state)
    return copy
