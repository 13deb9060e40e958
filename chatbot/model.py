"""The seq2seq chat model: an Evolved Transformer (So et al. 2019, as Meena used it) or a vanilla
pre-norm Transformer, chosen by ``ModelConfig.block_type``.

Shapes: B batch, S source length, T target length, d width, H heads, V vocabulary.
Every sub-layer is pre-norm: ``x = x + drop(F(LN(x)))``; LayerNorm eps is 1e-6 throughout.

Incremental decoding keeps, per decoder layer, the k/v of its causal self-attentions (grown each step),
the k/v of its encoder attentions (computed once), and for ET the sliding windows its causal
convolutions read (``DecoderState``), so one step costs O(1) conv work and equals the full pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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

    def self_attend(self, x: Tensor, cache: dict[str, Tensor] | None = None, name: str = "") -> Tensor:
        """Causal self-attention; with a cache, ``x`` holds the new positions and k/v are appended."""
        k, v = self.project_kv(x)
        if cache is None:
            return self.attend(x, k, v, causal=True)
        if name + "k" in cache:
            k = torch.cat([cache[name + "k"], k], dim=2)
            v = torch.cat([cache[name + "v"], v], dim=2)
        cache[name + "k"], cache[name + "v"] = k, v
        # One new query attends to every cached key; several new ones need the causal offset mask.
        mask = None
        if x.shape[1] > 1:
            T, S = x.shape[1], k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        return self.attend(x, k, v, mask=mask)


class FeedForward(nn.Module):
    """d -> 4d -> d.  ``inner_norm`` adds the ET decoder's LN_4d before the down projection."""

    def __init__(self, d: int, dropout: float, activation: str, inner_norm: bool = False):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.act = F.silu if activation == "swish" else F.relu
        self.norm = layer_norm(4 * d) if inner_norm else nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.norm(self.drop(self.act(self.up(x)))))


@dataclass
class EncoderOutput:
    states: Tensor  # (B, S, d), final-LN'd
    padding: Tensor  # (B, S) bool, True at padding

    @property
    def attention_mask(self) -> Tensor:  # (B, 1, 1, S) bool, True where attention is allowed
        return ~self.padding[:, None, None, :]


# ----------------------------------------------------------------------------------------- encoders


class EvolvedEncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.d = d
        self.drop = nn.Dropout(cfg.dropout)
        self.glu_norm = layer_norm(d)
        self.glu_value, self.glu_gate = nn.Linear(d, d), nn.Linear(d, d)
        self.conv_norm = layer_norm(d)
        self.conv_left = nn.Linear(d, 4 * d)
        self.conv_right = nn.Conv1d(d, d // 2, kernel_size=3, padding=1)
        self.conv_mid_norm = layer_norm(4 * d)
        self.conv_out = SeparableConv1d(4 * d, d // 2, kernel_size=9)
        self.attn_norm = layer_norm(d)
        self.attn = Attention(d, cfg.n_heads, cfg.attention_dropout)
        self.ffn_norm = layer_norm(d)
        self.ffn = FeedForward(d, cfg.dropout, "relu")

    def forward(self, x: Tensor, enc_padding: Tensor, attn_mask: Tensor) -> Tensor:
        pad = enc_padding[..., None]  # (B, S, 1)
        y = self.glu_norm(x)
        x = x + self.drop(self.glu_value(y) * torch.sigmoid(self.glu_gate(y)))

        y = self.conv_norm(x).masked_fill(pad, 0.0)
        left = self.drop(F.relu(self.conv_left(y)))  # (B, S, 4d)
        right = self.drop(F.relu(self.conv_right(y.transpose(1, 2)).transpose(1, 2)))  # (B, S, d/2)
        y = self.conv_mid_norm(left + pad_channels(right, 4 * self.d)).masked_fill(pad, 0.0)
        x = x + self.drop(pad_channels(self.conv_out.same(y), self.d))  # only the first d/2 channels change

        y = self.attn_norm(x)
        k, v = self.attn.project_kv(y)
        x = x + self.drop(self.attn.attend(y, k, v, mask=attn_mask))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class VanillaEncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.drop = nn.Dropout(cfg.dropout)
        self.attn_norm = layer_norm(d)
        self.attn = Attention(d, cfg.n_heads, cfg.attention_dropout)
        self.ffn_norm = layer_norm(d)
        self.ffn = FeedForward(d, cfg.dropout, "relu")

    def forward(self, x: Tensor, enc_padding: Tensor, attn_mask: Tensor) -> Tensor:
        y = self.attn_norm(x)
        k, v = self.attn.project_kv(y)
        x = x + self.drop(self.attn.attend(y, k, v, mask=attn_mask))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


# ----------------------------------------------------------------------------------------- decoders


class EvolvedDecoderBlock(nn.Module):
    """Five sub-layers; see docs/model.md.  ``cache`` (a dict) switches to incremental decoding."""

    LEFT_KERNEL, RIGHT_KERNEL, OUT_KERNEL = 11, 7, 7

    def __init__(self, cfg: ModelConfig, cross_attention: bool = True):
        super().__init__()
        d = cfg.d_model
        self.d, self.cross_attention = d, cross_attention
        self.drop = nn.Dropout(cfg.dropout)
        self.attn1_norm = layer_norm(d)
        self.wide_self_attn = Attention(d, cfg.self_attention_heads, cfg.attention_dropout)
        self.enc_attn1 = Attention(d, cfg.n_heads, cfg.attention_dropout) if cross_attention else None
        self.conv_norm = layer_norm(d)
        self.conv_left = SeparableConv1d(d, 2 * d, self.LEFT_KERNEL)
        self.conv_right = SeparableConv1d(d, d // 2, self.RIGHT_KERNEL)
        self.conv_mid_norm = layer_norm(2 * d)
        self.conv_out = SeparableConv1d(2 * d, d, self.OUT_KERNEL)
        self.attn3_norm = layer_norm(d)
        self.self_attn = Attention(d, cfg.n_heads, cfg.attention_dropout)
        if cross_attention:
            self.attn4_norm = layer_norm(d)
            self.enc_attn2 = Attention(d, cfg.n_heads, cfg.attention_dropout)
        self.ffn_norm = layer_norm(d)
        self.ffn = FeedForward(d, cfg.dropout, "swish", inner_norm=True)

    def encoder_kv(self, memory: Tensor) -> dict[str, Tensor]:
        k1, v1 = self.enc_attn1.project_kv(memory)
        k2, v2 = self.enc_attn2.project_kv(memory)
        return {"enc1k": k1, "enc1v": v1, "enc2k": k2, "enc2v": v2}

    def empty_windows(self, batch: int, like: Tensor) -> dict[str, Tensor]:
        """The conv windows before the first step: k-1 zero rows each (the causal left padding)."""
        zeros = like.new_zeros
        return {"win1": zeros(batch, self.LEFT_KERNEL - 1, self.d),
                "win2": zeros(batch, self.OUT_KERNEL - 1, 2 * self.d)}

    def forward(self, x: Tensor, enc: Tensor | dict[str, Tensor], enc_mask: Tensor,
                cache: dict[str, Tensor] | None = None) -> Tensor:
        """``enc``: encoder states (B, S, d), or their k/v already projected (incremental decoding)."""
        if isinstance(enc, Tensor):  # projected here so FSDP has this block's weights gathered
            enc = self.encoder_kv(enc)
        y = self.attn1_norm(x)
        h = self.drop(self.wide_self_attn.self_attend(y, cache, "wide"))
        if self.cross_attention:
            h = h + self.drop(self.enc_attn1.attend(y, enc["enc1k"], enc["enc1v"], mask=enc_mask))
        x = x + h

        y = self.conv_norm(x)  # (B, T, d)
        if cache is None:
            left = self.conv_left.causal(y)
            right = self.conv_right.causal(y)
        else:  # window = previous LEFT_KERNEL-1 rows + the new ones
            window = torch.cat([cache["win1"], y], dim=1)
            cache["win1"] = window[:, -(self.LEFT_KERNEL - 1):]
            left = self.conv_left(window)
            right = self.conv_right(window[:, self.LEFT_KERNEL - self.RIGHT_KERNEL:])
        y = self.conv_mid_norm(self.drop(F.relu(left)) + pad_channels(self.drop(right), 2 * self.d))  # (B, T, 2d)
        if cache is None:
            y = self.conv_out.causal(y)
        else:
            window = torch.cat([cache["win2"], y], dim=1)
            cache["win2"] = window[:, -(self.OUT_KERNEL - 1):]
            y = self.conv_out(window)
        x = x + self.drop(y)

        x = x + self.drop(self.self_attn.self_attend(self.attn3_norm(x), cache, "self"))
        if self.cross_attention:
            x = x + self.drop(self.enc_attn2.attend(self.attn4_norm(x), enc["enc2k"], enc["enc2v"], mask=enc_mask))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class VanillaDecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, cross_attention: bool = True):
        super().__init__()
        d = cfg.d_model
        self.cross_attention = cross_attention
        self.drop = nn.Dropout(cfg.dropout)
        self.self_norm = layer_norm(d)
        self.self_attn = Attention(d, cfg.n_heads, cfg.attention_dropout)
        if cross_attention:
            self.enc_norm = layer_norm(d)
            self.enc_attn = Attention(d, cfg.n_heads, cfg.attention_dropout)
        self.ffn_norm = layer_norm(d)
        self.ffn = FeedForward(d, cfg.dropout, "relu")

    def encoder_kv(self, memory: Tensor) -> dict[str, Tensor]:
        k, v = self.enc_attn.project_kv(memory)
        return {"enck": k, "encv": v}

    def empty_windows(self, batch: int, like: Tensor) -> dict[str, Tensor]:
        return {}

    def forward(self, x: Tensor, enc: Tensor | dict[str, Tensor], enc_mask: Tensor,
                cache: dict[str, Tensor] | None = None) -> Tensor:
        if isinstance(enc, Tensor):
            enc = self.encoder_kv(enc)
        x = x + self.drop(self.self_attn.self_attend(self.self_norm(x), cache, "self"))
        if self.cross_attention:
            x = x + self.drop(self.enc_attn.attend(self.enc_norm(x), enc["enck"], enc["encv"], mask=enc_mask))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


# ----------------------------------------------------------------------------------------- the model


@dataclass
class DecoderState:
    """Everything incremental decoding carries between steps; every tensor has the batch on dim 0."""

    layers: list[dict[str, Tensor]]  # per decoder layer: self-attn k/v, encoder k/v, conv windows
    enc_mask: Tensor  # (B, 1, 1, S)
    step: int = 0
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.enc_mask.shape[0]

    def select(self, rows: Tensor) -> None:
        """Keep (and reorder / repeat) batch rows: drop finished candidates, follow beams."""
        self.enc_mask = self.enc_mask.index_select(0, rows)
        for layer in self.layers:
            for name, t in layer.items():
                layer[name] = t.index_select(0, rows)
        self.extra = {k: t.index_select(0, rows) for k, t in self.extra.items()}


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
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(encoder_block(cfg) for _ in range(cfg.n_encoder_layers))
        self.encoder_norm = layer_norm(cfg.d_model)
        self.decoder = nn.ModuleList(decoder_block(cfg) for _ in range(cfg.n_decoder_layers))
        self.decoder_norm = layer_norm(cfg.d_model)
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
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding.weight.numel() if exclude_embedding else n

    # -- embedding

    def embed(self, ids: Tensor, offset: int = 0) -> Tensor:
        positions = torch.arange(offset, offset + ids.shape[1], device=ids.device)
        x = self.embedding(ids) * self.config.d_model ** 0.5 + sinusoidal_positions(positions, self.config.d_model)
        return self.drop(x)

    def logits(self, h: Tensor) -> Tensor:
        return h @ self.embedding.weight.t()  # (..., V), the shared embedding as softmax weights

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
        x = self.embed(tgt_in)
        mask = enc.attention_mask
        for block in self.decoder:
            x = block(x, enc.states, mask)
        return self.logits(self.decoder_norm(x))

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        return self.decode(tgt_in, self.encode(src))

    # -- incremental decoding

    def start_decoding(self, enc: EncoderOutput, repeats: int = 1) -> DecoderState:
        """Project encoder k/v once per context, then share them with ``repeats`` rows per context."""
        layers = []
        for block in self.decoder:
            kv = block.encoder_kv(enc.states)
            if repeats > 1:
                kv = {k: t.repeat_interleave(repeats, dim=0) for k, t in kv.items()}
            kv.update(block.empty_windows(enc.states.shape[0] * repeats, enc.states))
            layers.append(kv)
        mask = enc.attention_mask
        if repeats > 1:
            mask = mask.repeat_interleave(repeats, dim=0)
        return DecoderState(layers, mask)

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """Feed new tokens (B, t) (usually t = 1) at the state's position; returns logits (B, t, V)."""
        x = self.embed(tokens, offset=state.step)
        for block, cache in zip(self.decoder, state.layers):
            x = block(x, cache, state.enc_mask, cache=cache)
        state.step += tokens.shape[1]
        return self.logits(self.decoder_norm(x))


def sequence_nll(logits: Tensor, targets: Tensor, pad_id: int, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Summed token NLL over non-pad targets and the token count: (B, T, V), (B, T) -> (scalar, scalar)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad_id,
                           label_smoothing=label_smoothing, reduction="sum")
    return loss, targets.ne(pad_id).sum()
