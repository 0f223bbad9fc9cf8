"""Row formats: the dataset schemas users already have (TRL / Hugging Face hub), validated.

A *row* is one record of a source (a JSON object, a table row). `parse_row(row, kind, ref)` checks it
and returns a typed example; a bad row raises `DataError` naming the file, the line (or row) and the
problem. Four kinds exist, each accepting the layouts TRL documents:

- `"sft"`: `{"prompt", "completion"}` (both strings, or both message lists), `{"messages": [...]}`
  (every assistant turn is trained on; a `prompt` or `text` column beside it, as UltraChat and No
  Robots ship, is not read), or `{"text"}` (language modelling: every token trained on).
- `"preference"`: `{"prompt", "chosen", "rejected"}` with strings or message lists (a completion may
  span several turns, starting with an assistant message), an optional `margin` (number; absent
  means 0). Also the implicit-prompt layout of HH-RLHF / UltraFeedback-style data, as TRL's
  `extract_prompt` reads it: `chosen` / `rejected` are whole conversations (starting with a
  non-assistant message); their longest common run of messages is the prompt, the rest the
  completions (every assistant message in it is trained on). A `prompt` column beside them is not
  read (UltraFeedback's repeats the first user message), but a message-list prompt must be where
  the conversations start: one holding other messages (e.g. a system turn they lack) is a bad row.
  String `chosen` / `rejected` need a `prompt` column (no prompt is guessed from text).
- `"unpaired"` (KTO): `{"prompt", "completion", "label"}`; `label` is a bool (also 0/1 or the strings
  "true"/"false", as CSV files store it).
- `"prompt"` (online RL): `{"prompt", ...}`; every other column (e.g. `answer`) is kept as is and
  reaches the reward functions. Without a `prompt` column, GSM8K's `{"question", "answer"}` (answer:
  a solution ending in "#### 42") and MATH's `{"problem", "solution"}` (a `\\boxed{}` answer) are
  read with `question` / `problem` as the prompt: the reward "math" checks against either column.

A string prompt with message-list completions is read as one user message; a message-list
completion that repeats the prompt's messages (a whole conversation in a completion column) is a bad
row, not a conversation with its prompt twice. Messages are `{"role", "content"}` objects with a role
from `roles` and string content; other keys are kept. A per-row `tools` column (TRL's tool-calling
layout) is refused in "sft", "preference" and "unpaired" rows: tools reach the chat template only
through `TokenizeConfig.tools`, the same for every row, so the row would be trained without them.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import numpy as np

__all__ = [
    "Kind",
    "KINDS",
    "DEFAULT_ROLES",
    "RowRef",
    "DataError",
    "Plain",
    "Chat",
    "SequenceSpec",
    "SFTExample",
    "PreferenceExample",
    "UnpairedExample",
    "PromptExample",
    "Example",
    "parse_row",
    "PROMPT_TEMPLATES",
    "resolve_prompt_template",
    "describe_value",
    "require_columns",
    "parse_margin",
    "refuse_row_tools",
]

Kind = Literal["sft", "preference", "unpaired", "prompt"]
KINDS: tuple[str, ...] = typing.get_args(Kind)
DEFAULT_ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class RowRef:
    """Where a row came from, for error messages: `data.jsonl line 3`, `train.parquet row 7`.

    Attributes:
      source: the file (or a description such as `<rows>` for in-memory data).
      index: 1-based line number for text files (JSONL, CSV), 0-based row index otherwise; None
        for a problem of the whole source (e.g. no usable rows), which names the source alone.
      unit: "line" or "row".
    """

    source: str
    index: int | None
    unit: Literal["line", "row"] = "row"

    def __str__(self) -> str:
        return self.source if self.index is None else f"{self.source} {self.unit} {self.index}"


class DataError(ValueError):
    """A row is unusable; the message names the file, the line (or row) and the problem."""

    def __init__(self, ref: RowRef, problem: str):
        super().__init__(f"{ref}: {problem}")
        self.ref = ref
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class Plain:
    """Raw text, no chat template: BOS (when the tokenizer has one) + prompt, then the completion.

    `completion` is None for a prompt-only sequence; `prompt` is "" for the `text` layout.
    """

    prompt: str
    completion: str | None


@dataclasses.dataclass(frozen=True)
class Chat:
    """A conversation rendered with the chat template.

    Attributes:
      messages: the conversation.
      num_context: the first `num_context` messages are context (never trained on); every assistant
        message after them is trained on. Equal to `len(messages)` for a prompt-only conversation,
        which is rendered with the generation prompt.
    """

    messages: tuple[Mapping[str, Any], ...]
    num_context: int


SequenceSpec = Union[Plain, Chat]


@dataclasses.dataclass(frozen=True)
class SFTExample:
    sequence: SequenceSpec


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    chosen: SequenceSpec
    rejected: SequenceSpec
    margin: float


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
    sequence: SequenceSpec
    label: bool


@dataclasses.dataclass(frozen=True)
class PromptExample:
    prompt: SequenceSpec
    columns: Mapping[str, Any]


Example = Union[SFTExample, PreferenceExample, UnpairedExample, PromptExample]


# ---------------------------------------------------------------------------------------- helpers


def require_columns(row: Mapping[str, Any], ref: RowRef, *names: str) -> None:
    """`DataError` naming the columns of `names` that `row` lacks, or else those that are null."""
    missing = [n for n in names if n not in row]
    if missing:
        raise DataError(
            ref, f"missing column {', '.join(repr(m) for m in missing)}; found columns {sorted(row)}"
        )
    null = [n for n in names if row[n] is None]
    if null:
        raise DataError(ref, f"column {', '.join(repr(n) for n in null)} is null")


_require = require_columns


def _check_unicode(value: str, ref: RowRef, where: str) -> str:
    """`value`, unless it holds a lone surrogate (a JSON escape such as \\ud800), which no tokenizer takes."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(
                ref, f"{where} holds the lone surrogate {value[err.start]!r} at character {err.start} "
                "(not valid Unicode text)"
            ) from None
    return value


