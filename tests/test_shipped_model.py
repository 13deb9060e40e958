"""The model that ships in the package: present, small enough, loadable offline, and it answers."""

import subprocess
import sys

import torch

from chatbot.modeldir import DEFAULT_MODEL_DIR, WEIGHTS, load_model

MAX_BYTES = 32 * 1024 * 1024


def test_shipped_model_is_in_the_package_and_small_enough():
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir())
    assert (DEFAULT_MODEL_DIR / WEIGHTS).is_file() and size <= MAX_BYTES, size


def test_shipped_model_loads_as_fp32_default_preset():
    loaded = load_model()
    cfg = loaded.model.config
    assert (cfg.block_type, cfg.d_model, cfg.n_encoder_layers, cfg.n_decoder_layers) == ("evolved", 256, 1, 4)
    assert loaded.tokenizer.vocab_size == cfg.vocab_size == 8192
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_chat_answers_from_the_shipped_model_offline():
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "chatbot.cli", "chat", "--seed", "3"], input="hi! how are you?\n\nwhat do you like to do?\n",
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    replies = out.stdout.splitlines()
    assert len(replies) == 2 and all(r.strip() for r in replies)  # the empty line was ignored
