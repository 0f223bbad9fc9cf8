"""Tokenization: loss masks token by token, EOS exactly once, truncation, batched == one by one."""

import copy

import numpy as np
import pytest

from rlhf_jax.data import BatchConfig, BatchIterator, TokenizeConfig, load_dataset, tokenize_sequences
from rlhf_jax.data.formats import Chat, DataError, Plain
from rlhf_jax.testing.tokenizer import offline_tokenizer

BOS, EOS, SYS, USER, ASSIST = 1, 2, 4, 5, 6


def ids(text):
    """Offline-tokenizer ids of printable ASCII text, computed independently of the tokenizer."""
    return [7 if c == "\n" else 9 + ord(c) - 32 for c in text]


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def one(spec, tokenizer=None, **config):
    config.setdefault("max_len", 64)
    (out,) = tokenize_sequences([spec], tokenizer or offline_tokenizer(), TokenizeConfig(**config))
    return out


def test_chat_masks_token_by_token_in_a_batch():
    rows = [{"prompt": [user("12+7=")], "completion": [assistant("19")]}]
    dataset = load_dataset(rows, kind="sft", tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=16))
    batch = next(
        BatchIterator(
            dataset, BatchConfig(batch_size=1, seq_len=16, shuffle=False), process_index=0, process_count=1
        )
    )
    expected = [BOS, USER, *ids("12+7="), ASSIST, *ids("19"), EOS]
    assert len(expected) == 11
    np.testing.assert_array_equal(batch["tokens"][0], expected + [0] * 5)
    # Prompt (incl. BOS, role markers) masked; completion and EOS unmasked; padding masked.
    np.testing.assert_array_equal(batch["loss_mask"][0], [0] * 8 + [1, 1, 1] + [0] * 5)
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 11 + [0] * 5)
    np.testing.assert_array_equal(batch["positions"][0], list(range(11)) + [0] * 5)
    assert batch["loss_mask"].dtype == np.float32 and batch["tokens"].dtype == np.int32


def test_plain_strings_use_no_template():
    out = one(Plain("12+7=", "19"))
    assert out.ids == [BOS, *ids("12+7="), *ids("19"), EOS]
    assert out.mask == [False] * 6 + [True] * 3
    assert out.prompt_len == 6 and not out.truncated


def test_text_layout_trains_everything_but_the_first_token():
    out = one(Plain("", "hi"))
    assert out.ids == [BOS, *ids("hi"), EOS]
    assert out.mask == [False, True, True, True]


def test_multi_turn_masks_every_assistant_turn():
    messages = ({"role": "system", "content": "s"}, user("a"), assistant("bc"), user("d"), assistant("e"))
    out = one(Chat(messages, 0))
    assert out.ids == [
        BOS,
        SYS,
        *ids("s"),
        USER,
        *ids("a"),
        ASSIST,
        *ids("bc"),
        EOS,
        USER,
        *ids("d"),
        ASSIST,
        *ids("e"),
        EOS,
    ]
    assert [int(m) for m in out.mask] == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1]
    # Context turns before num_context are never trained on, even the assistant ones.
    out = one(Chat(messages, 3))
    assert [int(m) for m in out.mask] == [0] * 12 + [1, 1]


def test_prompt_only_chat_gets_the_generation_prompt():
    out = one(Chat((user("hi"),), 1))
    assert out.ids == [BOS, USER, *ids("hi"), ASSIST]
    assert not any(out.mask) and out.prompt_len == 5


def _with_template(template):
    tok = copy.deepcopy(offline_tokenizer())
    tok.chat_template = template
    return tok


