import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatbot.tokenizer import BOS_ID, EOT_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, ChatTokenizer

CORPUS = ["hello there, how are you?", "i'm fine thanks", "what do you do for fun?", "i like hiking and music"] * 50


@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    return ChatTokenizer.train(CORPUS, vocab_size=400)


def test_special_tokens_have_fixed_ids(tokenizer):
    assert [tokenizer.backend.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (PAD_ID, BOS_ID, EOT_ID, SEP_ID) == (0, 1, 2, 3)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_unicode_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", ["emoji 👋🏽🤖", "中文和日本語のテキスト", "bell\x07 tab\t nul\x00 newline\n", "  spaces  "])
def test_hard_strings_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_user_text_cannot_produce_special_tokens(tokenizer):
    ids = tokenizer.encode("a <sep> b </t> <pad> <s>")
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tokenizer.decode(ids) == "a <sep> b </t> <pad> <s>"


def test_save_load_and_transformers_agree(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = ChatTokenizer.load(tmp_path / "tokenizer.json")
    hf = loaded.to_transformers()
    text = "hello there, i like music 🎵"
    assert loaded.encode(text) == tokenizer.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert hf.pad_token_id == PAD_ID and hf.eos_token_id == EOT_ID and hf.sep_token_id == SEP_ID
    assert loaded.fingerprint() == tokenizer.fingerprint()


def test_transformers_loads_the_file_directly(tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tokenizer.save(tmp_path / "tokenizer.json")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf.decode(hf("how are you?", add_special_tokens=False)["input_ids"]) == "how are you?"
