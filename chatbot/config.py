"""Model configuration and named presets.

A config is a frozen dataclass: derive variants with ``dataclasses.replace`` and every variant is
validated in ``__post_init__``.  ``config.json`` in a model directory is ``ModelConfig.to_dict()``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

BlockType = Literal["evolved", "vanilla"]
Direction = Literal["forward", "backward"]


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_heads: int = 4
    n_encoder_layers: int = 1
    n_decoder_layers: int = 4
    block_type: BlockType = "evolved"
    dropout: float = 0.1  # residual and inner dropout
    attention_dropout: float = 0.1
    max_source_len: int = 128
    max_target_len: int = 128
    pad_id: int = 0
    bos_id: int = 1
    eot_id: int = 2
    # Knowledge passages the model was trained to read after its context (chatbot.model_input); 0: none,
    # so an engine with a retriever only reports the passages it found as sources.
    knowledge_passages: int = 0
    model_type: str = "evolved_transformer_chat"  # marker in config.json
    # What the model predicts: forward p(reply | context), a chat model; backward p(last context turn |
    # reply), a scorer for maximum-mutual-information reranking (chatbot/ranking.py), never a chat model.
    direction: Direction = "forward"
    # Written by structured pruning (chatbot.compress); None means the architecture's own widths.
    # One entry per layer, encoder layers first, then decoder layers.
    ffn_widths: tuple[int, ...] | None = None  # inner FFN units (default 4d)
    conv_widths: tuple[tuple[int, int], ...] | None = None  # ET only: (mid, narrow) channels of the branched convs
    quantization: str | None = None  # "int8": linear layers are dynamically quantized (see chatbot.compress)
    compression: dict[str, Any] | None = None  # provenance: what chatbot compress did, for people reading config.json

    def __post_init__(self) -> None:
        # JSON gives lists; a frozen config keeps tuples.
        if self.ffn_widths is not None:
            object.__setattr__(self, "ffn_widths", tuple(int(w) for w in self.ffn_widths))
        if self.conv_widths is not None:
            object.__setattr__(self, "conv_widths", tuple((int(m), int(n)) for m, n in self.conv_widths))
        self._check_widths()
        if self.model_type != "evolved_transformer_chat":
            raise ConfigError(f"model_type is {self.model_type!r}: not a model of this project "
                              "(evolved_transformer_chat)")
        if self.quantization not in (None, "int8"):
            raise ConfigError(f"quantization must be null or 'int8', got {self.quantization!r}")
        if self.compression is not None and not isinstance(self.compression, dict):
            raise ConfigError("compression must be an object (or null)")
        if self.block_type not in ("evolved", "vanilla"):
            raise ConfigError(f"block_type must be 'evolved' or 'vanilla', got {self.block_type!r}")
        if self.d_model <= 0 or self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be a positive multiple of n_heads ({self.n_heads})")
        if self.block_type == "evolved":
            if self.d_model % 2:
                raise ConfigError("the Evolved Transformer needs an even d_model (its convs write d/2 channels)")
            if self.d_model % self.self_attention_heads:
                raise ConfigError(
                    f"d_model ({self.d_model}) must divide by the decoder's wide self-attention heads "
                    f"({self.self_attention_heads})"
                )
        if self.n_encoder_layers < 0 or self.n_decoder_layers < 1:
            raise ConfigError("need n_encoder_layers >= 0 and n_decoder_layers >= 1")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.attention_dropout < 1.0):
            raise ConfigError("dropout rates must be in [0, 1)")
        if self.vocab_size <= max(self.pad_id, self.bos_id, self.eot_id):
            raise ConfigError(f"vocab_size {self.vocab_size} is smaller than the special token ids")
        if self.knowledge_passages < 0:
            raise ConfigError("knowledge_passages must be >= 0")
        if self.direction not in ("forward", "backward"):
            raise ConfigError(f"direction must be 'forward' or 'backward', got {self.direction!r}")
        if self.max_source_len < 1 or self.max_target_len < 2:
            raise ConfigError("max_source_len must be >= 1 and max_target_len >= 2")

    def _check_widths(self) -> None:
        layers = self.n_encoder_layers + self.n_decoder_layers
        if self.ffn_widths is not None:
            if len(self.ffn_widths) != layers or min(self.ffn_widths, default=1) < 1:
                raise ConfigError(f"ffn_widths needs {layers} positive entries (encoder layers, then decoder "
                                  f"layers), got {list(self.ffn_widths)}")
        if self.conv_widths is not None:
            if self.block_type != "evolved":
                raise ConfigError("conv_widths applies to the Evolved Transformer only")
            if len(self.conv_widths) != layers:
                raise ConfigError(f"conv_widths needs {layers} (mid, narrow) entries, got {len(self.conv_widths)}")
            for i, (mid, narrow) in enumerate(self.conv_widths):
                if not 1 <= narrow <= min(mid, self.d_model // 2):
                    raise ConfigError(f"conv_widths[{i}] = ({mid}, {narrow}): need "
                                      f"1 <= narrow <= min(mid, d_model/2)")

    def ffn_width(self, layer: int) -> int:
        """Inner FFN width of ``layer`` (encoder layers first, then decoder layers)."""
        return self.ffn_widths[layer] if self.ffn_widths is not None else 4 * self.d_model

    def conv_width(self, layer: int) -> tuple[int, int]:
        """(mid, narrow) channels of an ET layer's branched convs: the summed width and the narrow
        branch's, which adds into the first ``narrow`` mid channels.  Unpruned: (4d, d/2) in the
        encoder, (2d, d/2) in the decoder."""
        if self.conv_widths is not None:
            return self.conv_widths[layer]
        encoder = layer < self.n_encoder_layers
        return (4 if encoder else 2) * self.d_model, self.d_model // 2

    @property
    def self_attention_heads(self) -> int:
        """Heads of the ET decoder's first (wide) self-attention: max(min(2H, 16), H)."""
        return max(min(2 * self.n_heads, 16), self.n_heads)

    def to_dict(self) -> dict[str, Any]:
        """Every field, except the compression ones while unset, so an uncompressed model's config.json
        stays what older versions wrote and read."""
        optional = ("ffn_widths", "conv_widths", "quantization", "compression")
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k in optional and v is None)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"architectures", "transformers_version"})
        if unknown:
            raise ConfigError(f"unknown model config fields: {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as e:  # name the file: a directory of another kind of model fails here
            raise ConfigError(f"{path}: {e}") from None


# Named presets.  `tiny` drives the tests; `default` is the CPU model we ship (chosen by the
# measurement in docs/benchmarks.md); `base`/`large` are GPU presets; `meena` is the paper's shape.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=2,
                        max_source_len=64, max_target_len=32),
    "default": ModelConfig(d_model=256, n_heads=4, n_encoder_layers=1, n_decoder_layers=4),
    # The vanilla Transformer at the default's parameter count: 2*12 + 7*16 = 136 d^2 vs ET's 21.5 + 4*28.5 = 135.5 d^2.
    "default-vanilla": ModelConfig(d_model=256, n_heads=4, n_encoder_layers=2, n_decoder_layers=7, block_type="vanilla"),
    "base": ModelConfig(d_model=512, n_heads=8, n_encoder_layers=1, n_decoder_layers=8),
    "large": ModelConfig(d_model=1024, n_heads=16, n_encoder_layers=1, n_decoder_layers=13),
    "meena": ModelConfig(d_model=2560, n_heads=32, n_encoder_layers=1, n_decoder_layers=13),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    try:
        base = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
    return dataclasses.replace(base, **overrides) if overrides else base