def _messages(value: Any, ref: RowRef, column: str, roles: Sequence[str]) -> tuple[Mapping[str, Any], ...]:
    """Validate a message list: non-empty, each a {"role", "content"} object with a known role."""
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(
            ref, f"column {column!r} must be a non-empty list of messages, got {_describe(value)}"
        )
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataError(
                ref,
                f"{column}[{i}] must be a message object with 'role' and 'content', got {_describe(message)}",
            )
        role = message.get("role")
        if role not in roles:
            raise DataError(ref, f"{column}[{i}] has unknown role {role!r}; expected one of {list(roles)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(ref, f"{column}[{i}] ({role}) content must be a string, got {_describe(content)}")
        for key, item in message.items():  # every string of a message may reach the chat template
            if isinstance(item, str):
                _check_unicode(item, ref, f"{column}[{i}].{key}")
        out.append(dict(message))
    return tuple(out)


def _text(value: Any, ref: RowRef, column: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(ref, f"column {column!r} must be a string, got {_describe(value)}")
    if not allow_empty and not value.strip():
        raise DataError(ref, f"column {column!r} is empty")
    return _check_unicode(value, ref, f"column {column!r}")


def describe_value(value: Any) -> str:
    """A value for messages: its type and its repr, shortened to 40 characters (`int 5`, `str 'ab...'`)."""
    try:
        text = repr(value)
    except RecursionError:
        text = "(nested too deeply to show)"
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


_describe = describe_value


def _check_trained(messages: Sequence[Mapping[str, Any]], start: int, ref: RowRef, column: str) -> None:
    """The trained part (messages[start:]) ends with an assistant turn and has no empty turn."""
    if not messages[start:] or messages[-1]["role"] != "assistant":
        last = messages[-1]["role"] if messages else None
        raise DataError(ref, f"column {column!r} must end with an assistant message, got role {last!r}")
    for i in range(start, len(messages)):
        if messages[i]["role"] == "assistant" and not messages[i]["content"].strip():
            raise DataError(ref, f"{column}[{i}] (assistant) content is empty")


def _prompt_messages(value: Any, ref: RowRef, roles: Sequence[str]) -> tuple[Mapping[str, Any], ...]:
    """A prompt as messages: a message list, or a string read as one user message."""
    if isinstance(value, str):
        return ({"role": "user", "content": _text(value, ref, "prompt")},)
    return _messages(value, ref, "prompt", roles)


def _prompt_completion(
    row: Mapping[str, Any], ref: RowRef, roles: Sequence[str], column: str = "completion"
) -> SequenceSpec:
    """`{"prompt", column}`: both strings (plain text), or a message-list completion (chat)."""
    _require(row, ref, "prompt", column)
    completion = row[column]
    if isinstance(completion, str):
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise DataError(
                ref,
                f"column 'prompt' is {_describe(prompt)} but {column!r} is a string: "
                "use strings for both, or message lists",
            )
        return Plain(_text(prompt, ref, "prompt", allow_empty=True), _text(completion, ref, column))
    if not isinstance(completion, (list, tuple)):
        raise DataError(
            ref, f"column {column!r} must be a string or a list of messages, got {_describe(completion)}"
        )
    prompt = _prompt_messages(row["prompt"], ref, roles)
    completion = _messages(completion, ref, column, roles)
    if completion[: len(prompt)] == prompt:  # a whole conversation in a completion column
        raise DataError(
            ref, f"column {column!r} starts with the prompt's messages again (a whole conversation?): "
            "give the completion's messages alone after the prompt"
        )
    _check_trained(completion, 0, ref, column)
    return Chat(prompt + completion, len(prompt))


def _label(value: Any, ref: RowRef) -> bool:
    if isinstance(value, np.generic):  # rows built from a pandas / NumPy table
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataError(ref, f"column 'label' must be a bool (or 0/1, 'true'/'false'), got {_describe(value)}")


def parse_margin(value: Any, ref: RowRef) -> float:
    """A preference row's `margin` as a float: None is 0; a bool or a non-finite number is a `DataError`."""
    if value is None:
        return 0.0
    try:
        margin = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        margin = math.nan
    if not math.isfinite(margin):
        raise DataError(ref, f"column 'margin' must be a finite number, got {_describe(value)}")
    return margin


# ---------------------------------------------------------------------------------------- parsers


def refuse_row_tools(row: Mapping[str, Any], ref: RowRef) -> None:
    """`DataError` for a row with a non-empty `tools` column, which would be trained without its tools."""
    if row.get("tools") not in (None, [], ()):
        raise DataError(
            ref, "column 'tools' holds per-row tool schemas, which rows cannot pass to the chat template (the "
            "row would be trained without them): set TokenizeConfig.tools (the same tools for every row) and "
            "drop or rename the column"
        )


def _parse_sft(row: Mapping[str, Any], ref: RowRef, roles: Sequence[str]) -> SFTExample:
    if row.get("messages") is not None:
        messages = _messages(row["messages"], ref, "messages", roles)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(ref, "column 'messages' has no assistant message to train on")
        _check_trained(messages, 0, ref, "messages")
        return SFTExample(Chat(messages, 0))
    if row.get("completion") is not None or row.get("prompt") is not None:
        return SFTExample(_prompt_completion(row, ref, roles))
    if row.get("text") is not None:
        return SFTExample(Plain("", _text(row["text"], ref, "text")))
    needs = "an SFT row needs 'prompt' and 'completion', 'messages', or 'text'"
    null = [c for c in ("prompt", "completion", "messages", "text") if c in row]
    if null:
        raise DataError(ref, f"column {', '.join(repr(c) for c in null)} is null; {needs}")
    raise DataError(ref, f"missing column: {needs}; found columns {sorted(row)}")


def _parse_preference(row: Mapping[str, Any], ref: RowRef, roles: Sequence[str]) -> PreferenceExample:
    _require(row, ref, "chosen", "rejected")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) != isinstance(rejected, str) or not isinstance(chosen, (str, list, tuple)):
        raise DataError(
            ref,
            "columns 'chosen' and 'rejected' must both be strings or both message lists, "
            f"got {_describe(chosen)} and {_describe(rejected)}",
        )
    # Whole conversations (implicit prompt) start with a non-assistant message; completions (after an
    # explicit prompt, possibly several turns) start with the assistant's answer.
    implicit = (
        isinstance(chosen, (list, tuple))
        and bool(chosen)
        and isinstance(chosen[0], Mapping)
        and chosen[0].get("role") != "assistant"
    )
    if implicit:
        chosen_seq, rejected_seq = _implicit_prompt(row, ref, roles)
    else:
        if isinstance(chosen, str) and "prompt" not in row:
            raise DataError(
                ref, f"missing column 'prompt'; found columns {sorted(row)} (string 'chosen' / 'rejected' "
                "need an explicit prompt; an implicit prompt is read from message lists only)"
            )
        chosen_seq = _prompt_completion(row, ref, roles, "chosen")
        rejected_seq = _prompt_completion(row, ref, roles, "rejected")
    if chosen_seq == rejected_seq:
        raise DataError(ref, "'chosen' and 'rejected' are identical")
    return PreferenceExample(chosen_seq, rejected_seq, parse_margin(row.get("margin"), ref))


def _implicit_prompt(row: Mapping[str, Any], ref: RowRef, roles: Sequence[str]) -> tuple[Chat, Chat]:
    """Whole conversations `chosen` / `rejected`: their longest common run of messages is the prompt."""
    chosen = _messages(row["chosen"], ref, "chosen", roles)
    rejected = _messages(row["rejected"], ref, "rejected", roles)
    context = 0
    while context < min(len(chosen), len(rejected)) and chosen[context] == rejected[context]:
        context += 1
    if context == 0:
        raise DataError(ref, "conversations 'chosen' and 'rejected' differ from their first message: no shared "
                             "prompt (give a 'prompt' column and the completions alone)")
    if chosen == rejected:
        raise DataError(ref, "'chosen' and 'rejected' are identical")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if context == len(messages):
            raise DataError(ref, f"conversation {name!r} is the start of the other one: it has no completion")
        _check_trained(messages, context, ref, name)
    prompt = row.get("prompt")
    if isinstance(prompt, (list, tuple)):  # a string prompt column is not read (UltraFeedback repeats it)
        prompt = _messages(prompt, ref, "prompt", roles)
        if len(prompt) > context or chosen[: len(prompt)] != prompt:
            raise DataError(
                ref, "column 'prompt' is not how conversations 'chosen' and 'rejected' start (they are whole "
                f"conversations; their shared start has {context} messages): give the completions alone after "
                "the prompt, or drop the 'prompt' column"
            )
    return Chat(chosen, context), Chat(rejected, context)


def _parse_unpaired(row: Mapping[str, Any], ref: RowRef, roles: Sequence[str]) -> UnpairedExample:
    if "completion" not in row and "chosen" in row and "rejected" in row:
        raise DataError(ref, "this is a preference pair ('chosen', 'rejected'), not an unpaired row: KTO reads "
                        "{'prompt', 'completion', 'label'}; split each pair into a desirable and an undesirable "
                        "row, as TRL's unpair_preference_dataset does")
    sequence = _prompt_completion(row, ref, roles)
    _require(row, ref, "label")
    return UnpairedExample(sequence, _label(row["label"], ref))


_PROMPT_COLUMNS = ("prompt", "question", "problem")  # ours/TRL's, GSM8K's, MATH's


def _parse_prompt(row: Mapping[str, Any], ref: RowRef, roles: Sequence[str]) -> PromptExample:
    column = next((c for c in _PROMPT_COLUMNS if isinstance(row, Mapping) and c in row), "prompt")
    _require(row, ref, column)
    prompt = row[column]
    if isinstance(prompt, str):
        sequence: SequenceSpec = Plain(_text(prompt, ref, column), None)
    else:
        messages = _messages(prompt, ref, column, roles)
        sequence = Chat(messages, len(messages))
    return PromptExample(sequence, {k: v for k, v in row.items() if k != column})


_PARSERS = {
    "sft": _parse_sft,
    "preference": _parse_preference,
    "unpaired": _parse_unpaired,
    "prompt": _parse_prompt,
}


def parse_row(
    row: Any,
    kind: Kind,
    ref: RowRef,
    *,
    roles: Sequence[str] = DEFAULT_ROLES,
    string_format: Literal["plain", "chat"] = "plain",
    prompt_template: str | None = None,
) -> Example:
    """Validate one row of a dataset of `kind` and return its typed example.

    Args:
      row: a mapping from column name to value (one JSON object / table row).
      kind: "sft", "preference", "unpaired" or "prompt" (layouts in the module docstring).
      ref: where the row came from (named in errors).
      roles: the message roles the chat template accepts.
      string_format: "plain" keeps string prompts/completions as raw text (TRL's standard format);
        "chat" turns them into a user message and an assistant message rendered with the template.
      prompt_template: for "prompt" rows, a name in `PROMPT_TEMPLATES` or a text with one `{prompt}`
        field that the prompt text (or its last user message's content) is put into, e.g. GSM8K's
        question followed by an instruction on where the answer goes; None leaves prompts as they are.

    Returns:
      An `SFTExample`, `PreferenceExample`, `UnpairedExample` or `PromptExample`.

    Raises:
      DataError: naming `ref` and the problem (missing column, wrong type, empty completion, unknown
        role, chosen identical to rejected, ...).
    """
    if kind not in _PARSERS:
        raise ValueError(f"parse_row: kind must be one of {KINDS}, got {kind!r}")
    if string_format not in ("plain", "chat"):
        raise ValueError(f"parse_row: string_format must be 'plain' or 'chat', got {string_format!r}")
    if not isinstance(row, Mapping):
        raise DataError(ref, f"a row must be an object mapping column names to values, got {_describe(row)}")
    if kind != "prompt":
        refuse_row_tools(row, ref)
    example = _PARSERS[kind](row, ref, roles)
    template = resolve_prompt_template(prompt_template)
    if template is not None and isinstance(example, PromptExample):
        example = dataclasses.replace(example, prompt=_templated(example.prompt, template))
    return _as_chat(example) if string_format == "chat" else example


PROMPT_FIELD = "{prompt}"

# Named prompt templates (`data.prompt_template=gsm8k`): the instructions math RL recipes put after the
# problem so that the final answer lands where the "math" reward looks for it.
PROMPT_TEMPLATES: dict[str, str] = {
    # verl's GSM8K preprocessing: the answer after "####", as GSM8K's own solutions end.
    "gsm8k": '{prompt} Let\'s think step by step and output the final answer after "####".',
    # Qwen2.5-Math's chain-of-thought instruction (also DeepSeek-R1-style math RL): a boxed answer.
    "math_boxed": "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}.",
}


def resolve_prompt_template(template: str | None, key: str = "prompt_template") -> str | None:
    """The template text of a name in `PROMPT_TEMPLATES`, or `template` itself; None stays None.

    Raises ValueError naming `key` unless the text holds exactly one `{prompt}` field. Other braces
    are kept as text (LaTeX's `\\boxed{}` needs no escaping): the prompt is put in with
    `str.replace`, not `str.format`.
    """
    if template is None:
        return None
    text = PROMPT_TEMPLATES.get(template, template) if isinstance(template, str) else template
    if not isinstance(text, str) or text.count(PROMPT_FIELD) != 1:
        raise ValueError(f"{key} must be one of {sorted(PROMPT_TEMPLATES)} or a string with exactly one "
                         f"{PROMPT_FIELD!r} field, got {template!r}")
    return text


def _templated(sequence: SequenceSpec, template: str) -> SequenceSpec:
    """The prompt put into `template`: a plain prompt's text, or a chat prompt's last user message."""
    if isinstance(sequence, Plain):
        return dataclasses.replace(sequence, prompt=template.replace(PROMPT_FIELD, sequence.prompt))
    messages = list(sequence.messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None or not isinstance(messages[last_user]["content"], str):
        return sequence
    messages[last_user] = {**messages[last_user],
                           "content": template.replace(PROMPT_FIELD, messages[last_user]["content"])}
    return dataclasses.replace(sequence, messages=tuple(messages))


def _plain_to_chat(sequence: SequenceSpec) -> SequenceSpec:
    if not isinstance(sequence, Plain):
        return sequence
    if sequence.completion is None:
        return Chat(({"role": "user", "content": sequence.prompt},), 1)
    if not sequence.prompt:  # the `text` layout: one assistant turn with no prompt
        return Chat(({"role": "assistant", "content": sequence.completion},), 0)
    messages = (
        {"role": "user", "content": sequence.prompt},
        {"role": "assistant", "content": sequence.completion},
    )
    return Chat(messages, 1)


def _as_chat(example: Example) -> Example:
    if isinstance(example, PreferenceExample):
        return dataclasses.replace(
            example, chosen=_plain_to_chat(example.chosen), rejected=_plain_to_chat(example.rejected)
        )
    if isinstance(example, PromptExample):
        return dataclasses.replace(example, prompt=_plain_to_chat(example.prompt))
    return dataclasses.replace(example, sequence=_plain_to_chat(example.sequence))
