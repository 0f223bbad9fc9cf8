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
            "differ before their final assistant message",
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
