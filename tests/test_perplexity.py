import json
import math
import subprocess
import sys

import pytest
import torch

from chatbot.data import ExampleStore, prepare_splits
from chatbot.modeldir import load_model
from chatbot.tokenizer import BOS_ID, EOT_ID
from eval.perplexity import evaluate_perplexity


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def test_store(loaded, small_corpus):
    cfg = loaded.model.config
    directory = prepare_splits(str(small_corpus), loaded.tokenizer, ["test"], whole_file_as="test")["test"]
    return ExampleStore(directory, cfg.max_source_len, cfg.max_target_len)


def test_perplexity_matches_an_unbatched_reference(loaded, test_store):
    """Batched, padded evaluation == one example at a time with no padding at all."""
    model, n = loaded.model, 40
    total, tokens, words = 0.0, 0, 0
    with torch.no_grad():
        for i in range(n):
            context, response = test_store.example(i)
            src = torch.as_tensor(context.astype("int64"))[None]
            response = response.tolist()
            target = torch.as_tensor(response + [EOT_ID])[None]
            tgt_in = torch.as_tensor([BOS_ID] + response)[None]
            logp = model(src, tgt_in).log_softmax(-1)
            total -= logp.gather(-1, target[..., None]).sum().item()
            tokens += target.shape[1]
            words += int(test_store.words[test_store.examples[i, 0]]) + 1
    result = evaluate_perplexity(model, test_store, batch_tokens=512, progress=False, max_examples=n)
    assert result.examples == n and result.tokens == tokens and result.words == words
    assert result.perplexity == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert result.per_word_perplexity == pytest.approx(math.exp(total / words), rel=1e-4)


def test_batch_size_does_not_change_the_result(loaded, test_store):
    a = evaluate_perplexity(loaded.model, test_store, batch_tokens=256, progress=False, max_examples=100)
    b = evaluate_perplexity(loaded.model, test_store, batch_tokens=4096, progress=False, max_examples=100)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-4) and a.tokens == b.tokens


def test_cli_prints_json_with_perplexity(tiny_model_dir, small_corpus):
    out = subprocess.run([sys.executable, "-m", "chatbot.cli", "eval", "perplexity", "--model", str(tiny_model_dir),
                          "--data", str(small_corpus), "--max-examples", "50"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert 1 < result["perplexity"] < 512 and result["examples"] == 50 and result["per_word_perplexity"] > 0


def test_cli_names_the_bad_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "turns": [{"speaker": "x", "text": "hi"}, {"speaker": "y", "text": "yo"}]}\n{oops\n')
    out = subprocess.run([sys.executable, "-m", "chatbot.cli", "eval", "perplexity", "--model", str(tiny_model_dir),
                          "--data", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"{bad}:2: not valid JSON" in out.stderr
