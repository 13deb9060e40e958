"""Self-describing model directories: ``config.json``, ``model.safetensors``, ``tokenizer.json``.

The shipped default model lives in the package (``chatbot/assets/default``) so chat and serving work
offline with no training step.  Weights may be stored in fp16 to halve the size; they load as fp32.
A compressed directory (``chatbot compress``) loads the same way: its config.json carries the pruned
widths and, for int8, ``quantization``, and the weights are rebuilt into quantized modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from chatbot.config import ModelConfig
from chatbot.model import ChatModel
from chatbot.tokenizer import ChatTokenizer

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default"


class ModelDirError(FileNotFoundError):
    pass


@dataclass
class LoadedModel:
    model: ChatModel
    tokenizer: ChatTokenizer
    directory: Path


def save_model(model: ChatModel, tokenizer: ChatTokenizer, directory: str | Path,
               dtype: torch.dtype | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG)
    tokenizer.save(directory / TOKENIZER)
    if model.config.quantization:  # int8 values + scales; chatbot.compress rebuilds them on load
        from chatbot.compress import int8_state_dict

        state = {k: v.cpu() for k, v in int8_state_dict(model, dtype).items()}
    else:
        state = {k: (v.detach().to(dtype) if dtype else v.detach()).cpu().contiguous()
                 for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS)  # a crash mid-write never leaves a torn model file
    return directory


def load_model(directory: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model directory (the shipped default when ``directory`` is None) in eval mode, fp32."""
    directory = Path(directory) if directory else DEFAULT_MODEL_DIR
    for name in (CONFIG, WEIGHTS, TOKENIZER):
        if not (directory / name).is_file():
            hint = " (the shipped model is missing: reinstall the package)" if directory == DEFAULT_MODEL_DIR else ""
            raise ModelDirError(f"{directory}: missing {name}; a model directory holds {CONFIG}, {WEIGHTS} and {TOKENIZER}{hint}")
    config = ModelConfig.load(directory / CONFIG)
    tokenizer = ChatTokenizer.load(directory / TOKENIZER)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelDirError(f"{directory}: tokenizer has {tokenizer.vocab_size} entries but the model {config.vocab_size}")
    state = load_file(str(directory / WEIGHTS))
    if config.quantization:
        from chatbot.compress import load_int8_state

        if torch.device(device).type != "cpu":
            raise ModelDirError(f"{directory}: an int8 model runs on the CPU only, not on {device}")
        # Built on the CPU, not on the meta device: initialising meta tensors runs through torch._refs, which
        # imports torch._dynamo, about 70 MB resident for the life of the process (measured: a served int8
        # model then took more memory than the fp32 one).  The float linears built here are freed as the
        # quantized ones replace them.
        model = ChatModel(config)
        try:
            load_int8_state(model, state, str(directory / WEIGHTS))
        except ValueError as e:
            raise ModelDirError(str(e)) from None
    else:
        model = ChatModel(config)  # pruned widths, if any, come from the config
        model.load_state_dict({k: v.float() for k, v in state.items()})
    return LoadedModel(model.to(device).eval(), tokenizer, directory)