def test_eos_exactly_once_whatever_the_template_does():
    conv = Chat((user("q"), assistant("a")), 1)
    # A template that never writes EOS: it is appended.
    no_eos = _with_template(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}>{% endif %}{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    out = one(conv, no_eos)
    assert out.ids == [*ids("q\n>"), *ids("a\n"), EOS]
    assert out.mask == [False] * 3 + [True] * 3
    # A template that writes text after EOS (like "<|im_end|>\n"): the tail is dropped.
    tail = _with_template(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}>{{ m['content'] }}{{ eos_token }}\n"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    out = one(conv, tail)
    assert out.ids == [*ids("q>"), *ids("a"), EOS]
    for spec in (conv, Plain("q", "a"), Chat((user("q"), assistant("a"), user("r"), assistant("b")), 0)):
        out = one(spec)
        turns = sum(m["role"] == "assistant" for m in spec.messages) if isinstance(spec, Chat) else 1
        assert out.ids.count(EOS) == turns and out.ids[-1] == EOS


def test_eos_inside_the_completion_text_is_rejected():
    assert "contains the EOS token '<eos>'" in one(Plain("q", "a<eos>b"))
    assert "contains the EOS token" in one(Chat((user("q"), assistant("a<eos>")), 1))


def test_template_problems_are_reported():
    assert "unknown role 'tool'" in one(Chat(({"role": "tool", "content": "x"}, assistant("a")), 1))
    # A template that renders the latest message first is not prefix-stable.
    reverse = _with_template(
        "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    assert "not prefix-stable at message 1" in one(Chat((user("q"), assistant("a")), 1), reverse)


@pytest.mark.parametrize(
    "config, expected_ids, expected_mask, truncated",
    [
        # prompt = BOS abcdefgh (9 tokens), completion = xyz EOS (4 tokens)
        (dict(max_len=64), [BOS, *ids("abcdefgh"), *ids("xyz"), EOS], [0] * 9 + [1] * 4, False),
        (
            dict(max_len=64, max_prompt_len=5, truncation="keep_end"),
            [BOS, *ids("efgh"), *ids("xyz"), EOS],
            [0] * 5 + [1] * 4,
            True,
        ),
        (
            dict(max_len=64, max_prompt_len=5, truncation="keep_start"),
            [BOS, *ids("abcd"), *ids("xyz"), EOS],
            [0] * 5 + [1] * 4,
            True,
        ),
        (
            dict(max_len=11, truncation="keep_start"),
            [BOS, *ids("abcdefgh"), *ids("xy")],
            [0] * 9 + [1] * 2,
            True,
        ),
        (
            dict(max_len=11, truncation="keep_end"),
            [BOS, *ids("cdefgh"), *ids("xyz"), EOS],
            [0] * 7 + [1] * 4,
            True,
        ),
        (
            dict(max_len=9, max_prompt_len=4, truncation="keep_end"),
            [BOS, *ids("fgh"), *ids("xyz"), EOS],
            [0] * 4 + [1] * 4,
            True,
        ),
    ],
)
def test_truncation(config, expected_ids, expected_mask, truncated):
    out = one(Plain("abcdefgh", "xyz"), **config)
    assert out.ids == expected_ids
    assert [int(m) for m in out.mask] == expected_mask
    assert out.truncated == truncated and out.prompt_len == expected_mask.index(1)


def test_keep_end_can_cut_into_a_long_completion():
    out = one(Plain("ab", "0123456789"), max_len=6, truncation="keep_end")
    assert out.ids == [BOS, *ids("6789"), EOS]
    assert out.mask == [False] + [True] * 5 and out.prompt_len == 1


def test_prompt_without_room_for_a_completion():
    assert one(Plain("abcdefgh", "xyz"), max_len=9) == (
        "the prompt has 9 tokens, leaving no room for a completion within max_len=9"
    )


def test_batched_equals_one_by_one_and_shares_work():
    specs = [
        Plain("p", "a"),
        Chat((user("q"), assistant("a")), 1),
        Chat((user("q"), assistant("b")), 1),  # shares its prompt render with the previous one
        Chat((user("q"), assistant("a"), user("r"), assistant("c")), 0),
        Plain("p", "a"),
        Chat((user("q"),), 1),
    ]
    together = tokenize_sequences(specs, offline_tokenizer(), TokenizeConfig(max_len=32))
    for spec, joint in zip(specs, together):
        alone = one(spec, max_len=32)
        assert joint.ids == alone.ids and joint.mask == alone.mask


def test_string_format_chat_wraps_strings_in_the_template():
    rows = [{"prompt": "12+7=", "completion": "19"}]
    dataset = load_dataset(
        rows,
        kind="sft",
        tokenizer=offline_tokenizer(),
        config=TokenizeConfig(max_len=16, string_format="chat"),
    )
    assert dataset.arrays["tokens"][0].tolist() == [BOS, USER, *ids("12+7="), ASSIST, *ids("19"), EOS]


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="max_prompt_len"):
        TokenizeConfig(max_len=8, max_prompt_len=8)
    with pytest.raises(ValueError, match="truncation"):
        TokenizeConfig(max_len=8, truncation="left")
    with pytest.raises(ValueError, match="max_len"):
        TokenizeConfig(max_len=1)


def test_tokenizer_without_bos():
    tok = copy.deepcopy(offline_tokenizer())
    tok.bos_token = None  # like Qwen: nothing is prepended to plain text
    out = one(Plain("abcdefgh", "xyz"), tok, max_len=9, truncation="keep_end")
    assert out.ids == [*ids("defgh"), *ids("xyz"), EOS] and out.prompt_len == 5
    out = one(Plain("", "hi"), tok)  # the first token is never a target, even in the text layout
    assert out.ids == [*ids("hi"), EOS] and out.mask == [False, True, True]


def test_a_tokenizer_left_padding_by_a_batch_call_does_not_pad_pieces():
    """`tokenizer(texts, padding=True)` switches padding on in the shared backend; tokenizing still gives
    the same ids, and the backend's padding setting is left as it was."""
    tok = offline_tokenizer()
    rows = [{"prompt": "ab", "completion": "cdefgh"}]
    before = load_dataset(rows, kind="sft", tokenizer=tok, config=TokenizeConfig(max_len=32)).arrays["tokens"][0]
    tok(["a", "abcdef"], padding=True)
    assert tok.backend_tokenizer.padding is not None
    after = load_dataset(rows, kind="sft", tokenizer=tok, config=TokenizeConfig(max_len=32)).arrays["tokens"][0]
    np.testing.assert_array_equal(after, before)
    assert tok.pad_token_id not in list(after)
    assert tok.backend_tokenizer.padding is not None
    tok.backend_tokenizer.no_padding()


def test_a_plain_text_that_starts_with_bos_gets_one_bos():
    # TRL keeps a BOS the text already has rather than adding a second one.
    assert one(Plain("<bos>hi", "yo")).ids == [BOS, *ids("hi"), *ids("yo"), EOS]
    out = one(Plain("", "<bos>ab"))  # the `text` layout, pre-rendered with its BOS
    assert out.ids == [BOS, *ids("ab"), EOS]
    assert out.mask == [False, True, True, True]
    assert one(Plain("hi", "yo")).ids == [BOS, *ids("hi"), *ids("yo"), EOS]  # unchanged without one


def test_message_content_already_rendered_with_the_template_is_rejected():
    rendered = {"role": "user", "content": "<bos><|user|>hi<|assistant|>"}
    problem = one(Chat((rendered, assistant("yo")), 1))
    assert isinstance(problem, str)
    assert "message 0 (user)" in problem and "'<bos>'" in problem and "templated twice" in problem
    # string_format="chat" wraps pre-rendered strings in the template: rejected, with the row named
    rows = [{"prompt": "<|user|>hi<|assistant|>", "completion": "yo"}]
    with pytest.raises(DataError, match=r"<rows> row 0: message 0 \(user\) .*'<\|user\|>'"):
        load_dataset(rows, kind="sft", tokenizer=offline_tokenizer(),
                     config=TokenizeConfig(max_len=32, string_format="chat"))
    # plain text keeps its markers as written (TRL's standard format)
    rows = [{"prompt": "<|user|>hi<|assistant|>", "completion": "yo"}]
    dataset = load_dataset(rows, kind="sft", tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=32))
    assert list(dataset.arrays["tokens"][0]) == [BOS, USER, *ids("hi"), ASSIST, *ids("yo"), EOS]


