"""Shared fixtures: a small JSONL corpus cut from the bundled chitchat data, and a tiny trained model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# Before torch loads OpenMP: sleeping idle threads keep the suite's speed when something else is busy
# (spinning ones collapsed a tiny model's training from thousands of tokens/s to 8 on a shared box).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenized-data caches go to a per-session temp dir unless the caller chose one (make test does)."""
    if "CHATBOT_CACHE" not in os.environ:
        os.environ["CHATBOT_CACHE"] = str(tmp_path_factory.mktemp("chatbot-cache"))
    return Path(os.environ["CHATBOT_CACHE"])


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 400 chitchat conversations (by id) as a JSONL corpus in the documented user format."""
    from chatbot.data import chitchat_conversations

    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with open(path, "w") as f:
        for i, conv in enumerate(chitchat_conversations()):
            if i == 400:
                break
            f.write(json.dumps({"id": conv.id, "turns": [{"speaker": t.speaker, "text": t.text} for t in conv.turns]}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    """A `tiny` preset model (512-entry BPE) trained for a few seconds: a real model directory for tests."""
    from chatbot.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-model")
    train(TrainConfig(out=str(out), preset="tiny", data=str(small_corpus), vocab_size=512, max_steps=60,
                      warmup_steps=10, lr=3e-3, batch_tokens=2048, eval_every=60, save_every=60, progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_backward_dir(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path, tiny_model_dir: Path) -> Path:
    """A `tiny` backward model, p(last context turn | reply), started from the tiny chat model's weights."""
    from chatbot.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-backward")
    train(TrainConfig(out=str(out), preset="tiny", data=str(small_corpus), direction="backward",
                      tokenizer=str(tiny_model_dir / "tokenizer.json"), init_from=str(tiny_model_dir), max_steps=40, warmup_steps=10, lr=3e-3,
                      batch_tokens=2048, eval_every=40, save_every=40, progress=False))
    return out


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's (make system-deps)


@pytest.fixture
def browser(tmp_path: Path):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("Debian's chromium and chromium-driver are needed: `make system-deps` installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, CSP reports included
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
