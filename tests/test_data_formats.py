"""Row formats: every layout users have parses to the right example; bad rows name file, line, problem."""

import json
import logging

import numpy as np
import pytest

from rlhf_jax.data import DataError, RowRef, TokenizeConfig, load_dataset, parse_row
from rlhf_jax.data.formats import (
    Chat,
    Plain,
    PreferenceExample,
    PromptExample,
    SFTExample,
    UnpairedExample,
)
from rlhf_jax.testing.tokenizer import offline_tokenizer

REF = RowRef("d.jsonl", 3, "line")
U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
B = {"role": "assistant", "content": "b"}


@pytest.mark.parametrize(
    "kind, row, expected",
    [
        ("sft", {"prompt": "q", "completion": "a"}, SFTExample(Plain("q", "a"))),
        ("sft", {"messages": [U, A]}, SFTExample(Chat((U, A), 0))),
        ("sft", {"prompt": [U], "completion": [A]}, SFTExample(Chat((U, A), 1))),
        ("sft", {"prompt": "q", "completion": [A]}, SFTExample(Chat((U, A), 1))),
        ("sft", {"text": "hello"}, SFTExample(Plain("", "hello"))),
        (
            "preference",
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            PreferenceExample(Plain("q", "a"), Plain("q", "b"), 0.0),
        ),
        (
            "preference",
            {"prompt": [U], "chosen": [A], "rejected": [B], "margin": 1.5},
            PreferenceExample(Chat((U, A), 1), Chat((U, B), 1), 1.5),
        ),
        (  # UltraFeedback-binarized style: whole conversations, the prompt column is not read
            "preference",
            {"prompt": "q", "chosen": [U, A], "rejected": [U, B], "score_chosen": 8.0},
            PreferenceExample(Chat((U, A), 1), Chat((U, B), 1), 0.0),
        ),
        (
            "preference",
            {"chosen": [U, A], "rejected": [U, B], "margin": "0.25"},
            PreferenceExample(Chat((U, A), 1), Chat((U, B), 1), 0.25),
        ),
        (
            "unpaired",
            {"prompt": "q", "completion": "a", "label": True},
            UnpairedExample(Plain("q", "a"), True),
        ),
        ("unpaired", {"prompt": "q", "completion": "a", "label": 0}, UnpairedExample(Plain("q", "a"), False)),
        (
            "unpaired",
            {"prompt": "q", "completion": "a", "label": "True"},
            UnpairedExample(Plain("q", "a"), True),
        ),
        (
            "prompt",
            {"prompt": "1+1=", "answer": "2", "id": 7},
            PromptExample(Plain("1+1=", None), {"answer": "2", "id": 7}),
        ),
        ("prompt", {"prompt": [U]}, PromptExample(Chat((U,), 1), {})),
    ],
)
def test_layouts(kind, row, expected):
    assert parse_row(row, kind, REF) == expected


def test_string_format_chat():
    example = parse_row(
        {"prompt": "q", "chosen": "a", "rejected": "b"}, "preference", REF, string_format="chat"
    )
    assert example == PreferenceExample(Chat((U, A), 1), Chat((U, B), 1), 0.0)


