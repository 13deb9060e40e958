"""``chatbot compress``: pruning and int8 quantization of a model directory, written as a model directory.

Steps, in this order, each optional:

1. Pruning (``--prune F``), one of
   - unstructured: global magnitude pruning (``torch.nn.utils.prune.global_unstructured``, L1) of F of
     all dense and conv kernels of the encoder and decoder blocks (not the embedding, which is also the
     softmax).  Tensors keep their shapes; zeros save nothing on a CPU without sparse kernels.
   - structured (``--structured``): in every layer, F of the FFN units and F of the branched
     convolutions' mid channels go, the least important first (importance: the product of the norms of
     what feeds a unit and what it feeds).  Tensors really shrink; ``ModelConfig.ffn_widths`` and
     ``conv_widths`` record the new widths, so the smaller model is built directly on load.
2. Recovery (``--recover-steps N --data D``): N steps of the project's trainer (``chatbot.train.train``
   with ``initial_model``) on the pruned model; unstructured masks stay applied while it trains.
3. Quantization (``--quantize int8``): ``torch.ao.quantization.quantize_dynamic`` with per-channel
   int8 weights on every ``nn.Linear`` (activations are quantized on the fly, fbgemm/x86 kernels on
   CPU).  The file stores each quantized weight as int8 + per-channel scale and zero point, rebuilt into
   quantized modules on load (``load_int8_state``).  The embedding is stored as int8 with one scale per
   row; it is also the output projection, which runs as an int8 dynamic linear layer on those rows
   (``ChatModel.output_int8``), while the input lookup reads them dequantized to fp32.

The output's config.json says what was done: ``quantization`` (what loading must rebuild) and
``compression`` (the record: source, steps, parameter counts).  No pickle: safetensors only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.nn.utils import prune

from chatbot.model import ChatModel, EvolvedDecoderBlock, EvolvedEncoderBlock, FeedForward, SeparableConv1d

log = logging.getLogger(__name__)

INT8, SCALE, ZERO_POINT = ".int8", ".scale", ".zero_point"  # key suffixes of a quantized tensor in the file


class CompressError(ValueError):
    """Bad compress input; the message names the flag or the file."""


@contextmanager
def quiet_ao() -> Iterator[None]:
    """torch.ao.quantization warns that it is deprecated in favour of torchao (not installed here); the
    eager-mode API still works on this torch, and the warning would otherwise print on every load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.ao")
        yield


# ----------------------------------------------------------------------------------------- counting


def weight_count(model: ChatModel) -> int:
    """Parameters, counting a quantized linear layer's packed weight and bias like float ones."""
    return model.num_parameters()


def zero_fraction(model: ChatModel) -> float:
    """Share of exact zeros among the weights unstructured pruning targets."""
    total = zeros = 0
    for module, name in prunable_weights(model):
        w = getattr(module, name)
        total, zeros = total + w.numel(), zeros + int((w == 0).sum())
    return zeros / max(total, 1)


def is_quantized(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "quantization", None) is not None


# ----------------------------------------------------------------------------------------- unstructured


def prunable_weights(model: ChatModel) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every dense and conv kernel in the encoder and decoder blocks."""
    found = []
    for block in [*model.encoder, *model.decoder]:
        for module in block.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                found.append((module, "weight"))
            elif isinstance(module, SeparableConv1d):
                found.append((module, "depthwise"))
    return found


def prune_unstructured(model: ChatModel, fraction: float) -> list[tuple[nn.Module, str]]:
    """Zero ``fraction`` of the block kernels' weights with the smallest magnitudes, ranked across all of
    them.  The masks stay attached (training keeps pruned weights at zero) until ``make_permanent``."""
    targets = prunable_weights(model)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=fraction)
    return targets


def make_permanent(targets: list[tuple[nn.Module, str]]) -> None:
    for module, name in targets:
        prune.remove(module, name)


# ----------------------------------------------------------------------------------------- structured


def keep_top(scores: Tensor, fraction: float) -> Tensor:
    """Sorted indices of the ``1 - fraction`` highest scores, at least one."""
    keep = max(1, round(scores.numel() * (1.0 - fraction)))
    return torch.topk(scores, keep).indices.sort().values


def ffn_scores(ffn: FeedForward) -> Tensor:
    """A unit matters as much as what reaches it times what it writes: with the ET decoder's inner
    LayerNorm, what reaches the down projection is the norm's scale and shift, not the up row."""
    out = ffn.down.weight.norm(dim=0)
    if isinstance(ffn.norm, nn.LayerNorm):
        return out * (ffn.norm.weight.abs() + ffn.norm.bias.abs())
    return out * ffn.up.weight.norm(dim=1)


