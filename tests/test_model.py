import dataclasses

import pytest
import torch

from chatbot.config import PRESETS, ConfigError, ModelConfig, preset
from chatbot.model import (ChatModel, EvolvedDecoderBlock, EvolvedEncoderBlock, VanillaDecoderBlock,
                           VanillaEncoderBlock)

# Closed forms from docs (embeddings excluded): (d^2 coefficient, d coefficient).
CLOSED_FORMS = {
    (EvolvedEncoderBlock, None): (21.5, 64),
    (EvolvedDecoderBlock, True): (28.5, 62.5),
    (EvolvedDecoderBlock, False): (20.5, 60.5),
    (VanillaEncoderBlock, None): (12, 9),
    (VanillaDecoderBlock, True): (16, 11),
    (VanillaDecoderBlock, False): (12, 9),
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("d", [32, 64, 96])
@pytest.mark.parametrize("block,cross", list(CLOSED_FORMS))
def test_block_parameter_counts_match_closed_forms(block, cross, d):
    cfg = ModelConfig(d_model=d, n_heads=4)
    module = block(cfg) if cross is None else block(cfg, cross_attention=cross)
    a, b = CLOSED_FORMS[(block, cross)]
    assert count(module) == a * d * d + b * d


@pytest.mark.parametrize("name", ["tiny", "default", "default-vanilla", "base"])
def test_whole_model_matches_closed_form(name):
    cfg = preset(name)
    enc, dec = ((21.5, 64), (28.5, 62.5)) if cfg.block_type == "evolved" else ((12, 9), (16, 11))
    d, V = cfg.d_model, cfg.vocab_size
    expected = (cfg.n_encoder_layers * (enc[0] * d * d + enc[1] * d) + cfg.n_decoder_layers * (dec[0] * d * d + dec[1] * d)
                + 4 * d + V * d)
    assert ChatModel(cfg).num_parameters() == expected


def test_meena_preset_builds_on_meta_device_at_2_6_billion():
    with torch.device("meta"):
        model = ChatModel(PRESETS["meena"])
    n = model.num_parameters()
    assert 2.55e9 < n < 2.65e9  # paper: 2.6B; closed form: 2.59B
    assert model.config.n_encoder_layers == 1 and model.config.n_decoder_layers == 13
    assert model.config.self_attention_heads == 32


def test_default_and_vanilla_presets_have_equal_parameters():
    et, vanilla = ChatModel(preset("default")).num_parameters(), ChatModel(preset("default-vanilla")).num_parameters()
    assert abs(et - vanilla) / et < 0.01


def test_config_validation():
    with pytest.raises(ConfigError, match="multiple of n_heads"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="block_type"):
        ModelConfig(block_type="lstm")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="unknown model config fields"):
        ModelConfig.from_dict({"d_model": 64, "n_layers": 3})


def eval_model(block_type: str, seed: int = 0) -> ChatModel:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(preset("tiny"), block_type=block_type, dropout=0.0, attention_dropout=0.0)
    model = ChatModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine so a bug in any norm shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def random_batch(vocab: int, B: int = 3, S: int = 11, T: int = 13):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(5, vocab, (B, S), generator=g)
    src[1, 6:] = 0  # padded row
    src[2, 9:] = 0
    tgt = torch.randint(5, vocab, (B, T), generator=g)
    tgt[:, 0] = 1
    return src, tgt


@pytest.mark.parametrize("block_type", ["evolved", "vanilla"])
def test_decoder_is_causal(block_type):
    model = eval_model(block_type)
    src, tgt = random_batch(model.config.vocab_size)
    base = model(src, tgt)
    for t in (3, 7, 12):
        changed = tgt.clone()
        changed[:, t] = (changed[:, t] + 17) % model.config.vocab_size
        out = model(src, changed)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-5), f"position {t} leaked into earlier outputs"
        assert not torch.allclose(out[:, t:], base[:, t:], atol=1e-5)  # and it does change what follows


@pytest.mark.parametrize("block_type", ["evolved", "vanilla"])
def test_encoder_ignores_padding(block_type):
    model = eval_model(block_type)
    src, tgt = random_batch(model.config.vocab_size)
    base = model(src, tgt)
    wider = torch.cat([src, torch.zeros(src.shape[0], 5, dtype=src.dtype)], dim=1)  # more padding
    assert torch.allclose(model(wider, tgt), base, atol=1e-5)


@pytest.mark.parametrize("block_type", ["evolved", "vanilla"])
def test_incremental_decoding_equals_full_pass(block_type):
    model = eval_model(block_type)
    src, tgt = random_batch(model.config.vocab_size)
    with torch.no_grad():
        full = model(src, tgt)
        state = model.start_decoding(model.encode(src))
        steps = [model.decode_step(tgt[:, i:i + 1], state) for i in range(tgt.shape[1])]
        # several tokens at once from a cache continue the same sequence too
        state2 = model.start_decoding(model.encode(src))
        chunks = [model.decode_step(tgt[:, :5], state2), model.decode_step(tgt[:, 5:], state2)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)
    assert torch.allclose(torch.cat(chunks, 1), full, atol=1e-4)


