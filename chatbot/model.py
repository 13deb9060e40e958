"""The seq2seq chat model: an Evolved Transformer (So et al. 2019, as Meena used it) or a vanilla
pre-norm Transformer, chosen by ``ModelConfig.block_type``.

Shapes: B batch, S source length, T target length, d width, H heads, V vocabulary.
Every sub-layer is pre-norm: ``x = x + drop(F(LN(x)))``; LayerNorm eps is 1e-6 throughout.

Incremental decoding (``start_decoding`` / ``decode_step``) keeps, per decoder layer (``LayerCache``),
the k/v of its causal self-attentions in preallocated buffers, the k/v of its encoder attentions
(projected once per *context*, never copied per row), and for ET the sliding windows its causal
convolutions read, so a step costs O(1) conv work and equals the full pass.  Rows decoding the same
context (sample-and-rank's N candidates, beam search's beams) share that context's encoder k/v:
their queries are laid out in a (context, row) grid (``RowGroups``) and attend with one batched
matmul per context.  A step with one new token per row avoids the general kernels whose fixed cost
dominates at this size (SDPA, oneDNN depthwise convolution) for plain matmuls and multiply-sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatbot.config import ModelConfig

LN_EPS = 1e-6


def layer_norm(width: int) -> nn.LayerNorm:
    return nn.LayerNorm(width, eps=LN_EPS)


def pad_channels(x: Tensor, width: int) -> Tensor:
    """Zero-pad the channel axis at its end up to ``width``: (..., c) -> (..., width)."""
    return F.pad(x, (0, width - x.shape[-1]))


def sinusoidal_positions(positions: Tensor, d: int) -> Tensor:
    """Sinusoidal position signal, sin half then cos half (tensor2tensor's timing signal): (T,) -> (T, d)."""
    half = d // 2
    increment = math.log(1.0e4) / max(half - 1, 1)
    inv_timescales = torch.exp(torch.arange(half, dtype=torch.float32, device=positions.device) * -increment)
    angles = positions.float()[:, None] * inv_timescales[None, :]  # (T, d/2)
    signal = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return pad_channels(signal, d)  # odd d gets one zero channel


class _MaskedScale(torch.autograd.Function):
    """y = x * keep * scale, saving only the 1-byte drop mask for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, drop: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.masked_fill(drop, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0.0).mul_(ctx.scale), None, None


def cheap_dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout whose mask costs a quarter of a random draw per element.

    On CPU, ``bernoulli_`` draws one float per element and was 17% of a training step.  Here each 64-bit
    draw from torch's generator (so seeding and RNG-state resume behave as usual) gives four 16-bit
    uniforms; an element is dropped with probability round(p * 65536) / 65536 (within 8e-6 of p), and the
    survivors are scaled by the exact inverse keep rate, so the expectation is unchanged."""
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)  # all 64 bits
    uniform16 = draws.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    dropped = round(p * 65536)
    drop = uniform16 < dropped - 32768
    return _MaskedScale.apply(x, drop, 65536 / (65536 - dropped))