def conv_mid_scores(block: EvolvedEncoderBlock | EvolvedDecoderBlock) -> Tensor:
    """Mid channels feed LN_mid, then the output conv's depthwise taps and pointwise column."""
    norm, out = block.conv_mid_norm, block.conv_out
    return (norm.weight.abs() + norm.bias.abs()) * out.depthwise[:, 0].norm(dim=1) * out.pointwise.weight.norm(dim=0)


def prune_structured(model: ChatModel, fraction: float) -> ChatModel:
    """A new, smaller model without ``fraction`` of each layer's FFN units and (ET) conv mid channels."""
    cfg = model.config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    blocks = [(f"encoder.{i}.", b) for i, b in enumerate(model.encoder)] + \
             [(f"decoder.{i}.", b) for i, b in enumerate(model.decoder)]
    ffn_widths, conv_widths = [], []
    for prefix, block in blocks:
        keep = keep_top(ffn_scores(block.ffn), fraction)
        f = prefix + "ffn."
        for key in ("up.weight", "up.bias", "norm.weight", "norm.bias"):
            if f + key in state:
                state[f + key] = state[f + key][keep]
        state[f + "down.weight"] = state[f + "down.weight"][:, keep]
        ffn_widths.append(len(keep))
        if isinstance(block, (EvolvedEncoderBlock, EvolvedDecoderBlock)):
            conv_widths.append(slice_conv_mid(state, prefix, block, keep_top(conv_mid_scores(block), fraction)))
    new_cfg = dataclasses.replace(cfg, ffn_widths=tuple(ffn_widths),
                                  conv_widths=tuple(conv_widths) if conv_widths else None)
    smaller = ChatModel(new_cfg)
    smaller.load_state_dict(state)
    return smaller.train(model.training)


def slice_conv_mid(state: dict[str, Tensor], prefix: str, block: EvolvedEncoderBlock | EvolvedDecoderBlock,
                   keep: Tensor) -> tuple[int, int]:
    """Keep mid channels ``keep`` in ``state``; returns the new (mid, narrow).  The narrow branch adds
    into the first ``narrow`` mid channels, so the kept ones among those go first and the narrow
    branch keeps exactly them; LN_mid and the depthwise conv act per channel, so order is free."""
    narrow = block.conv_right.weight.shape[0] if isinstance(block, EvolvedEncoderBlock) else block.conv_right.pointwise.out_features
    shared, left_only = keep[keep < narrow], keep[keep >= narrow]
    if shared.numel() == 0:  # the narrow branch needs a channel: keep its best one in place of the worst
        best = conv_mid_scores(block)[:narrow].argmax().view(1)
        shared, left_only = best, left_only[1:] if left_only.numel() > 1 else left_only
    order = torch.cat([shared, left_only])
    p = prefix
    if isinstance(block, EvolvedEncoderBlock):
        left, right = p + "conv_left.", p + "conv_right."
    else:
        left, right = p + "conv_left.pointwise.", p + "conv_right.pointwise."
    for key in (left + "weight", left + "bias", p + "conv_mid_norm.weight", p + "conv_mid_norm.bias", p + "conv_out.depthwise"):
        state[key] = state[key][order]
    for key in (right + "weight", right + "bias"):
        state[key] = state[key][shared]
    state[p + "conv_out.pointwise.weight"] = state[p + "conv_out.pointwise.weight"][:, order]
    return len(order), len(shared)


# ----------------------------------------------------------------------------------------- int8


def qconfig_spec() -> dict:
    from torch.ao.quantization import per_channel_dynamic_qconfig

    return {nn.Linear: per_channel_dynamic_qconfig}


def quantize_int8(model: ChatModel) -> ChatModel:
    """Dynamic int8 quantization of every nn.Linear and of the output projection, in place (fbgemm/x86
    kernels on CPU).  The embedding becomes its int8 values (what the file keeps), so the model in
    memory computes exactly what it will after a save and load."""
    from torch.ao.quantization import quantize_dynamic

    model.eval()
    with quiet_ao():
        quantize_dynamic(model, qconfig_spec(), dtype=torch.qint8, inplace=True)
    values, scales = quantize_rows(model.embedding.weight.detach())
    with torch.no_grad():
        model.embedding.weight.copy_(values.float() * scales[:, None])
    model.output_int8 = int8_output_layer(values, scales)
    model.config = dataclasses.replace(model.config, quantization="int8")
    return model


