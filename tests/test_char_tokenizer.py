"""Character tokenizer: one token per ASCII character, exact round trips, stable special ids, a chat template that
render_prompt uses, and identical ids after save_pretrained -> AutoTokenizer, also next to a saved qwen2 model."""
import json

import pytest
from flax import nnx
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from grpo_jax.data import build_char_tokenizer, render_prompt
from grpo_jax.data.char_tokenizer import DEFAULT_ALPHABET, VOCAB_SIZE
from grpo_jax.models import ModelConfig, build_model, save_hf

PRINTABLE = "".join(chr(c) for c in range(32, 127))
TEXTS = [
    "What is 3 + 4?\nA: 7",
    "a , b .  c\n\n  (x*y)/2 = -5",  # spaces before punctuation and doubled spaces must survive decoding
    "<answer>42</answer>",
    " leading and trailing \t",
    PRINTABLE,
]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_special_ids_and_default_alphabet_ids(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == VOCAB_SIZE == 4 + 256
    # default alphabet: 4 specials, then digits (4..13), lowercase (14..39), uppercase (40..65), punctuation...
    assert encode(tok, "09azAZ") == [4, 13, 14, 39, 40, 65]
    assert encode(tok, " \n") == [4 + DEFAULT_ALPHABET.index(" "), 4 + DEFAULT_ALPHABET.index("\n")]
    assert max(encode(tok, PRINTABLE + "\n")) == 4 + len(DEFAULT_ALPHABET) - 1 == 99
    assert encode(tok, "<pad><bos><eos>") == [0, 1, 2]  # special tokens written as text are single tokens


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_per_character_and_exact_round_trip(tok, text):
    ids = encode(tok, text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id], skip_special_tokens=True) == text


def test_characters_outside_the_alphabet_never_crash_and_round_trip(tok):
    text = "é × 日本 🙂"
    ids = encode(tok, text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per UTF-8 byte
    assert tok.unk_token_id not in ids and all(0 <= i < VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text


def test_custom_alphabet_orders_ids_and_is_validated():
    small = build_char_tokenizer("0123456789+")
    assert encode(small, "10+") == [5, 4, 14]
    assert len(small) == VOCAB_SIZE and small.decode(encode(small, "7 * x")) == "7 * x"  # other bytes still encode
    with pytest.raises(ValueError, match="ASCII"):
        build_char_tokenizer("ab×")
    with pytest.raises(ValueError, match=r"repeats characters \['a'\]"):
        build_char_tokenizer("aba")
    with pytest.raises(ValueError, match="non-empty"):
        build_char_tokenizer("")


def test_chat_template_through_render_prompt(tok):
    prompt = render_prompt(tok, "What is 3 + 4?")
    assert prompt == "<bos>What is 3 + 4?\nA:"
    assert encode(tok, prompt)[:2] == [1, 4 + DEFAULT_ALPHABET.index("W")]
    assert render_prompt(tok, "3 + 4", system_prompt="Answer.", template="What is {question}?") == (
        "<bos>Answer.\nWhat is 3 + 4?\nA:"
    )
    convo = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": " 2"}]
    full = tok.apply_chat_template(convo, tokenize=False)
    assert full == "<bos>What is 1 + 1?\nA: 2<eos>\n"
    assert full.startswith(render_prompt(tok, "What is 1 + 1?"))  # a trained turn continues the generation prompt


def saved_model_folder(path, model_type):
    """A folder as a checkpoint would hold it: save_hf's config.json + weights, then the tokenizer."""
    cfg = ModelConfig(model_type=model_type, vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, qkv_bias=model_type == "qwen2",
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    save_hf(build_model(cfg, rngs=nnx.Rngs(0)), path)
    return path


@pytest.mark.parametrize("model_type", [None, "qwen2", "llama"])
def test_save_and_auto_load_give_the_same_tokenizer(tok, tmp_path, model_type):
    folder = tmp_path if model_type is None else saved_model_folder(tmp_path, model_type)
    tok.save_pretrained(folder)
    if model_type is not None:
        assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
    loaded = AutoTokenizer.from_pretrained(folder)
    assert len(loaded) == len(tok) and loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    assert loaded.chat_template == tok.chat_template
    for text in TEXTS + ["é × 日本", render_prompt(tok, "What is 12 * 3?")]:
        ids = encode(tok, text)
        assert encode(loaded, text) == ids
        assert loaded.decode(ids) == text
