"""The offline character-level chat tokenizer and `load_tokenizer`."""

import os
import re

import pytest
from transformers import AutoTokenizer

from rlhf_jax.data.tokenize import load_tokenizer
from rlhf_jax.testing.tokenizer import (
    OFFLINE_SPECIAL_TOKENS,
    OFFLINE_VOCAB_SIZE,
    offline_tokenizer,
    save_offline_tokenizer,
)

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "12+7="},
    {"role": "assistant", "content": "19"},
]


def test_vocabulary_layout():
    tok = offline_tokenizer()
    assert OFFLINE_VOCAB_SIZE == 104 == tok.vocab_size == len(tok)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(list(OFFLINE_SPECIAL_TOKENS)) == list(range(7))
    # "\n" = 7, "\t" = 8, then printable ASCII in code order: " " = 9, "0" = 9 + 16, "a" = 9 + 65.
    assert tok("\n\t 0a~", add_special_tokens=False).input_ids == [7, 8, 9, 25, 74, 103]
    assert tok("é", add_special_tokens=False).input_ids == [3]
    assert tok("abc").input_ids == [74, 75, 76]  # nothing added automatically
    assert tok.padding_side == "right"


def test_special_tokens_are_atomic_and_decode():
    tok = offline_tokenizer()
    ids = tok("<bos><|user|>hi<|assistant|>ok<eos>", add_special_tokens=False).input_ids
    assert ids == [1, 5, 81, 82, 6, 88, 84, 2]
    assert tok.decode(ids) == "<bos><|user|>hi<|assistant|>ok<eos>"
    assert tok.decode(ids, skip_special_tokens=True) == "hiok"


def test_chat_template_renders_exactly():
    tok = offline_tokenizer()
    assert (
        tok.apply_chat_template(CONVERSATION, tokenize=False)
        == "<bos><|system|>be brief<|user|>12+7=<|assistant|>19<eos>"
    )
    assert (
        tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
        == "<bos><|system|>be brief<|user|>12+7=<|assistant|>"
    )
    # The generation tags mark the assistant content and its EOS.
    out = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert out["assistant_masks"] == [0] * 17 + [1, 1, 1]  # 1+1+8+1+5+1 context tokens


def test_chat_template_rejects_unknown_role():
    with pytest.raises(Exception, match="unknown role 'tool'"):
        offline_tokenizer().apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_saved_directory_loads_with_auto_tokenizer(tmp_path):
    path = save_offline_tokenizer(tmp_path / "tok")
    for loaded in (AutoTokenizer.from_pretrained(path), load_tokenizer(path)):
        text = "<bos><|user|>Hello, World!\n<|assistant|>x<eos>"
        assert loaded(text).input_ids == offline_tokenizer()(text).input_ids
        assert loaded.apply_chat_template(
            CONVERSATION, tokenize=False
        ) == offline_tokenizer().apply_chat_template(CONVERSATION, tokenize=False)
        assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, len(loaded)) == (
            0,
            1,
            2,
            OFFLINE_VOCAB_SIZE,
        )


def test_load_tokenizer_only_reads_local_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen2.5-0.5B"):
        load_tokenizer("Qwen/Qwen2.5-0.5B")
    with pytest.raises(OSError, match=str(tmp_path)):
        load_tokenizer(tmp_path)  # a directory without a tokenizer


def test_a_tokenizer_directory_without_its_config_is_refused_by_name(tmp_path):
    """Without tokenizer_config.json, transformers loads tokenizer.json with no special-token roles:
    no EOS (sampling would never stop), no pad, no chat template. load_tokenizer names the file."""
    path = save_offline_tokenizer(tmp_path / "tok")
    os.remove(os.path.join(path, "tokenizer_config.json"))
    assert AutoTokenizer.from_pretrained(path).eos_token is None  # what a silent load would give
    with pytest.raises(OSError, match=f"load_tokenizer: {re.escape(os.path.join(path, 'tokenizer_config.json'))} "
                                      "is missing, so the tokenizer .* has no EOS, pad or BOS token"):
        load_tokenizer(path)