def int8_output_layer(values: Tensor, scales: Tensor) -> nn.Module:
    """The output projection (hidden -> vocabulary logits) of an int8 model: the embedding's int8 rows,
    one scale per row, as a dynamically quantized linear layer.  In a decoding step it is the largest
    matmul (d x 8192) and, at a few rows, bound by reading its weight: int8 reads a quarter of fp32's
    bytes and runs in fbgemm's int8 kernel (about 0.3x the fp32 matmul at 20 rows, bench.profile_reply)."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    vocab, d = values.shape
    with quiet_ao():
        layer = QLinear(d, vocab, bias_=False, dtype=torch.qint8)
        weight = torch._make_per_channel_quantized_tensor(values, scales.double(), torch.zeros(vocab, dtype=torch.long), 0)
    layer.set_weight_bias(weight, None)
    return layer


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per row: (int8 values, float32 scales)."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.float()


def int8_state_dict(model: ChatModel, float_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The tensors of an int8 model for safetensors: quantized linear weights as int8 + per-channel
    scale and zero point, the embedding as int8 + per-row scale, everything else as float."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    state: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, QLinear) and module is not model.output_int8:  # that one is the embedding
            w, b = module._weight_bias()
            state[name + ".weight" + INT8] = w.int_repr()
            state[name + ".weight" + SCALE] = w.q_per_channel_scales()  # float64, as the quantizer keeps them
            state[name + ".weight" + ZERO_POINT] = w.q_per_channel_zero_points().to(torch.int32)
            if b is not None:
                state[name + ".bias"] = b.detach()
    if model.output_int8 is not None:  # the embedding's int8 rows as quantized: store exactly those
        weight = model.output_int8._weight_bias()[0]
        values, scales = weight.int_repr(), weight.q_per_channel_scales().float()
    else:
        values, scales = quantize_rows(model.embedding.weight.detach())
    state["embedding.weight" + INT8], state["embedding.weight" + SCALE] = values, scales
    for key, value in float_tensors(model).items():
        if key != "embedding.weight":
            state[key] = value.detach()
    return {k: (v.to(float_dtype) if float_dtype and v.is_floating_point() and not k.endswith(SCALE) else v).contiguous()
            for k, v in state.items()}


def load_int8_state(model: ChatModel, state: dict[str, Tensor], source: str) -> ChatModel:
    """Rebuild an int8 model saved by ``int8_state_dict`` into ``model``, a ChatModel of the same config,
    in place: its float linears are replaced by quantized ones (and freed).  ``model`` may also live on
    the meta device (its remaining float tensors are then allocated here).  Raises ValueError naming
    ``source`` when the file does not match the config."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    for parent in list(model.modules()):  # empty quantized linears in place of the float ones
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                with quiet_ao():
                    setattr(parent, name, QLinear(child.in_features, child.out_features, bias_=child.bias is not None,
                                                  dtype=torch.qint8))
    if any(t.is_meta for t in model.parameters()):
        model.to_empty(device="cpu")  # the remaining float tensors (norms, depthwise kernels, embedding)
    model.config = dataclasses.replace(model.config, quantization="int8")
    state = dict(state)
    try:
        for name, module in model.named_modules():
            if isinstance(module, QLinear):
                q, scale, zp = (state.pop(name + ".weight" + s) for s in (INT8, SCALE, ZERO_POINT))
                bias = state.pop(name + ".bias", None)
                if q.shape != (module.out_features, module.in_features):
                    raise ValueError(f"{source}: {name}: int8 weight {tuple(q.shape)}, config.json wants "
                                     f"{(module.out_features, module.in_features)}")
                with quiet_ao():
                    weight = torch._make_per_channel_quantized_tensor(q, scale.double(), zp.long(), 0)  # exact rebuild
                module.set_weight_bias(weight, None if bias is None else bias.float())
        q, scale = state.pop("embedding.weight" + INT8), state.pop("embedding.weight" + SCALE)
        state["embedding.weight"] = q.float() * scale.float()[:, None]
        model.output_int8 = int8_output_layer(q, scale.float())
    except KeyError as e:
        raise ValueError(f"{source}: config.json says int8 but the weights lack {e.args[0]}") from None
    targets = float_tensors(model)
    if set(state) != set(targets):
        extra, missing = sorted(set(state) - set(targets)), sorted(set(targets) - set(state))
        raise ValueError(f"{source}: weights do not match config.json (missing {missing[:5]}, unexpected {extra[:5]})")
    with torch.no_grad():
        for key, value in state.items():
            if value.shape != targets[key].shape:
                raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, config.json wants {tuple(targets[key].shape)}")
            targets[key].copy_(value)
    return model.eval()


