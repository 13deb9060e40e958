"""kNN-LM: the interpolation maths, the datastore build (train split only, pointers), the model tie, generation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from chatbot.cli import main
from chatbot.data import conversations, split_of
from chatbot.decoding import StepView
from chatbot.generate import DecodingConfig, ReplyEngine
from chatbot.memory import (Datastore, DatastoreError, DatastoreMismatch, KnnLM, build_datastore, collect_neighbours,
                            eval_store, interpolate, knn_log_probs, knn_nll, knn_perplexity)
from chatbot.modeldir import load_model, save_model


def test_interpolation_matches_a_hand_computed_case():
    # Neighbours at squared distances 1, 2, 4 voting for tokens 5, 7, 5; temperature 1; lambda 0.25;
    # the model uniform over 10 tokens.  By hand: Z = e^-1 + e^-2 + e^-4 = 0.52153036,
    # p_knn(5) = (e^-1 + e^-4) / Z = 0.74050354, p_knn(7) = e^-2 / Z = 0.25949646,
    # p(5) = 0.25 * 0.74050354 + 0.75 * 0.1 = 0.26012588, p(7) = 0.13987412, any other token 0.075.
    knn = knn_log_probs(torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([[5, 7, 5]]), 10, temperature=1.0)
    assert knn.exp()[0, 5].item() == pytest.approx(0.74050354, abs=1e-6)
    assert knn.exp()[0, 7].item() == pytest.approx(0.25949646, abs=1e-6)
    assert knn.exp()[0].sum().item() == pytest.approx(1.0, abs=1e-6)
    model = torch.full((1, 10), math.log(0.1))
    p = interpolate(model, knn, 0.25).exp()[0]
    assert p[5].item() == pytest.approx(0.26012588, abs=1e-6)
    assert p[7].item() == pytest.approx(0.13987412, abs=1e-6)
    assert p[0].item() == pytest.approx(0.075, abs=1e-7) and p.sum().item() == pytest.approx(1.0, abs=1e-6)
    # Temperature 2 halves the distances: p_knn(5) = (e^-0.5 + e^-2) / (e^-0.5 + e^-1 + e^-2)
    # = (0.60653066 + 0.13533528) / 1.10974538 = 0.66850104
    hot = knn_log_probs(torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([[5, 7, 5]]), 10, temperature=2.0).exp()
    assert hot[0, 5].item() == pytest.approx(0.66850104, abs=1e-6)
    # A missing neighbour (token -1) takes no weight; no neighbour at all leaves the model's distribution.
    missing = knn_log_probs(torch.tensor([[1.0, 9.0]]), torch.tensor([[3, -1]]), 10, 1.0).exp()
    assert missing[0, 3].item() == pytest.approx(1.0) and missing[0].sum().item() == pytest.approx(1.0)
    none = knn_log_probs(torch.tensor([[1.0]]), torch.tensor([[-1]]), 10, 1.0)
    assert torch.allclose(interpolate(model, none, 0.25).exp(), torch.full((1, 10), 0.075))
    assert torch.equal(interpolate(model, knn, 0.0), model)


def test_the_array_path_of_perplexity_agrees_with_the_processor():
    from chatbot.memory import EvalNeighbours

    nb = EvalNeighbours(np.log(np.array([0.1, 0.1])), np.array([[1.0, 2.0, 4.0], [1.0, 2.0, np.inf]], np.float32),
                        np.array([[True, False, True], [False, True, False]]), words=2, examples=1)
    # Token 1: p = 0.26012588 (as above).  Token 2: its third neighbour is missing (inf), so
    # p = 0.25 * e^-2 / (e^-1 + e^-2) + 0.75 * 0.1 = 0.25 * 0.26894142 + 0.075 = 0.14223536
    assert knn_nll(nb, 3, 0.25, 1.0) == pytest.approx(-math.log(0.26012588) - math.log(0.14223536), abs=1e-6)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def datastore_dir(tmp_path_factory, tiny_model_dir, small_corpus):
    out = tmp_path_factory.mktemp("memory") / "ds"
    build_datastore(tiny_model_dir, out, data=str(small_corpus), max_examples=120, progress=False)
    return out


def test_build_stores_the_training_states_and_points_back(loaded, datastore_dir, small_corpus):
    ds = Datastore.load(datastore_dir, loaded)
    manifest = ds.manifest
    assert manifest["split"] == "train" and manifest["examples"] == 120 and manifest["keys"] == len(ds) > 0
    # Every key is the decoder state before its value, teacher-forced: recompute one example's.
    from chatbot.data import ExampleStore, prepare_splits

    cfg = loaded.model.config
    train = ExampleStore(prepare_splits(str(small_corpus), loaded.tokenizer, ["train"])["train"],
                         cfg.max_source_len, cfg.max_target_len)
    example = int(ds.pointers[len(ds) // 2, 0])
    rows = np.flatnonzero(ds.pointers[:, 0] == example)
    batch = train.collate([example])
    with torch.inference_mode():
        hidden = loaded.model.decode_hidden(batch.tgt_in, loaded.model.encode(batch.src))[0]
    keys = np.load(datastore_dir / "keys.npy")
    positions = ds.pointers[rows, 1]
    assert np.allclose(keys[rows], hidden[positions].numpy(), atol=2e-2)  # fp16 keys
    assert ds.values[rows].tolist() == batch.tgt_out[0, positions].tolist()
    # The pointer's text is that example's reply; its conversation is a training conversation.
    neighbour = ds.neighbours(hidden[positions[0]].numpy(), 1)[0]
    assert neighbour.distance == pytest.approx(0.0, abs=1e-2)
    context, reply = ds.example_texts(neighbour.example, loaded.tokenizer)
    conv = next(c for c in conversations(str(small_corpus)) if c.id == neighbour.conversation_id)
    assert reply.strip() == conv.turns[neighbour.turn].text.strip() and context
    assert context[-1].strip() == conv.turns[neighbour.turn - 1].text.strip()


def test_only_training_conversations_are_in_the_datastore(datastore_dir, small_corpus):
    ids = json.loads((datastore_dir / "conversations.json").read_text())
    examples = np.load(datastore_dir / "examples.npy")
    held_out = {c.id for c in conversations(str(small_corpus)) if split_of(c.id) != "train"}
    assert held_out, "the corpus must have held-out conversations for this test to mean anything"
    assert not held_out & set(ids)
    assert all(split_of(ids[c]) == "train" for c in set(examples[:, 2].tolist()))


def test_a_datastore_of_another_model_is_refused(tmp_path, loaded, datastore_dir):
    other = load_model(loaded.directory)
    with torch.no_grad():
        other.model.embedding.weight[5] += 0.01
    other_dir = save_model(other.model, other.tokenizer, tmp_path / "other")
    with pytest.raises(DatastoreMismatch, match=r"chatbot memory build --model .*other --out"):
        Datastore.load(datastore_dir, load_model(other_dir))
    with pytest.raises(DatastoreError, match="not a datastore"):
        Datastore.load(tmp_path, loaded)


def test_knn_lowers_perplexity_on_remembered_text_and_lambda_zero_is_the_model(loaded, datastore_dir, small_corpus):
    from eval.perplexity import model_dir_perplexity

    # The whole small corpus as "test": the datastore holds its first training examples verbatim.
    plain = knn_perplexity(str(loaded.directory), str(datastore_dir), str(small_corpus), k=8, lam=0.0,
                           temperature=1.0, max_examples=60, progress=False)
    _, reference = model_dir_perplexity(str(loaded.directory), str(small_corpus), max_examples=60, progress=False)
    assert plain["perplexity"] == pytest.approx(reference.perplexity, rel=1e-4)
    assert plain["knn"]["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-9)
    mixed = knn_perplexity(str(loaded.directory), str(datastore_dir), str(small_corpus), k=8, lam=0.5,
                           temperature=1.0, max_examples=60, progress=False)
    assert mixed["knn"]["perplexity"] < mixed["perplexity"]


def test_eval_perplexity_cli_reports_both(capsys, loaded, datastore_dir, small_corpus):
    assert main(["eval", "perplexity", "--model", str(loaded.directory), "--data", str(small_corpus),
                 "--max-examples", "20", "--knn", str(datastore_dir), "--knn-k", "4", "--knn-lambda", "0.3",
                 "--knn-temperature", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["knn"]["k"] == 4 and out["knn"]["lambda"] == 0.3 and out["examples"] == 20
    assert out["knn"]["ratio"] == pytest.approx(out["knn"]["perplexity"] / out["perplexity"])
    # Refused with a message, not a traceback.
    assert main(["eval", "perplexity", "--model", str(loaded.directory), "--data", str(small_corpus),
                 "--knn", str(datastore_dir), "--knn-lambda", "1"]) != 0
    assert "--knn-lambda must be in [0, 1)" in capsys.readouterr().err


def test_knn_runs_in_generation(loaded, datastore_dir):
    ds = Datastore.load(datastore_dir, loaded)
    contexts = [["hi there", "hello! how are you?"], ["what do you do for fun?"]]
    config = DecodingConfig(num_candidates=4, seed=5, max_new_tokens=8, temperature=1.0)
    plain = ReplyEngine(loaded.model, loaded.tokenizer).reply(contexts, config, return_candidates=True)
    off = ReplyEngine(loaded.model, loaded.tokenizer, processors=[KnnLM(ds, k=4, lam=0.0, temperature=1.0)])
    assert [r.candidates[0].log_likelihood for r in off.reply(contexts, config, return_candidates=True)] == \
        [r.candidates[0].log_likelihood for r in plain]
    knn = KnnLM(ds, k=4, lam=0.5, temperature=1.0)
    calls = []

    def spy(logprobs, view: StepView):
        calls.append(view.hidden.shape[0])
        return knn(logprobs, view)

    on = ReplyEngine(loaded.model, loaded.tokenizer, processors=[spy]).reply(contexts, config, return_candidates=True)
    assert calls and calls[0] == 8
    assert [c.log_likelihood for r in on for c in r.candidates] != [c.log_likelihood for r in plain for c in r.candidates]


def test_ivfpq_keys(tmp_path, tiny_model_dir, small_corpus, loaded):
    out = tmp_path / "pq"
    manifest = build_datastore(tiny_model_dir, out, data=str(small_corpus), key_type="ivfpq", max_examples=120,
                               ivf_lists=4, pq_m=8, pq_bits=4, progress=False)
    assert manifest["factory"].startswith("IVF4,PQ8x4") and not (out / "keys.npy").exists()
    ds = Datastore.load(out, loaded)
    store = eval_store(loaded, str(small_corpus))
    nb = collect_neighbours(loaded, store, ds, 4, max_examples=10, progress=False)
    assert np.isfinite(nb.distances[:, 0]).all() and nb.match.any()