class Dropout(nn.Module):
    """``nn.Dropout`` with the cheap mask on CPU (see ``cheap_dropout``); CUDA keeps its fused kernel."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        return cheap_dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SeparableConv1d(nn.Module):
    """Depthwise conv (no bias) then pointwise 1x1 conv (with bias), on (B, T, C) tensors.

    ``forward`` takes already padded input and returns the 'valid' outputs, so the caller decides
    between same padding (encoder), causal left padding (decoder) and a decoding window.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.depthwise = nn.Parameter(torch.empty(in_channels, 1, kernel_size))
        self.pointwise = nn.Linear(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = F.conv1d(x.transpose(1, 2), self.depthwise, groups=x.shape[-1])  # (B, C, T - k + 1)
        return self.pointwise(h.transpose(1, 2))

    def same(self, x: Tensor) -> Tensor:
        pad = (self.kernel_size - 1) // 2
        return self(F.pad(x, (0, 0, pad, self.kernel_size - 1 - pad)))

    def causal(self, x: Tensor) -> Tensor:
        return self(F.pad(x, (0, 0, self.kernel_size - 1, 0)))

    def last(self, window: Tensor) -> Tensor:
        """The output at the last position of ``window`` (B, >= k, C) -> (B, 1, out).  Equals
        ``self(window)[:, -1:]``; a multiply-sum is several times faster than a one-output conv."""
        taps = window[:, -self.kernel_size:] * self.depthwise[:, 0].t()  # (B, k, C)
        return self.pointwise(taps.sum(1, keepdim=True))


class Attention(nn.Module):
    """Multi-head attention without biases; heads are contiguous channel blocks, q scaled by (d/H)^-0.5."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def split(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        return x.view(B, T, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, d/H)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.k(memory)), self.split(self.v(memory))

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        q = self.split(self.q(x))
        p = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        B, H, T, dh = h.shape
        return self.out(h.transpose(1, 2).reshape(B, T, H * dh))

    def self_attend(self, x: Tensor, step: StepInput | None = None, name: str = "") -> Tensor:
        """Causal self-attention; in a decoding step ``x`` holds the new positions, whose k/v are written
        into the layer's buffers at the step's position, and the queries read every filled position."""
        k, v = self.project_kv(x)
        if step is None:
            return self.attend(x, k, v, causal=True)
        past, start = step.cache.past, step.position
        end = start + x.shape[1]
        if past[name + "k"].shape[2] < end:  # beyond the capacity start_decoding was given: grow
            for key in (name + "k", name + "v"):
                buf = past[key]
                grown = buf.new_empty(buf.shape[:2] + (max(2 * buf.shape[2], end),) + buf.shape[3:])
                grown[:, :, :start] = buf[:, :, :start]
                past[key] = grown
        past[name + "k"][:, :, start:end] = k
        past[name + "v"][:, :, start:end] = v
        k, v = past[name + "k"][:, :, :end], past[name + "v"][:, :, :end]
        if x.shape[1] == 1:  # one query sees every filled position: no mask
            return self.attend_one(x, k, v)
        T, S = x.shape[1], end  # several new queries need the causal offset mask
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        return self.attend(x, k, v, mask=mask)

    def attend_one(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One query per row, (B, 1, d), against (B, H, S, d/H): two batched matmuls beat SDPA's setup."""
        q = self.split(self.q(x))  # (B, H, 1, d/H)
        weights = (torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
        h = torch.matmul(F.dropout(weights, self.dropout, self.training), v)  # (B, H, 1, d/H)
        return self.out(h.transpose(1, 2).reshape(x.shape))

    def attend_grouped(self, x: Tensor, k: Tensor, v: Tensor, rows: RowGroups) -> Tensor:
        """Cross-attention in a decoding step: row r of ``x`` (R, t, d) reads the k/v (C, H, S, d/H) of
        its context.  Queries go into a (C, n) grid so each context's rows attend in one matmul."""
        R, t, d = x.shape
        q = rows.to_grid(self.q(x).view(R, t, self.heads, d // self.heads))  # (C, n, t, H, dh)
        C, n = q.shape[:2]
        q = q.view(C, n * t, self.heads, -1).transpose(1, 2)  # (C, H, n*t, dh)
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (C, H, n*t, S)
        weights = F.dropout(scores.masked_fill(~rows.mask, float("-inf")).softmax(-1), self.dropout, self.training)
        h = torch.matmul(weights, v).transpose(1, 2).reshape(C, n, t, d)
        return self.out(rows.from_grid(h))


class FeedForward(nn.Module):
    """d -> width -> d (width 4d unless pruned).  ``inner_norm`` adds the ET decoder's LN_4d before the
    down projection."""

    def __init__(self, d: int, dropout: float, activation: str, inner_norm: bool = False, width: int | None = None):
        super().__init__()
        width = width or 4 * d
        self.up, self.down = nn.Linear(d, width), nn.Linear(width, d)
        self.act = F.silu if activation == "swish" else F.relu
        self.norm = layer_norm(width) if inner_norm else nn.Identity()
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.norm(self.drop(self.act(self.up(x)))))


@dataclass
class EncoderOutput:
    states: Tensor  # (B, S, d), final-LN'd
    padding: Tensor  # (B, S) bool, True at padding

    @property
    def attention_mask(self) -> Tensor:  # (B, 1, 1, S) bool, True where attention is allowed
        return ~self.padding[:, None, None, :]


# ----------------------------------------------------------------------------------------- decoding state


@dataclass
class RowGroups:
    """Which context each decoding row reads, laid out for grouped cross-attention.

    Rows are scattered into a grid of C contexts x ``width`` slots (``width``: the most rows any
    context has); slot ``c * width + i`` holds context c's i-th row.  When the rows already are the
    full grid in order (every context has ``width`` rows, context-major), ``slot`` is None and the
    layout is a free reshape.  Unused slots attend to their context like any row and are discarded.
    """

    mask: Tensor  # (C, 1, 1, S) bool, True where attention is allowed
    row_context: Tensor  # (R,) the context of each row, in 0..C-1
    width: int
    slot: Tensor | None  # (R,) each row's slot in the grid, or None for the identity layout

    @classmethod
    def build(cls, mask: Tensor, row_context: Tensor) -> "RowGroups":
        C, R = mask.shape[0], row_context.shape[0]
        counts = torch.bincount(row_context, minlength=C)
        width = int(counts.max())
        order = torch.argsort(row_context, stable=True)
        first = counts.cumsum(0) - counts  # first sorted position of each context
        rank = torch.empty_like(row_context)
        rank[order] = torch.arange(R, device=row_context.device) - first[row_context[order]]
        slot = row_context * width + rank
        identity = R == C * width and bool(slot.eq(torch.arange(R, device=slot.device)).all())
        return cls(mask, row_context, width, None if identity else slot)

    def to_grid(self, x: Tensor) -> Tensor:
        """(R, ...) -> (C, width, ...)"""
        C = self.mask.shape[0]
        if self.slot is None:
            return x.view(C, self.width, *x.shape[1:])
        grid = x.new_zeros((C * self.width, *x.shape[1:]))
        return grid.index_copy_(0, self.slot, x).view(C, self.width, *x.shape[1:])

    def from_grid(self, grid: Tensor) -> Tensor:
        """(C, width, ...) -> (R, ...)"""
        flat = grid.reshape(-1, *grid.shape[2:])
        return flat if self.slot is None else flat.index_select(0, self.slot)


@dataclass
class LayerCache:
    """One decoder layer's incremental-decoding state."""

    memory: dict[str, Tensor]  # encoder-attention k/v, one row per *context*: (C, H, S, d/H)
    past: dict[str, Tensor]  # self-attention k/v buffers (R, H, capacity, d/H); positions < step are filled
    windows: dict[str, Tensor]  # the conv windows: the last k-1 inputs of each causal conv, (R, k-1, c)


@dataclass
class StepInput:
    """What a decoder block needs for one incremental step besides its input."""

    cache: LayerCache
    position: int  # of the first new token
    rows: RowGroups


@dataclass
class DecoderState:
    """Everything incremental decoding carries between steps (rows on dim 0, contexts on dim 0 of
    ``LayerCache.memory`` and ``rows.mask``)."""

    layers: list[LayerCache]
    rows: RowGroups
    step: int = 0
    # The last step's final decoder states (R, t, d), the output projection's input (kNN-LM keys).
    hidden: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.rows.row_context.shape[0]

    def select(self, rows: Tensor) -> None:
        """Keep (and reorder / repeat) rows: drop finished candidates, follow beams.  Contexts left
        without rows leave too; the shared encoder k/v are never copied per row."""
        row_context = self.rows.row_context.index_select(0, rows)
        mask = self.rows.mask
        kept = torch.unique(row_context)  # sorted
        if kept.shape[0] < mask.shape[0]:
            renumber = torch.full((mask.shape[0],), -1, dtype=torch.long, device=rows.device)
            renumber[kept] = torch.arange(kept.shape[0], device=rows.device)
            row_context, mask = renumber[row_context], mask.index_select(0, kept)
            for layer in self.layers:
                layer.memory = {k: t.index_select(0, kept) for k, t in layer.memory.items()}
        self.rows = RowGroups.build(mask, row_context)
        for layer in self.layers:
            layer.windows = {k: t.index_select(0, rows) for k, t in layer.windows.items()}
            for name, buf in layer.past.items():  # copy only the filled positions
                new = buf.new_empty((rows.shape[0], *buf.shape[1:]))
                new[:, :, :self.step] = buf[:, :, :self.step].index_select(0, rows)
                layer.past[name] = new


# ----------------------------------------------------------------------------------------- encoders


class EvolvedEncoderBlock(nn.Module):
    """``layer`` picks this block's inner widths from the config (they differ only after pruning)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        d = cfg.d_model
        self.d = d
        self.mid, narrow = cfg.conv_width(layer)  # (4d, d/2) unpruned
        self.drop = Dropout(cfg.dropout)
        self.glu_norm = layer_norm(d)
        self.glu_value, self.glu_gate = nn.Linear(d, d), nn.Linear(d, d)
        self.conv_norm = layer_norm(d)
        self.conv_left = nn.Linear(d, self.mid)
        self.conv_right = nn.Conv1d(d, narrow, kernel_size=3, padding=1)
        self.conv_mid_norm = layer_norm(self.mid)
        self.conv_out = SeparableConv1d(self.mid, d // 2, kernel_size=9)
        self.attn_norm = layer_norm(d)
        self.attn = Attention(d, cfg.n_heads, cfg.attention_dropout)
        self.ffn_norm = layer_norm(d)
        self.ffn = FeedForward(d, cfg.dropout, "relu", width=cfg.ffn_width(layer))

    def forward(self, x: Tensor, enc_padding: Tensor, attn_mask: Tensor) -> Tensor:
        pad = enc_padding[..., None]  # (B, S, 1)
        y = self.glu_norm(x)
        x = x + self.drop(self.glu_value(y) * torch.sigmoid(self.glu_gate(y)))

        y = self.conv_norm(x).masked_fill(pad, 0.0)
        left = self.drop(F.relu(self.conv_left(y)))  # (B, S, 4d)
        right = self.drop(F.relu(self.conv_right(y.transpose(1, 2)).transpose(1, 2)))  # (B, S, d/2)
        y = self.conv_mid_norm(left + pad_channels(right, self.mid)).masked_fill(pad, 0.0)
        x = x + self.drop(pad_channels(self.conv_out.same(y), self.d))  # only the first d/2 channels change

        y = self.attn_norm(x)
        k, v = self.attn.project_kv(y)
        x = x + self.drop(self.attn.attend(y, k, v, mask=attn_mask))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class VanillaEncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        d = cfg.d_model
        self.drop = Dropout(cfg.dropout)
        self.attn_norm = layer_norm(d)
        self.attn = Attention(d, cfg.n_heads, cfg.attention_dropout)
        self.ffn_norm = layer_norm(d)
        self.ffn = FeedForward(d, cfg.dropout, "relu", width=cfg.ffn_width(layer))

    def forward(self, x: Tensor, enc_padding: Tensor, attn_mask: Tensor) -> Tensor:
        y = self.attn_norm(x)
        k, v = self.attn.project_kv(y)
        x = x + self.drop(self.attn.attend(y, k, v, mask=attn_mask))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


# ----------------------------------------------------------------------------------------- decoders


class EvolvedDecoderBlock(nn.Module):
    """Five sub-layers; see docs/model.md.  ``cache`` (a dict) switches to incremental decoding."""

    LEFT_KERNEL, RIGHT_KERNEL, OUT_KERNEL = 11, 7, 7

    def __init__(self, cfg: ModelConfig, cross_attention: bool = True, layer: int | None = None):
        super().__init__()
        d = cfg.d_model
        layer = cfg.n_encoder_layers if layer is None else layer  # index over encoder, then decoder layers
        self.d, self.cross_attention = d, cross_attention
        self.mid, narrow = cfg.conv_width(layer)  # (2d, d/2) unpruned
        self.drop = Dropout(cfg.dropout)
        self.attn1_norm = layer_norm(d)
        self.wide_self_attn = Attention(d, cfg.self_attention_heads, cfg.attention_dropout)
        self.enc_attn1 = Attention(d, cfg.n_heads, cfg.attention_dropout) if cross_attention else None
        self.conv_norm = layer_norm(d)
        self.conv_left = SeparableConv1d(d, self.mid, self.LEFT_KERNEL)
        self.conv_right = SeparableConv1d(d, narrow, self.RIGHT_KERNEL)
        self.conv_mid_norm = layer_norm(self.mid)
        self.conv_out = SeparableConv1d(self.mid, d, self.OUT_KERNEL)
        self.attn3_norm = layer_norm(d)
        self.self_attn = Attention(d, cfg.n_heads, cfg.attention_dropout)
        if cross_attention:
            self.attn4_norm = layer_norm(d)
            self.enc_attn2 = Attention(d, cfg.n_heads, cfg.attention_dropout)
        self.ffn_norm = layer_norm(d)
        self.ffn = FeedForward(d, cfg.dropout, "swish", inner_norm=True, width=cfg.ffn_width(layer))

    def encoder_kv(self, memory: Tensor) -> dict[str, Tensor]:
        k1, v1 = self.enc_attn1.project_kv(memory)
        k2, v2 = self.enc_attn2.project_kv(memory)
        return {"enc1k": k1, "enc1v": v1, "enc2k": k2, "enc2v": v2}

    def new_cache(self, memory: Tensor, rows: int, capacity: int) -> LayerCache:
        """The state before the first step; the conv windows start as the causal left padding (zeros)."""
        return LayerCache(memory=self.encoder_kv(memory) if self.cross_attention else {},
                          past={**empty_past(self.wide_self_attn, "wide", rows, capacity, memory),
                                **empty_past(self.self_attn, "self", rows, capacity, memory)},
                          windows={"win1": memory.new_zeros(rows, self.LEFT_KERNEL - 1, self.d),
                                   "win2": memory.new_zeros(rows, self.OUT_KERNEL - 1, self.mid)})

    def forward(self, x: Tensor, enc: Tensor | None, enc_mask: Tensor | None, step: StepInput | None = None) -> Tensor:
        """A full (teacher-forced) pass over ``x`` (B, T, d) reading encoder states ``enc`` (B, S, d), or,
        with ``step``, the next positions of incremental decoding (``enc`` and ``enc_mask`` unused)."""
        # Projected here, not by the caller, so FSDP has this block's weights gathered.
        kv = self.encoder_kv(enc) if step is None and self.cross_attention else None
        y = self.attn1_norm(x)
        h = self.drop(self.wide_self_attn.self_attend(y, step, "wide"))
        if self.cross_attention:
            h = h + self.drop(cross_attend(self.enc_attn1, y, "enc1", kv, enc_mask, step))
        x = x + h

        y = self.conv_norm(x)  # (B, T, d)
        if step is None:
            left = self.conv_left.causal(y)
            right = self.conv_right.causal(y)
        else:  # window = previous LEFT_KERNEL-1 rows + the new ones
            windows = step.cache.windows
            window = torch.cat([windows["win1"], y], dim=1)
            windows["win1"] = window[:, -(self.LEFT_KERNEL - 1):]
            left, right = (conv.last(window) if y.shape[1] == 1 else conv(window[:, self.LEFT_KERNEL - conv.kernel_size:])
                           for conv in (self.conv_left, self.conv_right))
        y = self.conv_mid_norm(self.drop(F.relu(left)) + pad_channels(self.drop(right), self.mid))  # (B, T, 2d)
        if step is None:
            y = self.conv_out.causal(y)
        else:
            window = torch.cat([step.cache.windows["win2"], y], dim=1)
            step.cache.windows["win2"] = window[:, -(self.OUT_KERNEL - 1):]
            y = self.conv_out.last(window) if y.shape[1] == 1 else self.conv_out(window)
        x = x + self.drop(y)

        x = x + self.drop(self.self_attn.self_attend(self.attn3_norm(x), step, "self"))
        if self.cross_attention:
            x = x + self.drop(cross_attend(self.enc_attn2, self.attn4_norm(x), "enc2", kv, enc_mask, step))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class VanillaDecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, cross_attention: bool = True, layer: int | None = None):
        super().__init__()
        d = cfg.d_model
        layer = cfg.n_encoder_layers if layer is None else layer
        self.cross_attention = cross_attention
        self.drop = Dropout(cfg.dropout)
        self.self_norm = layer_norm(d)
        self.self_attn = Attention(d, cfg.n_heads, cfg.attention_dropout)
        if cross_attention:
            self.enc_norm = layer_norm(d)
            self.enc_attn = Attention(d, cfg.n_heads, cfg.attention_dropout)
        self.ffn_norm = layer_norm(d)
        self.ffn = FeedForward(d, cfg.dropout, "relu", width=cfg.ffn_width(layer))

    def encoder_kv(self, memory: Tensor) -> dict[str, Tensor]:
        k, v = self.enc_attn.project_kv(memory)
        return {"enck": k, "encv": v}

    def new_cache(self, memory: Tensor, rows: int, capacity: int) -> LayerCache:
        return LayerCache(memory=self.encoder_kv(memory) if self.cross_attention else {},
                          past=empty_past(self.self_attn, "self", rows, capacity, memory), windows={})

    def forward(self, x: Tensor, enc: Tensor | None, enc_mask: Tensor | None, step: StepInput | None = None) -> Tensor:
        kv = self.encoder_kv(enc) if step is None and self.cross_attention else None
        x = x + self.drop(self.self_attn.self_attend(self.self_norm(x), step, "self"))
        if self.cross_attention:
            x = x + self.drop(cross_attend(self.enc_attn, self.enc_norm(x), "enc", kv, enc_mask, step))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


def empty_past(attn: Attention, name: str, rows: int, capacity: int, like: Tensor) -> dict[str, Tensor]:
    """Unfilled self-attention k/v buffers for ``capacity`` positions."""
    shape = (rows, attn.heads, capacity, like.shape[-1] // attn.heads)
    return {name + "k": like.new_empty(shape), name + "v": like.new_empty(shape)}


def cross_attend(attn: Attention, y: Tensor, name: str, kv: dict[str, Tensor] | None, enc_mask: Tensor | None,
                 step: StepInput | None) -> Tensor:
    """Encoder attention: full pass (one encoder row per row) or a decoding step (rows share contexts)."""
    if step is None:
        return attn.attend(y, kv[name + "k"], kv[name + "v"], mask=enc_mask)
    memory = step.cache.memory
    return attn.attend_grouped(y, memory[name + "k"], memory[name + "v"], step.rows)


# ----------------------------------------------------------------------------------------- the model


class ChatModel(nn.Module):
    """Encoder-decoder with shared input/output embeddings and sinusoidal positions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        encoder_block, decoder_block = {
            "evolved": (EvolvedEncoderBlock, EvolvedDecoderBlock),
            "vanilla": (VanillaEncoderBlock, VanillaDecoderBlock),
        }[cfg.block_type]
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(encoder_block(cfg, layer=i) for i in range(cfg.n_encoder_layers))
        self.encoder_norm = layer_norm(cfg.d_model)
        self.decoder = nn.ModuleList(decoder_block(cfg, layer=cfg.n_encoder_layers + i) for i in range(cfg.n_decoder_layers))
        self.decoder_norm = layer_norm(cfg.d_model)
        self._position_table: Tensor | None = None
        self._output_weight: tuple[tuple, Tensor] | None = None  # see step_logits()
        # An int8 model's output projection (chatbot.compress): the embedding's int8 rows as a dynamically
        # quantized linear layer.  None for float models.
        self.output_int8: nn.Module | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding.weight, std=self.config.d_model ** -0.5)
        for name, p in self.named_parameters():
            if name == "embedding.weight" or "norm" in name.split(".")[-2]:
                continue
            if p.dim() > 1:  # dense and conv kernels: Glorot uniform, as tensor2tensor
                nn.init.xavier_uniform_(p)
            else:
                nn.init.zeros_(p)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        """Weights of the model, float or int8: an int8 linear layer keeps its weight packed, not as a
        parameter, and counts like the float layer it replaced; the int8 output projection is the
        embedding again and does not count twice."""
        from torch.ao.nn.quantized import Linear as QuantizedLinear  # loaded with torch; dynamic Linear's base

        n = sum(p.numel() for p in self.parameters())
        for module in self.modules():
            if isinstance(module, QuantizedLinear) and module is not self.output_int8:
                weight, bias = module._weight_bias()
                n += weight.numel() + (bias.numel() if bias is not None else 0)
        return n - self.embedding.weight.numel() if exclude_embedding else n

    # -- embedding

    def embed(self, ids: Tensor, offset: int = 0) -> Tensor:
        x = self.embedding(ids) * self.config.d_model ** 0.5 + self.positions(offset, ids.shape[1], ids.device)
        return self.drop(x)

    def positions(self, offset: int, length: int, device: torch.device) -> Tensor:
        """Rows offset..offset+length-1 of the position signal, from a table computed once (not a
        buffer: it is not a weight, and a meta-device model would leave it unset)."""
        end = offset + length
        table = self._position_table
        if table is None or table.shape[0] < end or table.device != device:
            size = max(end, self.config.max_source_len, self.config.max_target_len)
            table = sinusoidal_positions(torch.arange(size, device=device), self.config.d_model)
            self._position_table = table
        return table[offset:end]

    def logits(self, h: Tensor) -> Tensor:
        if self.output_int8 is not None:  # int8: a quarter of the bytes to read, the step's largest matmul
            return self.output_int8(h)
        return h @ self.embedding.weight.t()  # (..., V), the shared embedding as softmax weights

    def step_logits(self, h: Tensor) -> Tensor:
        """``logits`` for incremental decoding: without autograd, multiplies a contiguous (d, V) copy of
        the embedding instead of its transposed view, several times faster for a single row on CPU.  The
        copy is remade whenever the weight changes (its version counter moves).  Full passes (training,
        perplexity, FSDP) never use it."""
        weight = self.embedding.weight
        if torch.is_grad_enabled() or weight.is_inference() or self.output_int8 is not None:  # an inference tensor has no version to watch
            return self.logits(h)
        key = (id(weight), weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._output_weight is None or self._output_weight[0] != key:
            self._output_weight = (key, weight.detach().t().contiguous())
        return h @ self._output_weight[1]

    # -- full passes

    def encode(self, src: Tensor) -> EncoderOutput:
        """src (B, S) token ids, right-padded with pad_id."""
        padding = src.eq(self.config.pad_id)
        mask = ~padding[:, None, None, :]
        x = self.embed(src)
        for block in self.encoder:
            x = block(x, padding, mask)
        return EncoderOutput(self.encoder_norm(x), padding)

    def decode(self, tgt_in: Tensor, enc: EncoderOutput) -> Tensor:
        """Teacher-forced decoder pass: tgt_in (B, T) starting with bos -> logits (B, T, V)."""
        return self.logits(self.decode_hidden(tgt_in, enc))

    def decode_hidden(self, tgt_in: Tensor, enc: EncoderOutput) -> Tensor:
        """The decoder's final states (B, T, d), the ones the output projection reads (kNN-LM keys)."""
        x = self.embed(tgt_in)
        mask = enc.attention_mask
        for block in self.decoder:
            x = block(x, enc.states, mask)
        return self.decoder_norm(x)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        return self.decode(tgt_in, self.encode(src))

    # -- incremental decoding

    def start_decoding(self, enc: EncoderOutput, repeats: int = 1, max_new_tokens: int | None = None) -> DecoderState:
        """Project encoder k/v once per context; ``repeats`` rows per context (context-major) share them.
        ``max_new_tokens`` sizes the self-attention buffers (default: the model's target length); a
        longer decode still works, by growing them."""
        C = enc.states.shape[0]
        capacity = max_new_tokens or self.config.max_target_len
        rows = RowGroups.build(enc.attention_mask, torch.arange(C, device=enc.states.device).repeat_interleave(repeats))
        layers = [block.new_cache(enc.states, C * repeats, capacity) for block in self.decoder]
        return DecoderState(layers, rows)

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """Feed new tokens (R, t) (usually t = 1) at the state's position; returns logits (R, t, V) and
        leaves the final decoder states in ``state.hidden``."""
        x = self.embed(tokens, offset=state.step)
        for block, cache in zip(self.decoder, state.layers):
            x = block(x, None, None, StepInput(cache, state.step, state.rows))
        state.step += tokens.shape[1]
        state.hidden = self.decoder_norm(x)
        return self.step_logits(state.hidden)


def sequence_nll(logits: Tensor, targets: Tensor, pad_id: int, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Summed token NLL over non-pad targets and the token count: (B, T, V), (B, T) -> (scalar, scalar)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad_id,
                           label_smoothing=label_smoothing, reduction="sum")
    return loss, targets.ne(pad_id).sum()