def test_state_select_and_repeats_follow_rows():
    model = eval_model("evolved")
    src, tgt = random_batch(model.config.vocab_size)
    with torch.no_grad():
        full = model(src, tgt)
        state = model.start_decoding(model.encode(src), repeats=2)  # rows: c0, c0, c1, c1, c2, c2
        tgt2 = tgt.repeat_interleave(2, dim=0)
        for i in range(4):
            model.decode_step(tgt2[:, i:i + 1], state)
        state.select(torch.tensor([5, 0]))  # keep one copy of c2 and one of c0, in that order
        rest = [model.decode_step(tgt[[2, 0], i:i + 1], state) for i in range(4, tgt.shape[1])]
    assert torch.allclose(torch.cat(rest, 1), full[[2, 0], 4:], atol=1e-4)


@pytest.mark.parametrize("block_type", ["evolved", "vanilla"])
def test_ragged_rows_share_their_contexts_encoder_states(block_type):
    """After finished rows leave, contexts keep different numbers of rows (the grid layout with
    scattered slots); a context whose rows all left is dropped.  Every row still continues its own
    context's sequence, and buffers sized too small grow."""
    model = eval_model(block_type)
    src, _ = random_batch(model.config.vocab_size)
    tgt = torch.randint(5, model.config.vocab_size, (9, 13), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = 1  # rows: c0 c0 c0 c1 c1 c1 c2 c2 c2, each with its own tokens
    with torch.no_grad():
        full = model(src.repeat_interleave(3, dim=0), tgt)
        state = model.start_decoding(model.encode(src), repeats=3, max_new_tokens=2)  # grows past 2
        for i in range(4):
            model.decode_step(tgt[:, i:i + 1], state)
        rows = [0, 1, 3, 6, 7, 8]  # c0 x2, c1 x1, c2 x3
        state.select(torch.tensor(rows))
        assert state.rows.slot is not None and state.rows.width == 3
        first = [model.decode_step(tgt[rows, i:i + 1], state) for i in range(4, 8)]
        state.select(torch.tensor([5, 2]))  # rows 8 (c2) then 3 (c1): c0 leaves
        assert next(iter(state.layers[0].memory.values())).shape[0] == 2
        second = [model.decode_step(tgt[[8, 3], i:i + 1], state) for i in range(8, tgt.shape[1])]
    assert torch.allclose(torch.cat(first, 1), full[rows, 4:8], atol=1e-4)
    assert torch.allclose(torch.cat(second, 1), full[[8, 3], 8:], atol=1e-4)


def test_output_weight_copy_follows_weight_changes():
    model = eval_model("evolved")
    src, tgt = random_batch(model.config.vocab_size)
    with torch.no_grad():
        before = model.decode_step(tgt[:, :1], model.start_decoding(model.encode(src)))
        model.embedding.weight.mul_(2.0)  # in place, as an optimizer step or load_state_dict would
        after = model.decode_step(tgt[:, :1], model.start_decoding(model.encode(src)))
        assert not torch.allclose(after, before, atol=1e-3)
        assert torch.allclose(after, model(src, tgt[:, :1]), atol=1e-4)  # the full pass, no copy involved


def test_a_model_built_under_inference_mode_still_decodes():
    with torch.inference_mode():
        model = ChatModel(preset("tiny", dropout=0.0, attention_dropout=0.0)).eval()
        src, tgt = random_batch(model.config.vocab_size)
        state = model.start_decoding(model.encode(src))
        step = model.decode_step(tgt[:, :1], state)
        assert torch.allclose(step, model(src, tgt[:, :1]), atol=1e-5)


def test_cheap_dropout_rate_scale_and_gradient():
    from chatbot.model import Dropout, cheap_dropout

    torch.manual_seed(0)
    x = torch.ones(200_003, requires_grad=True)  # not a multiple of 4: the last draw is cut
    y = cheap_dropout(x, 0.1)
    dropped = y.eq(0)
    assert abs(dropped.float().mean().item() - 0.1) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01  # survivors scaled: the expectation is kept
    y.sum().backward()
    assert torch.equal(x.grad.eq(0), dropped) and torch.allclose(x.grad[~dropped], y[~dropped])
    torch.manual_seed(0)
    assert torch.equal(cheap_dropout(x.detach(), 0.1), y.detach())  # follows torch's seed
    layer = Dropout(0.3).eval()
    assert layer(x) is x
    layer.train()
    assert 0.27 < layer(torch.ones(100_000)).eq(0).float().mean().item() < 0.33