def test_truncated_sequences_are_reported_in_a_warning(caplog):
    rows = [{"prompt": "x" * 20, "completion": "abc"}, {"prompt": "q", "completion": "abc"}]
    with caplog.at_level("WARNING", logger="rlhf_jax.data"):
        dataset = load_dataset(rows, kind="sft", tokenizer=offline_tokenizer(),
                               config=TokenizeConfig(max_len=16, max_prompt_len=8))
    assert dataset.num_truncated == 1
    assert [r.getMessage() for r in caplog.records] == [
        "rlhf_jax.data: <rows>: 2 rows read, 2 sft examples, 1 sequences truncated"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlhf_jax.data"):
        load_dataset(rows[1:], kind="sft", tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=16))
    assert caplog.records == []


# A template that lists the tools first (as Qwen's system turn does), in the offline template's format.
TOOLS_TEMPLATE = (
    "{{- bos_token -}}{%- if tools -%}{{- '<|system|>tools:' -}}"
    "{%- for t in tools -%}{{- t['function']['name'] ~ ';' -}}{%- endfor -%}{%- endif -%}"
    "{%- for m in messages -%}{{- '<|' ~ m['role'] ~ '|>' ~ m['content'] -}}"
    "{%- if m['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
SCHEMAS = ({"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}},
           {"type": "function", "function": {"name": "ab", "parameters": {"type": "object"}}})


def test_tools_are_rendered_into_every_chat_render_and_nothing_else_changes():
    tok = _with_template(TOOLS_TEMPLATE)
    messages = [user("12+7=")]
    out = one(Chat(tuple(messages), 1), tok, tools=SCHEMAS)
    text = tok.apply_chat_template(messages, tools=list(SCHEMAS), tokenize=False, add_generation_prompt=True)
    assert text == "<bos><|system|>tools:calc;ab;<|user|>12+7=<|assistant|>"
    assert out.ids == tok(text, add_special_tokens=False)["input_ids"] == \
        [BOS, SYS, *ids("tools:calc;ab;"), USER, *ids("12+7="), ASSIST]
    assert not any(out.mask) and not out.truncated
    # Trained turns of a conversation are located in the renders with tools too.
    sft = one(Chat((user("q"), assistant("a")), 1), tok, tools=SCHEMAS)
    assert sft.ids == [BOS, SYS, *ids("tools:calc;ab;"), USER, *ids("q"), ASSIST, *ids("a"), EOS]
    assert sft.prompt_len == 19 and sft.mask == [False] * 19 + [True] * 2
    # No tools (None, or none offered: the template gets tools=None): the plain render; plain text untemplated.
    for tools in (None, ()):
        assert one(Chat(tuple(messages), 1), tok, tools=tools).ids == [BOS, USER, *ids("12+7="), ASSIST]
    assert one(Plain("12+7=", "19"), tok, tools=SCHEMAS).ids == [BOS, *ids("12+7="), *ids("19"), EOS]


@pytest.mark.parametrize("truncation", ["keep_end", "keep_start"])
def test_a_prompt_rendered_with_tools_is_never_cut(truncation):
    tok = _with_template(TOOLS_TEMPLATE)
    prompt = Chat((user("12+7="),), 1)  # 23 tokens with the tools
    assert one(prompt, tok, tools=SCHEMAS, max_prompt_len=22, truncation=truncation) == (
        "the prompt rendered with the chat template and the agent's tools has 23 tokens, more than "
        "max_prompt_len=22; it is not cut (that would drop the tool list or the generation prompt): raise "
        "max_prompt_len or shorten the prompt")
    assert one(prompt, tok, tools=(), max_prompt_len=5, truncation=truncation).startswith(
        "the prompt rendered with the chat template and the agent's tools has 8 tokens, more than max_prompt_len=5;")
    assert one(prompt, tok, tools=SCHEMAS, max_len=23) == (
        "the prompt has 23 tokens, leaving no room for a completion within max_len=23")
    fits = one(prompt, tok, tools=SCHEMAS, max_prompt_len=23, truncation=truncation)
    assert fits.prompt_len == 23 and not fits.truncated
    # Without tools the documented truncation applies.
    cut = one(prompt, tok, max_prompt_len=5, truncation=truncation)
    assert cut.truncated and cut.prompt_len == 5
    # A conversation over max_len: keep_end would cut the prompt's start (refused), keep_start cuts the completion.
    sft = Chat((user("q"), assistant("abcd")), 1)  # 19 prompt tokens + 5 trained
    out = one(sft, tok, tools=SCHEMAS, max_len=20, truncation=truncation)
    if truncation == "keep_end":
        assert out == ("the conversation rendered with the chat template and the agent's tools has 24 tokens, "
                       "more than max_len=20; keep_end would cut its prompt (the tool list) at the start")
    else:
        assert out.ids[:19] == [BOS, SYS, *ids("tools:calc;ab;"), USER, *ids("q"), ASSIST]
        assert len(out.ids) == 20 and out.truncated


def test_tools_must_be_schema_mappings():
    with pytest.raises(ValueError, match=r"^TokenizeConfig.tools must be None or a sequence of JSON schema "
                                         r"mappings, got 'calc'$"):
        TokenizeConfig(max_len=8, tools="calc")
    assert TokenizeConfig(max_len=8, tools=list(SCHEMAS)).tools == SCHEMAS


# --- real-format templates, compared token by token with transformers' assistant masks -----------
# Small tokenizers trained here (no download): byte-level BPE with the Qwen2 / Llama-3 split regex, and a
# SentencePiece-style BPE (Metaspace, "▁" prefixed to the first word of a text) as Llama-2 / Mistral use.
# The templates are the public Qwen2.5 / Llama-3 / Mistral formats with `{% generation %}` marks added
# around what TRL's assistant_only_loss trains (content + end-of-turn token).

_CORPUS = ["You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
           "system user assistant Hello world! What is 12+7? The answer is 19. be brief",
           "[INST] hi [/INST] answer", "  \n\n think   about it"] * 20
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if message.role == 'user' "
    "or (message.role == 'system' and not loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + "
    "message.content + '<|im_end|>\\n' }}{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{% for message in messages %}{% set header = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' %}{% if loop.index0 == 0 %}{% set header = bos_token + header %}{% endif %}"
    "{{ header }}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + "
    "'<|eot_id|>' }}{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}"
    "{% endgeneration %}{% endif %}{% endfor %}"
)


def _trained_tokenizer(kind):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "mistral":
        specials = ["<unk>", "<s>", "</s>"]
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    else:
        specials = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if kind == "qwen" else
                    ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                             initial_alphabet=alphabet, show_progress=False))
    options = {
        "qwen": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN25),
        "llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3),
        "mistral": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=MISTRAL),
    }[kind]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **options)