@pytest.mark.parametrize(
    "kind, row, problem",
    [
        (
            "sft",
            {"question": "q"},
            "missing column: an SFT row needs 'prompt' and 'completion', 'messages', or 'text'; found columns ['question']",
        ),
        ("sft", {"prompt": "q"}, "missing column 'completion'; found columns ['prompt']"),
        ("sft", {"prompt": "q", "completion": ""}, "column 'completion' is empty"),
        (
            "sft",
            {"prompt": "q", "completion": 5},
            "column 'completion' must be a string or a list of messages, got int 5",
        ),
        ("sft", {"prompt": [U], "completion": "a"}, "column 'prompt' is list"),
        (
            "sft",
            {"messages": [U, {"role": "wizard", "content": "x"}]},
            "messages[1] has unknown role 'wizard'; expected one of ['system', 'user', 'assistant']",
        ),
        (
            "sft",
            {"messages": [U, {"role": "assistant", "content": None}]},
            "messages[1] (assistant) content must be a string, got NoneType None",
        ),
        (
            "sft",
            {"messages": [U, {"role": "assistant", "content": " "}]},
            "messages[1] (assistant) content is empty",
        ),
        (
            "sft",
            {"messages": [A, U]},
            "column 'messages' must end with an assistant message, got role 'user'",
        ),
        ("sft", {"messages": []}, "column 'messages' must be a non-empty list of messages"),
        ("preference", {"prompt": "q", "chosen": "a"}, "missing column 'rejected'"),
        (
            "preference",
            {"prompt": "q", "chosen": "a", "rejected": "a"},
            "'chosen' and 'rejected' are identical",
        ),
        (
            "preference",
            {"prompt": "q", "chosen": "a", "rejected": [B]},
            "must both be strings or both message lists",
        ),
        (
            "preference",
            {"chosen": [U, A], "rejected": [{"role": "user", "content": "z"}, B]},
            "conversations 'chosen' and 'rejected' differ from their first message: no shared prompt",
        ),
        (
            "preference",
            {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"},
            "column 'margin' must be a finite number",
        ),
        ("unpaired", {"prompt": "q", "completion": "a"}, "missing column 'label'"),
        ("unpaired", {"prompt": "q", "completion": "a", "label": "maybe"}, "column 'label' must be a bool"),
        ("prompt", {"prompt": ""}, "column 'prompt' is empty"),
        ("sft", ["q", "a"], "a row must be an object mapping column names to values, got list"),
    ],
)
def test_bad_rows_name_the_row_and_the_problem(kind, row, problem):
    with pytest.raises(DataError) as info:
        parse_row(row, kind, REF)
    assert str(info.value).startswith("d.jsonl line 3: ")
    assert problem in str(info.value)
    assert info.value.ref == REF


# The acceptance list, through a real file: every bad line is named with its number.
GOOD = {"prompt": "q", "chosen": "a", "rejected": "b"}
BAD_LINES = [
    (
        '{"prompt": "q", "chosen": "a", ',
        "malformed JSON: Expecting property name enclosed in double quotes at column 32",
    ),
    (json.dumps({"prompt": "q", "chosen": "a"}), "missing column 'rejected'"),
    (json.dumps({"prompt": "q", "chosen": "", "rejected": "b"}), "column 'chosen' is empty"),
    (
        json.dumps({"prompt": "q", "chosen": 3, "rejected": "b"}),
        "'chosen' and 'rejected' must both be strings",
    ),
    (json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}), "'chosen' and 'rejected' are identical"),
    (
        json.dumps({"prompt": [{"role": "bot", "content": "q"}], "chosen": [A], "rejected": [B]}),
        "unknown role 'bot'",
    ),
    (
        json.dumps({"prompt": "x" * 40, "chosen": "a", "rejected": "b"}),
        "chosen: the prompt has 41 tokens, leaving no room for a completion within max_len=32",
    ),
]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad, problem", BAD_LINES)
def test_bad_input_raises_with_file_and_line(tmp_path, bad, problem):
    path = _write(tmp_path / "prefs.jsonl", [json.dumps(GOOD), "", bad, json.dumps(GOOD)])
    with pytest.raises(DataError) as info:
        load_dataset(
            path, kind="preference", tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=32)
        )
    assert str(info.value).startswith(f"{path} line 3: ")  # the blank line 2 is not a row but counts
    assert problem in str(info.value)


def test_skip_counts_and_reports_every_bad_row(tmp_path, caplog):
    lines = []
    for bad, _ in BAD_LINES:
        lines += [json.dumps(GOOD), bad]
    path = _write(tmp_path / "prefs.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.data"):
        dataset = load_dataset(
            path,
            kind="preference",
            tokenizer=offline_tokenizer(),
            config=TokenizeConfig(max_len=32),
            on_error="skip",
        )
    assert len(dataset) == len(BAD_LINES) and dataset.num_rows == 2 * len(BAD_LINES)
    assert [e.ref.index for e in dataset.skipped] == [2 * i + 2 for i in range(len(BAD_LINES))]
    for error, (_, problem) in zip(dataset.skipped, BAD_LINES):
        assert problem in str(error)
    assert f"{path}: 14 rows read, 7 preference examples, 7 rows skipped" in caplog.text
    assert np.all(dataset.arrays["chosen_tokens"].lengths == 4)  # BOS q a EOS


