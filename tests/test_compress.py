"""chatbot compress: pruning (unstructured and structured), int8 quantization, recovery, and the
compressed directory loading everywhere a model directory does (chat engine, service, perplexity)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model import eval_model, random_batch
from test_service_support import Conn, run, served, service_config  # noqa: F401

from chatbot.cli import main
from chatbot.compress import (CompressConfig, compress, make_permanent, prunable_weights, prune_structured,
                              prune_unstructured, quantize_int8, quantize_rows, zero_fraction)
from chatbot.config import ConfigError, ModelConfig, preset
from chatbot.generate import DecodingConfig, ReplyEngine
from chatbot.modeldir import CONFIG, WEIGHTS, ModelDirError, load_model, save_model

FAST = DecodingConfig(num_candidates=3, max_new_tokens=8, seed=7)


# ----------------------------------------------------------------------------------------- config


def test_config_widths_round_trip_and_plain_configs_stay_unchanged(tmp_path: Path) -> None:
    plain = preset("tiny")
    assert not {"ffn_widths", "conv_widths", "quantization", "compression"} & set(plain.to_dict())
    cfg = dataclasses.replace(plain, ffn_widths=(10, 20, 30), conv_widths=((40, 8), (30, 16), (5, 5)),
                              quantization="int8", compression={"history": [{"prune": "structured"}]})
    cfg.save(tmp_path / "c.json")
    again = ModelConfig.load(tmp_path / "c.json")
    assert again == cfg and again.ffn_widths == (10, 20, 30) and again.conv_width(1) == (30, 16)
    assert plain.conv_width(0) == (4 * 32, 16) and plain.conv_width(1) == (2 * 32, 16) and plain.ffn_width(2) == 128


@pytest.mark.parametrize("fields,match", [
    ({"ffn_widths": (10, 20)}, "ffn_widths needs 3"),
    ({"ffn_widths": (10, 0, 5)}, "ffn_widths needs 3 positive"),
    ({"conv_widths": ((40, 17), (30, 16), (5, 5))}, r"conv_widths\[0\]"),  # narrow > d/2
    ({"conv_widths": ((4, 8), (30, 16), (5, 5))}, r"conv_widths\[0\]"),  # narrow > mid
    ({"quantization": "int4"}, "quantization"),
])
def test_config_rejects_bad_widths(fields, match) -> None:
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(preset("tiny"), **fields)
    with pytest.raises(ConfigError, match="Evolved Transformer only"):
        dataclasses.replace(preset("tiny"), block_type="vanilla", conv_widths=((40, 8),) * 3)


# ----------------------------------------------------------------------------------------- structured


def captured(module: torch.nn.Module, fn) -> list[torch.Tensor]:
    """Inputs ``module`` sees while ``fn`` runs."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        fn()
    finally:
        handle.remove()
    return seen