@pytest.mark.parametrize("kind", ["qwen", "llama3", "mistral"])
def test_multi_turn_masks_equal_transformers_assistant_masks(kind):
    """Every assistant turn trained (content + end-of-turn token), nothing of system/user turns or the
    assistant header, the same ids as the whole render: as `return_assistant_tokens_mask` gives. Before,
    Qwen's "\\n" after an inner turn's <|im_end|> was trained, and Mistral's "[/INST]" + "The ..." became
    "▁The" (the piece encoded as the start of a text)."""
    tok = _trained_tokenizer(kind)
    messages = [{"role": "system", "content": "be brief"}, user("What is 12+7?"), assistant("The answer is 19."),
                user("Hello"), assistant("Hello world!")]
    if kind == "mistral":
        messages = messages[1:]
    ref = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    out = one(Chat(tuple(messages), 0), tok, max_len=128)
    expected_ids, expected_mask = ref["input_ids"], ref["assistant_masks"]
    if kind == "qwen":  # the template's "\n" after the last <|im_end|> (the EOS) is dropped: EOS ends the row
        assert tok.convert_ids_to_tokens(expected_ids[-2:]) == ["<|im_end|>", "Ċ"]
        expected_ids, expected_mask = expected_ids[:-1], expected_mask[:-1]
    assert out.ids == expected_ids
    assert [int(m) for m in out.mask] == expected_mask
    assert out.ids[-1] == tok.eos_token_id and out.prompt_len == expected_mask.index(1)