def test_nothing_usable_is_an_error(tmp_path):
    path = _write(tmp_path / "prefs.jsonl", [json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"})])
    with pytest.raises(
        DataError, match="no usable preference rows \\(1 read, 1 skipped; first problem: .* identical"
    ):
        load_dataset(
            path,
            kind="preference",
            tokenizer=offline_tokenizer(),
            config=TokenizeConfig(max_len=32),
            on_error="skip",
        )


def test_rename_maps_columns():
    rows = [{"question": "1+1=", "solution": "2"}]
    dataset = load_dataset(
        rows,
        kind="prompt",
        tokenizer=offline_tokenizer(),
        config=TokenizeConfig(max_len=16),
        rename={"question": "prompt"},
    )
    assert dataset.columns == {"solution": ["2"]}


def test_prompt_template_puts_each_prompt_in_its_field():
    """GSM8K's question gets verl's "####" instruction; a chat prompt's last user turn gets the boxed one;
    other kinds are untouched; a template without exactly one {prompt} is refused naming the key."""
    from rlhf_jax.config import ConfigError
    from rlhf_jax.train.run_config import DataConfig

    row = {"question": "What is 6*7?", "answer": "#### 42"}
    example = parse_row(row, "prompt", REF, prompt_template="gsm8k")
    assert example.prompt == Plain('What is 6*7? Let\'s think step by step and output the final answer after "####".',
                                   None)
    assert example.columns == {"answer": "#### 42"}
    chat = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1/2+1/4?"}]}
    example = parse_row(chat, "prompt", REF, prompt_template="math_boxed")
    assert example.prompt.messages[0]["content"] == "be brief"
    assert example.prompt.messages[1]["content"] == ("1/2+1/4?\nPlease reason step by step, and put your final "
                                                     "answer within \\boxed{}.")
    custom = parse_row({"prompt": "x"}, "prompt", REF, prompt_template="Q: {prompt} {braces} A:", string_format="chat")
    assert custom.prompt == Chat(({"role": "user", "content": "Q: x {braces} A:"},), 1)
    sft = parse_row({"prompt": "p", "completion": "c"}, "sft", REF, prompt_template="gsm8k")
    assert sft.sequence == Plain("p", "c")
    dataset = load_dataset([row], kind="prompt", tokenizer=offline_tokenizer(),
                           config=TokenizeConfig(max_len=128, prompt_template="Q: {prompt}"))
    ids = dataset.arrays["prompt_tokens"].values
    assert offline_tokenizer().decode(ids, skip_special_tokens=True) == "Q: What is 6*7?"
    with pytest.raises(ConfigError, match=r"data.prompt_template must be one of \['gsm8k', 'math_boxed'\] or a "
                                          r"string with exactly one '\{prompt\}' field, got 'Answer:'"):
        DataConfig(prompt_template="Answer:")
    with pytest.raises(ValueError, match="TokenizeConfig.prompt_template"):
        TokenizeConfig(max_len=8, prompt_template="{prompt}{prompt}")
    # True passed as an int (a prompt of 1 token); now named
    with pytest.raises(ValueError, match=r"TokenizeConfig.max_prompt_len must be None or an int in \[1, "
                                         r"max_len=8\), got True"):
        TokenizeConfig(max_len=8, max_prompt_len=True)
    with pytest.raises(ConfigError, match=r"data.max_prompt_len must be None or an int in \[1, max_len=8\), got True"):
        DataConfig(max_len=8, max_prompt_len=True)


# Messages say what was found (issue 22): a null column is "null", not "missing" while listed as found.
@pytest.mark.parametrize(
    "kind, row, problem",
    [
        ("sft", {"prompt": None, "completion": "a"}, "column 'prompt' is null"),
        ("preference", {"prompt": None, "chosen": "a", "rejected": "b"}, "column 'prompt' is null"),
        ("preference", {"prompt": "q", "chosen": None, "rejected": None}, "column 'chosen', 'rejected' is null"),
        (
            "sft",
            {"prompt": None, "completion": None},
            "column 'prompt', 'completion' is null; an SFT row needs 'prompt' and 'completion', 'messages', "
            "or 'text'",
        ),
        ("unpaired", {"prompt": "q", "completion": "a", "label": None}, "column 'label' is null"),
        ("prompt", {"prompt": None, "answer": "2"}, "column 'prompt' is null"),
    ],
)
def test_a_null_column_is_reported_as_null(kind, row, problem):
    with pytest.raises(DataError) as info:
        parse_row(row, kind, REF)
    assert str(info.value) == f"d.jsonl line 3: {problem}"


@pytest.mark.parametrize(
    "row, problem",
    [
        (
            {"prompt": "q", "chosen": 3, "rejected": "b"},
            "columns 'chosen' and 'rejected' must both be strings or both message lists, got int 3 and str 'b'",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": {"text": "x" * 60}},
            "columns 'chosen' and 'rejected' must both be strings or both message lists, got str 'a' and "
            "dict {'text': 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...",
        ),
        (
            {"prompt": "q", "chosen": 1.5, "rejected": 2.5},
            "columns 'chosen' and 'rejected' must both be strings or both message lists, got float 1.5 and float 2.5",
        ),
    ],
)
def test_a_non_string_completion_names_its_type_and_value(row, problem):
    with pytest.raises(DataError) as info:
        parse_row(row, "preference", REF)
    assert str(info.value) == f"d.jsonl line 3: {problem}"


def test_a_lone_surrogate_or_an_overflowing_margin_is_a_bad_row():
    """JSON escapes can spell text no tokenizer takes, and integers no float holds: both are row errors."""
    row = json.loads('{"prompt": "q\\ud800", "completion": "a"}')
    with pytest.raises(DataError, match=r"d.jsonl line 3: column 'prompt' holds the lone surrogate '\\ud800' at "
                                        r"character 1 \(not valid Unicode text\)"):
        parse_row(row, "sft", REF)
    row = json.loads('{"messages": [{"role": "user", "content": "q", "name": "\\udfff"}, '
                     '{"role": "assistant", "content": "a"}]}')
    with pytest.raises(DataError, match="messages\\[0\\].name holds the lone surrogate"):
        parse_row(row, "sft", REF)
    with pytest.raises(DataError, match="column 'margin' must be a finite number, got int 1000000"):
        parse_row({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 10**400}, "preference", REF)


def test_no_usable_rows_names_the_file_not_a_row(tmp_path):
    path = _write(tmp_path / "prefs.jsonl", [json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"})] * 2)
    with pytest.raises(DataError) as info:
        load_dataset(path, kind="preference", tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=32),
                     on_error="skip")
    assert str(info.value) == (
        f"{path}: no usable preference rows (2 read, 2 skipped; first problem: "
        f"{path} line 1: 'chosen' and 'rejected' are identical)"
    )
    assert info.value.ref == RowRef(str(path), None, "row")
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError) as info:
        load_dataset(empty, kind="sft", tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=32))
    assert str(info.value) == f"{empty}: no usable sft rows (0 read, 0 skipped)"


# Public datasets as they ship (HF hub layouts), through `parse_row` and the tokenizer.
S = {"role": "system", "content": "be brief"}
U2 = {"role": "user", "content": "more?"}
A2 = {"role": "assistant", "content": "a2"}
B2 = {"role": "assistant", "content": "b2"}


def test_ultrafeedback_binarized_row_renders_the_user_turn_once():
    """HuggingFaceH4/ultrafeedback_binarized repeats the prompt as the first message of `chosen` and
    `rejected`: the chosen sequence is the template's render of [user, assistant], once, with only the
    answer (and EOS) trained, the same arrays as TRL's explicit layout of the same pair."""
    tok = offline_tokenizer()
    user = {"role": "user", "content": "What is 2+2?"}
    good, bad = {"role": "assistant", "content": "4."}, {"role": "assistant", "content": "5."}
    row = {"prompt": "What is 2+2?", "prompt_id": "9f2c", "chosen": [user, good], "rejected": [user, bad],
           "messages": [user, good], "score_chosen": 9.0, "score_rejected": 3.0}
    explicit = {"prompt": [user], "chosen": [good], "rejected": [bad]}
    config = TokenizeConfig(max_len=128)
    dataset = load_dataset([row], kind="preference", tokenizer=tok, config=config)
    ids = dataset.arrays["chosen_tokens"].values.tolist()
    assert ids == tok.apply_chat_template([user, good])["input_ids"]
    prompt_len = len(tok.apply_chat_template([user], add_generation_prompt=True)["input_ids"])
    assert dataset.arrays["chosen_loss_mask"].values.tolist() == [False] * prompt_len + [True] * (len(ids) - prompt_len)
    assert tok.decode(ids[prompt_len:]) == "4.<eos>"
    same = load_dataset([explicit], kind="preference", tokenizer=tok, config=config)
    for name in ("chosen_tokens", "chosen_loss_mask", "rejected_tokens", "rejected_loss_mask"):
        assert np.array_equal(dataset.arrays[name].values, same.arrays[name].values), name


def test_an_explicit_prompt_with_multi_turn_completions_keeps_the_prompt():
    """TRL's explicit layout allows completions of several turns. Before, a `chosen` holding a user turn
    was read as a whole conversation: the prompt column (here with its system turn) was dropped without a
    word and only the last answer trained, or the row was refused as differing before its last answer."""
    same_first = {"prompt": [S, U], "chosen": [A, U2, A2], "rejected": [A, U2, B2]}
    assert parse_row(same_first, "preference", REF) == PreferenceExample(
        Chat((S, U, A, U2, A2), 2), Chat((S, U, A, U2, B2), 2), 0.0
    )
    differ_first = {"prompt": [S, U], "chosen": [A, U2, A2], "rejected": [B, U2, B2]}
    assert parse_row(differ_first, "preference", REF) == PreferenceExample(
        Chat((S, U, A, U2, A2), 2), Chat((S, U, B, U2, B2), 2), 0.0
    )


def test_an_implicit_prompt_is_the_longest_shared_start_as_trl_extracts_it():
    """HH-RLHF-style conversations that part before their last answer: the shared messages are the prompt
    and every later assistant turn is trained (TRL's `extract_prompt`); before, such rows were refused."""
    row = {"chosen": [S, U, A, U2, A2], "rejected": [S, U, B]}
    assert parse_row(row, "preference", REF) == PreferenceExample(
        Chat((S, U, A, U2, A2), 2), Chat((S, U, B), 2), 0.0
    )
    with pytest.raises(DataError, match="d.jsonl line 3: conversation 'rejected' is the start of the other one"):
        parse_row({"chosen": [U, A, U2, A2], "rejected": [U, A]}, "preference", REF)
    with pytest.raises(DataError, match="d.jsonl line 3: 'chosen' and 'rejected' are identical"):
        parse_row({"chosen": [U, A], "rejected": [U, A]}, "preference", REF)


def test_a_prompt_column_that_the_conversations_do_not_start_with_is_a_bad_row():
    """A message-list prompt with a system turn that the whole conversations lack would be dropped."""
    row = {"prompt": [S, U], "chosen": [U, A], "rejected": [U, B]}
    with pytest.raises(DataError) as info:
        parse_row(row, "preference", REF)
    assert str(info.value) == (
        "d.jsonl line 3: column 'prompt' is not how conversations 'chosen' and 'rejected' start (they are whole "
        "conversations; their shared start has 1 messages): give the completions alone after the prompt, or "
        "drop the 'prompt' column"
    )
    ok = {"prompt": [U], "chosen": [U, A], "rejected": [U, B]}  # the prompt is how they start: not repeated
    assert parse_row(ok, "preference", REF) == PreferenceExample(Chat((U, A), 1), Chat((U, B), 1), 0.0)


@pytest.mark.parametrize("kind, extra", [("unpaired", {"label": True}), ("sft", {})])
def test_a_completion_repeating_the_prompt_is_a_bad_row(kind, extra):
    """UltraFeedback-style whole conversations in a KTO / SFT `completion` column: before, the user turn
    was rendered twice (prompt, then again at the start of the completion)."""
    row = {"prompt": "q", "completion": [U, A], **extra}
    with pytest.raises(DataError) as info:
        parse_row(row, kind, REF)
    assert str(info.value) == (
        "d.jsonl line 3: column 'completion' starts with the prompt's messages again (a whole conversation?): "
        "give the completion's messages alone after the prompt"
    )


@pytest.mark.parametrize("kind", ["sft", "preference", "unpaired"])
def test_a_per_row_tools_column_is_refused_not_dropped(kind):
    """TRL's tool-calling layout has a `tools` column the template renders; rows cannot pass it on, so a
    row with tools is refused rather than trained without them. Prompt rows keep it as a column."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    row = {"sft": {"messages": [U, A]}, "preference": {"prompt": [U], "chosen": [A], "rejected": [B]},
           "unpaired": {"prompt": [U], "completion": [A], "label": False}}[kind]
    with pytest.raises(DataError, match="d.jsonl line 3: column 'tools' holds per-row tool schemas"):
        parse_row({**row, "tools": tools}, kind, REF)
    parse_row({**row, "tools": None}, kind, REF)  # a null / empty column (a table's) is no tools
    parse_row({**row, "tools": []}, kind, REF)
    assert parse_row({"prompt": [U], "tools": tools}, "prompt", REF).columns == {"tools": tools}


def test_sft_messages_with_a_system_turn_and_an_ultrachat_prompt_column():
    """UltraChat / No Robots ship `prompt` beside `messages`: the messages are read, the system turn is
    context, every assistant turn is trained."""
    row = {"prompt": "q", "prompt_id": "x1", "messages": [S, U, A, U2, A2]}
    assert parse_row(row, "sft", REF) == SFTExample(Chat((S, U, A, U2, A2), 0))


def test_numpy_labels_and_text_rows_without_a_prompt():
    """Rows from a pandas table hold NumPy scalars; string chosen/rejected need a prompt column (TRL would
    guess one character by character; here the error says so)."""
    assert parse_row({"prompt": "q", "completion": "a", "label": np.bool_(False)}, "unpaired", REF).label is False
    assert parse_row({"prompt": "q", "completion": "a", "label": np.int64(1)}, "unpaired", REF).label is True
    with pytest.raises(DataError, match=r"column 'label' must be a bool \(or 0/1, 'true'/'false'\), got int 2"):
        parse_row({"prompt": "q", "completion": "a", "label": np.int64(2)}, "unpaired", REF)
    with pytest.raises(DataError) as info:
        parse_row({"chosen": "Human: q Assistant: a", "rejected": "Human: q Assistant: b"}, "preference", REF)
    assert str(info.value) == (
        "d.jsonl line 3: missing column 'prompt'; found columns ['chosen', 'rejected'] (string 'chosen' / "
        "'rejected' need an explicit prompt; an implicit prompt is read from message lists only)"
    )


def test_stored_preference_rows_check_margin_and_tools_as_reading_does():
    """The TFDS writer's encoding: before, a bool margin was stored as 1.0 (reading refuses bools), a
    margin past float32 became inf, and a `tools` column was dropped without a word."""
    from rlhf_jax.data.preference_records import decode_preference_row, encode_preference_row

    row = {"prompt": "q", "chosen": "a", "rejected": "b"}
    assert decode_preference_row(encode_preference_row(REF, {**row, "margin": "0.5"})) == {**row, "margin": 0.5}
    for margin, problem in [
        (True, "column 'margin' must be a finite number, got bool True"),
        (float("nan"), "column 'margin' must be a finite number, got float nan"),
        (1e300, "column 'margin' 1e+300 does not fit the stored float32"),
    ]:
        with pytest.raises(DataError) as info:
            encode_preference_row(REF, {**row, "margin": margin})
        assert str(info.value) == f"d.jsonl line 3: {problem}"
    with pytest.raises(DataError, match="d.jsonl line 3: column 'tools' holds per-row tool schemas"):
        encode_preference_row(REF, {**row, "tools": [{"type": "function"}]})