def kept_order(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Which of ``original``'s rows (dim 0) each of ``pruned``'s rows is: the slicing and order pruning chose."""
    flat_old, flat_new = original.reshape(original.shape[0], -1), pruned.reshape(pruned.shape[0], -1)
    return torch.tensor([int(torch.nonzero((flat_old == row).all(1))[0]) for row in flat_new])


def test_structured_pruning_keeps_what_kept_units_compute() -> None:
    """Kept FFN units and conv channels see exactly the inputs they saw before pruning: the slices of
    every tensor agree, including the reordering that puts the narrow branch's channels first."""
    model = eval_model("evolved")
    src, tgt = random_batch(model.config.vocab_size)
    small = prune_structured(model, 0.5).eval()
    cfg = small.config
    assert cfg.ffn_widths == (64, 64, 64) and [m for m, _ in cfg.conv_widths] == [64, 32, 32]
    assert small.num_parameters() < 0.8 * model.num_parameters()
    with torch.no_grad():
        for stack, i in (("encoder", 0), ("decoder", 0)):
            old, new = getattr(model, stack)[i], getattr(small, stack)[i]
            block_in = captured(old, lambda: model(src, tgt))
            enc = model.encode(src)
            if stack == "encoder":
                call = lambda b: b(block_in[0], enc.padding, enc.attention_mask)  # noqa: E731
            else:
                call = lambda b: b(block_in[0], enc.states, enc.attention_mask)  # noqa: E731
            order = kept_order(old.conv_mid_norm.weight, new.conv_mid_norm.weight)
            before = captured(old.conv_mid_norm, lambda: call(old))[0]
            after = captured(new.conv_mid_norm, lambda: call(new))[0]
            assert torch.allclose(before[..., order], after, atol=1e-5)
            keep = kept_order(old.ffn.up.weight, new.ffn.up.weight)
            ffn_in = captured(old.ffn, lambda: call(old))[0]
            assert torch.allclose(old.ffn.up(ffn_in)[..., keep], new.ffn.up(ffn_in), atol=1e-5)
            assert torch.equal(old.ffn.down.weight[:, keep], new.ffn.down.weight)


def test_structured_pruning_of_nothing_changes_nothing_and_pruned_models_decode_incrementally() -> None:
    model = eval_model("evolved")
    src, tgt = random_batch(model.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(prune_structured(model, 0.0).eval()(src, tgt), model(src, tgt), atol=1e-5)
        for block_type in ("evolved", "vanilla"):
            small = prune_structured(eval_model(block_type), 0.6).eval()
            full = small(src, tgt)
            state = small.start_decoding(small.encode(src))
            steps = torch.cat([small.decode_step(tgt[:, i:i + 1], state) for i in range(tgt.shape[1])], 1)
            assert torch.allclose(steps, full, atol=1e-4)


def test_a_layer_keeps_at_least_one_unit() -> None:
    small = prune_structured(eval_model("evolved"), 0.999)
    assert min(small.config.ffn_widths) == 1 and min(n for _, n in small.config.conv_widths) == 1


# ----------------------------------------------------------------------------------------- unstructured


def test_unstructured_pruning_zeroes_the_smallest_weights_globally() -> None:
    model = eval_model("evolved")
    targets = [(m, n, getattr(m, n).detach().clone()) for m, n in prunable_weights(model)]
    make_permanent(prune_unstructured(model, 0.4))
    assert zero_fraction(model) == pytest.approx(0.4, abs=1e-3)
    assert not any("_orig" in k or "_mask" in k for k in model.state_dict())
    pruned = torch.cat([before[getattr(m, n) == 0].abs() for m, n, before in targets])
    kept = torch.cat([before[getattr(m, n) != 0].abs() for m, n, before in targets])
    assert pruned.max() <= kept.min()  # one threshold across all layers...
    shares = [float((getattr(m, n) == 0).float().mean()) for m, n, _ in targets if getattr(m, n).numel() > 1000]
    assert max(shares) - min(shares) > 0.05  # ...so layers lose different shares


# ----------------------------------------------------------------------------------------- int8


def test_int8_round_trip_through_disk_is_exact(tmp_path: Path, tiny_model_dir: Path) -> None:
    loaded = load_model(tiny_model_dir)
    src, tgt = random_batch(loaded.model.config.vocab_size)
    with torch.no_grad():
        float_logits = loaded.model(src, tgt)
        q = quantize_int8(loaded.model)
        values, scales = quantize_rows(q.embedding.weight)  # what the file keeps of the embedding
        q.embedding.weight.copy_(values.float() * scales[:, None])
        q_logits = q(src, tgt)
    save_model(q, loaded.tokenizer, tmp_path / "q")
    stored = load_file(str(tmp_path / "q" / WEIGHTS))
    assert stored["decoder.0.ffn.up.weight.int8"].dtype == torch.int8
    assert stored["embedding.weight.int8"].dtype == torch.int8
    again = load_model(tmp_path / "q").model
    assert again.config.quantization == "int8"
    with torch.no_grad():
        again_logits = again(src, tgt)
    assert torch.allclose(again_logits, q_logits, atol=1e-5)
    save_model(again, loaded.tokenizer, tmp_path / "q2")  # a loaded int8 model saves to the identical tensors
    assert {k: v.tolist() for k, v in load_file(str(tmp_path / "q2" / WEIGHTS)).items()} == \
           {k: v.tolist() for k, v in stored.items()}
    rel = (again_logits - float_logits).norm() / float_logits.norm()
    assert 0 < rel < 0.05  # quantized: different, but close


# ----------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_corpus: Path) -> Path:
    """The tiny model, structured-pruned by half, recovered for a few steps, then int8: through the CLI."""
    out = tmp_path_factory.mktemp("compressed") / "tiny-s50-int8"
    assert main(["compress", "--model", str(tiny_model_dir), "--out", str(out), "--prune", "0.5", "--structured",
                 "--recover-steps", "6", "--data", str(small_corpus), "--quantize", "int8", "--no-progress"]) == 0
    return out


def test_compressed_directory_describes_itself(compressed_dir: Path, tiny_model_dir: Path) -> None:
    cfg = json.loads((compressed_dir / CONFIG).read_text())
    assert cfg["quantization"] == "int8" and len(cfg["ffn_widths"]) == 3
    steps = cfg["compression"]["history"][0]["steps"]
    assert [next(iter(s)) for s in steps] == ["prune", "recover_steps", "quantize"]
    assert steps[1]["valid"]["perplexity"] > 1
    assert sorted(p.name for p in compressed_dir.iterdir()) == [CONFIG, WEIGHTS, "tokenizer.json"]  # no pickle
    assert (compressed_dir / WEIGHTS).stat().st_size < 0.45 * (tiny_model_dir / WEIGHTS).stat().st_size


def test_compressed_model_replies_through_the_engine(compressed_dir: Path) -> None:
    loaded = load_model(compressed_dir)
    engine = ReplyEngine(loaded.model, loaded.tokenizer)
    replies = engine.reply([["hi, how are you?"], ["what do you do for fun?"]], FAST, return_candidates=True)
    assert len(replies) == 2 and all(len(r.candidates) == 3 for r in replies)
    assert all(math.isfinite(c.log_likelihood) for r in replies for c in r.candidates)
    again = engine.reply([["hi, how are you?"], ["what do you do for fun?"]], FAST)
    assert [r.text for r in again] == [r.text for r in replies]  # seeded: reproducible on int8 too


def test_compressed_model_serves(tmp_path: Path, compressed_dir: Path) -> None:
    """`chatbot serve --model DIR` loads through load_engine; the reply arrives over a real websocket."""
    from chatbot.serve.app import load_engine

    config = service_config(tmp_path, model_dir=str(compressed_dir),
                            torch_threads=torch.get_num_threads())  # load_engine sets the process-wide count
    engine = load_engine(config)
    assert engine.model.config.quantization == "int8"

    async def scenario() -> None:
        async with served(config, engine) as svc:
            async with Conn.open(svc.ws_url) as conn:
                await conn.hello()
                frames = await conn.say("hello, what is your favorite food?", "m1")
                assert frames[0]["type"] == "accepted" and frames[-1]["type"] == "reply"
                assert "".join(f["text"] for f in frames if f["type"] == "piece") == frames[-1]["text"]

    run(scenario())


def test_int8_models_count_their_quantized_weights(compressed_dir: Path, tmp_path: Path, caplog) -> None:
    """An int8 linear layer keeps its weight packed, not as a parameter: the count (and the service's
    startup log) must still include it, and the int8 output projection must not count the embedding twice."""
    import logging

    from chatbot.model import ChatModel
    from chatbot.serve.app import load_engine

    cfg = load_model(compressed_dir).model.config
    with torch.device("meta"):
        float_twin = ChatModel(dataclasses.replace(cfg, quantization=None))  # same widths, float layers
    expected = float_twin.num_parameters()
    model = load_model(compressed_dir).model
    assert model.output_int8 is not None and model.num_parameters() == expected
    assert model.num_parameters(exclude_embedding=True) == float_twin.num_parameters(exclude_embedding=True)
    config = service_config(tmp_path, model_dir=str(compressed_dir), torch_threads=torch.get_num_threads())
    with caplog.at_level(logging.INFO, logger="chatbot.serve.app"):
        load_engine(config)
    assert f"({expected:,} parameters, int8," in caplog.text


def test_int8_output_projection_is_the_embeddings_int8_rows(compressed_dir: Path) -> None:
    """Decoding and perplexity both read logits from the int8 output layer, whose weight is exactly the
    stored int8 embedding; the input lookup reads the same rows dequantized."""
    model = load_model(compressed_dir).model
    stored = load_file(str(compressed_dir / WEIGHTS))
    weight = model.output_int8._weight_bias()[0]
    assert torch.equal(weight.int_repr(), stored["embedding.weight.int8"])
    assert torch.equal(weight.q_per_channel_scales().float(), stored["embedding.weight.scale"])
    assert torch.equal(model.embedding.weight, weight.dequantize().float())
    h = torch.randn(3, 2, model.config.d_model)
    with torch.no_grad():
        assert torch.equal(model.logits(h), model.output_int8(h))
        assert torch.equal(model.step_logits(h), model.output_int8(h))
        assert not torch.equal(model.logits(h), h @ model.embedding.weight.t())  # activations are quantized too


def test_compressed_model_perplexity_cli(compressed_dir: Path, small_corpus: Path, capsys) -> None:
    assert main(["eval", "perplexity", "--model", str(compressed_dir), "--data", str(small_corpus),
                 "--max-examples", "30"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 1 < result["perplexity"] < 512


def test_unstructured_recovery_keeps_pruned_weights_at_zero(tmp_path: Path, tiny_model_dir: Path, small_corpus: Path) -> None:
    summary = compress(CompressConfig(model=str(tiny_model_dir), out=str(tmp_path / "u"), prune=0.5, recover_steps=4,
                                      data=str(small_corpus), progress=False))
    assert summary["zero_fraction"] >= 0.5
    model = load_model(tmp_path / "u").model
    assert zero_fraction(model) >= 0.5 and model.config.ffn_widths is None
    original = load_model(tiny_model_dir).model
    assert not torch.equal(model.decoder[0].ffn.up.bias, original.decoder[0].ffn.up.bias)  # it did train


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("flags,message", [
    (["--prune", "1.0"], "--prune must be a fraction in [0, 1)"),
    (["--prune", "-0.1"], "--prune must be a fraction in [0, 1)"),
    (["--prune", "nan"], "--prune must be a fraction in [0, 1)"),
    (["--structured"], "--structured needs --prune"),
    ([], "nothing to do"),
    (["--prune", "0.5", "--recover-steps", "5"], "--recover-steps needs --data"),
    (["--prune", "0.5", "--data", "chitchat"], "--data is only read by recovery"),
    (["--quantize", "int8", "--recover-steps", "5", "--data", "chitchat"], "give --prune too"),
    (["--prune", "0.5", "--recover-steps", "5", "--data", "/no/such.jsonl"], "--data '/no/such.jsonl': no such file"),
])
def test_bad_flags_are_named(flags, message, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["compress", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_models_are_named(compressed_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["compress", "--model", str(compressed_dir), "--out", str(tmp_path / "o"), "--quantize", "int8"]) == 2
    assert f"--quantize: {compressed_dir} is already int8-quantized" in capsys.readouterr().err
    assert main(["compress", "--model", str(compressed_dir), "--out", str(tmp_path / "o"), "--prune", "0.2"]) == 2
    assert "prune its float model" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compress", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quantize", "int8"]) == 2
    assert f"{tmp_path / 'empty'}: missing config.json" in capsys.readouterr().err
    assert main(["compress", "--model", str(compressed_dir), "--out", str(compressed_dir), "--quantize", "int8"]) == 2
    assert "is the --model directory" in capsys.readouterr().err
    assert main(["compress", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quantize", "int8"]) == 2
    assert f"--model {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert main(["compress", "--model", str(compressed_dir), "--out", str(tmp_path / "a-file"), "--quantize", "int8"]) == 2
    assert f"--out {tmp_path / 'a-file'} is a file" in capsys.readouterr().err
    other = tmp_path / "other-model"  # another project's model directory: its config.json is named
    other.mkdir()
    for name in (WEIGHTS, "tokenizer.json"):
        (other / name).write_bytes((compressed_dir / name).read_bytes())
    (other / CONFIG).write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    assert main(["compress", "--model", str(other), "--out", str(tmp_path / "o"), "--quantize", "int8"]) == 2
    assert f"{other / CONFIG}: unknown model config fields: hidden_size" in capsys.readouterr().err
    (other / CONFIG).write_text(json.dumps({"model_type": "bert"}))
    assert main(["compress", "--model", str(other), "--out", str(tmp_path / "o"), "--quantize", "int8"]) == 2
    assert f"{other / CONFIG}: model_type is 'bert': not a model of this project" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_int8_weights_that_do_not_match_the_config_are_refused(compressed_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (CONFIG, "tokenizer.json"):
        (broken / name).write_bytes((compressed_dir / name).read_bytes())
    state = load_file(str(compressed_dir / WEIGHTS))
    del state["decoder.1.ffn.up.weight.scale"]
    save_file(state, str(broken / WEIGHTS))
    with pytest.raises(ModelDirError, match=r"model.safetensors: config.json says int8 but the weights lack decoder.1.ffn.up.weight.scale"):
        load_model(broken)
    cfg = json.loads((compressed_dir / CONFIG).read_text())
    cfg["ffn_widths"][0] += 1
    (broken / CONFIG).write_text(json.dumps(cfg))
    save_file(load_file(str(compressed_dir / WEIGHTS)), str(broken / WEIGHTS))
    with pytest.raises(ModelDirError, match="model.safetensors: encoder.0.ffn.up"):
        load_model(broken)