def test_a_completion_after_a_prompt_is_encoded_as_a_continuation():
    """A SentencePiece-style tokenizer marks the first word of a text with "▁": a completion piece gets
    none (as in the whole text, and as sampled after the prompt); the prompt's first word keeps its own."""
    tok = _trained_tokenizer("mistral")
    out = one(Plain("12+7=", "19"), tok)
    assert tok.convert_ids_to_tokens(out.ids) == ["<s>", *tok.tokenize("12+7=19"), "</s>"]
    assert tok.convert_ids_to_tokens(out.ids)[1].startswith("▁")
    assert tok.convert_ids_to_tokens(one(Plain("", "Hello world!"), tok).ids) == ["<s>", "▁Hello", "▁world!", "</s>"]
    # prompt/completion rows as TRL builds them: the prompt rendered with the generation prompt
    (prompt,) = tokenize_sequences([Chat((user("hi"),), 1)], tok, TokenizeConfig(max_len=64))
    pair = tokenize_sequences([Chat((user("hi"), assistant("The answer")), 1),
                               Chat((user("hi"), assistant("answer")), 1)], tok, TokenizeConfig(max_len=64))
    for seq, completion in zip(pair, ("The answer", "answer")):
        assert seq.ids[: seq.prompt_len] == prompt.ids  # chosen and rejected share the prompt's tokens
        assert tok.decode(seq.ids[seq.prompt_len :]) == completion + "</s>"
        assert not tok.convert_ids_to_tokens(seq.ids[seq.prompt_len]).startswith("▁")


def test_a_leading_assistant_message_the_template_cannot_follow_is_named():
    problem = one(Chat((assistant("Hi!"), user("q"), assistant("a")), 0), _trained_tokenizer("qwen"))
    assert problem.startswith("the chat template cannot render the empty conversation before the leading "
                              "assistant message 0 (the text its trained tokens follow): ")
    # a template that can render it (the offline one: "<bos>") trains the leading turn as usual
    out = one(Chat((assistant("hi"), user("q"), assistant("a")), 0))
    assert out.ids == [BOS, ASSIST, *ids("hi"), EOS, USER, *ids("q"), ASSIST, *ids("a"), EOS]
    assert [int(m) for m in out.mask] == [0, 0, 1, 1, 1, 0, 0, 0, 1, 1]
