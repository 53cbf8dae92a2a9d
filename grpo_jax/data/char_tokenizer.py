"""A character-level tokenizer for tiny from-scratch models: one token per ASCII character, built locally.

It is a byte-level BPE with an *empty merge list* in Qwen2's format (transformers' ``Qwen2Tokenizer``): every
UTF-8 byte is one token, so every ASCII character is one token and nothing is ever unknown (a non-ASCII character
becomes its 2-4 byte tokens and decodes back exactly). Being a genuine ``Qwen2Tokenizer`` matters for loading:
transformers 5's ``AutoTokenizer`` rebuilds the tokenizer of a folder whose config.json says ``model_type: qwen2``
as a ``Qwen2Tokenizer`` whatever tokenizer_config.json declares (qwen2 is on its list of hub repos with a wrong
``tokenizer_class``), keeping only the vocab and merges; a WordLevel tokenizer saved next to a qwen2 model would come
back with different ids. This one comes back identical from any loader.

Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3 (declared so no loader adds a token of its own; never
produced by encoding), then the ``alphabet`` characters in order, then the remaining bytes; 260 tokens in all.
"""
from __future__ import annotations

import string

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# <bos>, then each turn on its own line: system / user text as is, assistant text after "A:" and closed by <eos>.
# The generation prompt is the assistant marker, so a prompt reads "<bos>What is 3 + 4?\nA:".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}A:{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def build_char_tokenizer(alphabet: str | None = None):
    """The character tokenizer (a ``transformers.PreTrainedTokenizerFast``; concretely a ``Qwen2Tokenizer``).

    ``alphabet``: ASCII characters given the ids right after the special tokens, in this order (default: digits,
    lowercase, uppercase, ASCII punctuation, space, newline). All other bytes still get a token after them, so the
    vocabulary is always ``VOCAB_SIZE``; the alphabet only fixes which ids are small and stable.
    ``decode(encode(text)) == text`` for any NFC-normalised text (the tokenizer normalises to NFC, as Qwen2's does).
    """
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"build_char_tokenizer needs transformers >= 5 (Qwen2Tokenizer built from a vocab dict and "
                          f"a merge list); found {transformers.__version__}")
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2 import Qwen2Tokenizer

    alphabet = DEFAULT_ALPHABET if alphabet is None else alphabet
    if not alphabet:
        raise ValueError("alphabet must be a non-empty string of ASCII characters (or None for the default)")
    non_ascii = sorted({c for c in alphabet if ord(c) > 127})
    if non_ascii:
        raise ValueError(f"alphabet must hold ASCII characters only (others are encoded as bytes), got {non_ascii}")
    if len(set(alphabet)) != len(alphabet):
        repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
        raise ValueError(f"alphabet repeats characters {repeated}; each character must appear once")
    byte_symbol = bytes_to_unicode()  # byte -> the printable character byte-level BPE stores it as
    symbols = [byte_symbol[ord(c)] for c in alphabet]
    chosen = set(symbols)
    symbols += [s for _, s in sorted(byte_symbol.items()) if s not in chosen]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(symbols))}
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,  # the default would turn " ," into ","
        chat_template=CHAT_TEMPLATE,
    )