def float_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by name: what an int8 model keeps in float besides its quantized linears
    (whose state_dict entries, packed weights and unused output scales, are not tensors to store)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


# ----------------------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class CompressConfig:
    model: str
    out: str
    prune: float | None = None
    structured: bool = False
    quantize: str | None = None  # "int8"
    recover_steps: int = 0
    data: str | None = None  # 'chitchat' or a JSONL corpus, for recovery
    recover_lr: float = 3e-4
    recover_batch_tokens: int = 4096
    valid_examples: int | None = 1000
    fp16: bool | None = None  # None: keep the source's float dtype
    seed: int = 1234
    progress: bool = True


def check_request(cfg: CompressConfig) -> None:
    """Flag errors that need no model."""
    if cfg.prune is not None and not (isinstance(cfg.prune, (int, float)) and math.isfinite(cfg.prune) and 0.0 <= cfg.prune < 1.0):
        raise CompressError(f"--prune must be a fraction in [0, 1), got {cfg.prune!r}")
    if cfg.structured and cfg.prune is None:
        raise CompressError("--structured needs --prune FRACTION")
    if cfg.quantize not in (None, "int8"):
        raise CompressError(f"--quantize supports only 'int8', got {cfg.quantize!r}")
    if cfg.recover_steps < 0:
        raise CompressError(f"--recover-steps must be >= 0, got {cfg.recover_steps}")
    if cfg.recover_steps and cfg.prune is None:
        raise CompressError("--recover-steps fine-tunes after pruning: give --prune too")
    if cfg.recover_steps and not cfg.data:
        raise CompressError("--recover-steps needs --data ('chitchat' or a JSONL corpus) to train on")
    if cfg.data and not cfg.recover_steps:
        raise CompressError("--data is only read by recovery: give --recover-steps N too")
    if cfg.data and cfg.data != "chitchat" and not Path(cfg.data).is_file():
        raise CompressError(f"--data {cfg.data!r}: no such file (use 'chitchat' or a JSONL corpus path)")
    if cfg.prune is None and cfg.quantize is None:
        raise CompressError("nothing to do: give --prune FRACTION and/or --quantize int8")
    if not Path(cfg.model).is_dir():
        raise CompressError(f"--model {cfg.model}: no such directory (a model directory holds config.json, "
                            "model.safetensors and tokenizer.json)")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise CompressError(f"--out {cfg.out} is a file; give a directory to write the compressed model into")
    if Path(cfg.out).resolve() == Path(cfg.model).resolve():
        raise CompressError(f"--out {cfg.out} is the --model directory; write the compressed model elsewhere")


def stored_float_dtype(weights: Path) -> torch.dtype:
    """The float dtype a weights file stores (fp16 for the shipped model), kept by default."""
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if f.get_slice(key).get_dtype() in ("F16", "BF16", "F32", "F64"):
                return f.get_tensor(key).dtype
    return torch.float32


def compress(cfg: CompressConfig) -> dict:
    """Run the requested steps; writes ``cfg.out`` and returns a summary (also in its config.json)."""
    from chatbot.modeldir import WEIGHTS, load_model, save_model

    check_request(cfg)
    loaded = load_model(cfg.model)
    model, source = loaded.model, loaded.directory
    if model.config.quantization and cfg.quantize:
        raise CompressError(f"--quantize: {source} is already {model.config.quantization}-quantized")
    if model.config.quantization and cfg.prune is not None:
        raise CompressError(f"--prune: {source} is {model.config.quantization}-quantized; prune its float model, "
                            "then quantize")
    before_bytes = (source / WEIGHTS).stat().st_size
    summary: dict = {"source": str(source), "parameters_before": weight_count(model), "steps": []}
    targets = None
    if cfg.prune is not None:
        if cfg.structured:
            model = prune_structured(model, cfg.prune)
        else:
            targets = prune_unstructured(model, cfg.prune)
        summary["steps"].append({"prune": "structured" if cfg.structured else "unstructured", "fraction": cfg.prune})
    if cfg.recover_steps:
        summary["steps"].append({"recover_steps": cfg.recover_steps, "data": cfg.data, "lr": cfg.recover_lr,
                                 "valid": recover(model, loaded.directory, cfg)})
    if targets is not None:
        make_permanent(targets)
        summary["zero_fraction"] = round(zero_fraction(model), 4)
    if cfg.quantize:
        quantize_int8(model)
        summary["steps"].append({"quantize": "int8", "scheme": "dynamic, per-channel int8 nn.Linear (torch.ao); "
                                                               "embedding int8 per row; the output projection "
                                                               "int8 (dynamic), the input lookup dequantized"})
    summary["parameters_after"] = weight_count(model)
    history = list((model.config.compression or {}).get("history", []))
    history.append(summary)
    model.config = dataclasses.replace(model.config, compression={"history": history})
    dtype = torch.float16 if cfg.fp16 else (torch.float32 if cfg.fp16 is False else stored_float_dtype(source / WEIGHTS))
    out = save_model(model.eval(), loaded.tokenizer, cfg.out, dtype=dtype)
    summary.update(out=str(out), bytes_before=before_bytes, bytes_after=(out / WEIGHTS).stat().st_size)
    return summary


def recover(model: ChatModel, model_dir: Path, cfg: CompressConfig) -> dict:
    """Fine-tune the pruned ``model`` in place with the project's trainer; returns its final validation."""
    from chatbot.modeldir import TOKENIZER
    from chatbot.train import TrainConfig, train

    with tempfile.TemporaryDirectory(prefix="chatbot-recover-") as tmp:
        tc = TrainConfig(out=tmp, data=cfg.data, tokenizer=str(model_dir / TOKENIZER), lr=cfg.recover_lr,
                         warmup_steps=min(50, cfg.recover_steps // 10), schedule="cosine", max_steps=cfg.recover_steps,
                         batch_tokens=cfg.recover_batch_tokens, eval_every=cfg.recover_steps,
                         save_every=cfg.recover_steps, valid_examples=cfg.valid_examples, seed=cfg.seed,
                         device="cpu", threads=torch.get_num_threads(), progress=cfg.progress)
        result = train(tc, initial_model=model)
    model.eval()
    return result


def add_compress(sub) -> None:
    p = sub.add_parser("compress", help="prune and/or int8-quantize a model directory",
                       description="Writes a compressed model directory that chat, serve and eval load like any "
                                   "other; its config.json records what was done.  Steps run in the order prune, "
                                   "recover, quantize.  Prints a JSON summary.")
    p.add_argument("--model", required=True, help="the model directory to compress")
    p.add_argument("--out", required=True, help="where to write the compressed model directory")
    p.add_argument("--prune", type=float, metavar="FRACTION",
                   help="prune this fraction in [0, 1): of all block weights (unstructured, global magnitude), "
                        "or with --structured of each layer's FFN units and conv channels")
    p.add_argument("--structured", action="store_true", help="remove whole FFN units and conv channels (smaller, faster)")
    p.add_argument("--quantize", choices=["int8"], help="dynamic int8 quantization of the linear layers (CPU)")
    p.add_argument("--recover-steps", type=int, default=0, metavar="N", help="fine-tune N steps after pruning")
    p.add_argument("--data", help="recovery data: 'chitchat' (bundled) or a JSONL corpus")
    p.add_argument("--recover-lr", type=float, default=3e-4, help="recovery peak learning rate (default: %(default)s)")
    p.add_argument("--recover-batch-tokens", type=int, default=4096)
    p.add_argument("--valid-examples", type=int, default=1000, help="recovery validates on this many examples")
    dtype = p.add_mutually_exclusive_group()
    dtype.add_argument("--fp16", action="store_true", default=None, help="store float tensors as fp16")
    dtype.add_argument("--fp32", dest="fp16", action="store_false", help="store float tensors as fp32")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_compress)


def run_compress(args) -> int:
    import json

    summary = compress(CompressConfig(
        model=args.model, out=args.out, prune=args.prune, structured=args.structured, quantize=args.quantize,
        recover_steps=args.recover_steps, data=args.data, recover_lr=args.recover_lr,
        recover_batch_tokens=args.recover_batch_tokens, valid_examples=args.valid_examples, fp16=args.fp16,
        progress=not args.no_progress))
    print(json.dumps(summary))
    return 0
