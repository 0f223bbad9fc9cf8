"""Observations into tokens: raw text, or the tokenizer's own chat template with its tool role.

A rollout appends, after each of the policy's turns, the tokens of what the environment answered.
Two renderers produce them:

- `RawRenderer`: the observation text as is (a tool result inside the call format's result tags,
  e.g. `[20473]`), for base models and the tiny experiments.
- `ChatRenderer`: the text a real checkpoint expects, rendered by `tokenizer.apply_chat_template`
  with a `tool` message (Qwen2.5/Qwen3: `<|im_start|>user\\n<tool_response>\\n...\\n</tool_response>
  <|im_end|>\\n<|im_start|>assistant\\n`; Llama-3.1: `<|start_header_id|>ipython<|end_header_id|>\\n\\n
  ...<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`). The observation is the rendered
  text between the end of an assistant turn and the next generation prompt, found by rendering a
  placeholder conversation, so the model's own tokens are kept exactly as sampled. It starts with the
  end-of-turn token when the model's turn did not end with it (a tag format stops at `</tool>`), after
  it otherwise (`observation(..., turn_closed=)`; by default the call format decides).

The prompt an agentic run starts from is the template's render of the row with the tools
(`ChatRenderer.prompt_tokens`); in training the data pipeline renders it so
(`rlhf_jax.train.agentic.load_data`: `TokenizeConfig.tools`), where it is measured against the
prompt budget, so the model is told which tools exist and the observations extend it.

A template without a tool role (it raises on `role="tool"`) cannot show a tool's result: the model
then gets an error message in a user turn (`status="no_tool_role"`, counted by the rollout), never
a crash.

Token ids: an observation continues the trajectory, so it is encoded as a continuation
(`rlhf_jax.data.tokenize.encode_pieces`): a SentencePiece-style tokenizer (Llama-2 / Mistral,
"▁" on the first word of each encoded text) gets no start-of-text "▁", and the observation has the
ids of the whole conversation's render (`apply_chat_template(..., tokenize=True)`), token by token.

A tool cannot forge a turn boundary: special-token text in a tool's result (or, with the chat
renderer, in an environment's text observation), e.g. an injected `<|im_end|>`, is encoded as plain
text (cut after its first character, so no special token matches it), never as the special token;
the template's own special tokens are kept. The raw renderer keeps an environment's text
observation as is (its text is the format, as a template is).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from rlhf_jax.agents.tools import CallFormat, HermesCallFormat, JsonCallFormat, TagCallFormat, Tool, ToolResult
from rlhf_jax.data.tokenize import encode_pieces, special_pattern

__all__ = ["RawRenderer", "ChatRenderer", "Rendered", "detect_call_format", "NO_TOOL_ROLE_MESSAGE"]

NO_TOOL_ROLE_MESSAGE = "error: this chat template has no tool role; the tool's result cannot be shown"
_PLACEHOLDER = "PLACEHOLDER_ASSISTANT_TURN"
_CONTENT = "PLACEHOLDER_OBSERVATION_CONTENT"


class Rendered(tuple):
    """`(token ids, status)`: the observation's tokens and `"ok"` or `"no_tool_role"`."""

    __slots__ = ()

    def __new__(cls, ids: list[int], status: str = "ok"):
        return super().__new__(cls, (list(ids), status))

    @property
    def ids(self) -> list[int]:
        return self[0]

    @property
    def status(self) -> str:
        return self[1]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _content_span(text: str, marked: str) -> tuple[int, int]:
    """Where `text` differs from `marked` (the same render with a placeholder content): the content."""
    start = len(os.path.commonprefix([text, marked]))
    end = len(text) - len(os.path.commonprefix([text[start:][::-1], marked[start:][::-1]]))
    return start, end


def _forgery_cuts(tokenizer):
    """A regex matching at every start of a special token's text (overlapping ones too), or None."""
    pattern = special_pattern(tokenizer)
    return None if pattern is None else re.compile(f"(?=(?:{pattern.pattern}))")


def _encode_continuation(tokenizer, text: str, cuts=None, content: tuple[int, int] | None = None) -> list[int]:
    """The ids of `text` as it continues a trajectory; special-token text (`cuts`, from `_forgery_cuts`)
    starting inside `text[content[0]:content[1]]` is cut after its first character: it is plain text."""
    if not text:
        return []
    at = [] if cuts is None or content is None else \
        [m.start() + 1 for m in cuts.finditer(text, content[0]) if m.start() < content[1]]
    pieces = [text[a:b] for a, b in zip([0, *at], [*at, len(text)])]
    if tokenizer.eos_token is None:  # `encode_pieces` continues after the EOS token
        return [i for piece in pieces for i in _encode(tokenizer, piece)]
    return [i for ids in encode_pieces(tokenizer, [(piece, True) for piece in pieces]) for i in ids]


class RawRenderer:
    """Observations as plain text: a `ToolResult` in the call format's result tags, other text as is.

    Args:
      tokenizer: a Hugging Face tokenizer.
      call_format: the tool-call format (its `render_result`, when it has one, wraps results).
    """

    def __init__(self, tokenizer, call_format: CallFormat = TagCallFormat()):
        self.tokenizer, self.call_format = tokenizer, call_format
        self._cuts = _forgery_cuts(tokenizer)

    def prompt_tokens(self, prompt: str) -> list[int]:
        """The first observation's tokens (BOS when the tokenizer has one, then the text)."""
        bos = self.tokenizer.bos_token_id
        return ([] if bos is None else [bos]) + _encode(self.tokenizer, prompt)

    def observation(self, observation: str | ToolResult, *, turn_closed: bool | None = None) -> Rendered:
        """The observation's ids, as a continuation; special-token text in a tool's result stays text.
        (`turn_closed` is `ChatRenderer`'s; raw text has no turns.)"""
        if not isinstance(observation, ToolResult):
            return Rendered(_encode_continuation(self.tokenizer, str(observation)))
        wrap = getattr(self.call_format, "render_result", None) or (lambda text: text)
        text = wrap(observation.text)
        return Rendered(_encode_continuation(self.tokenizer, text, self._cuts, _content_span(text, wrap(_CONTENT))))


def detect_call_format(chat_template: str | None) -> CallFormat | None:
    """The tool-call format a chat template teaches: Hermes (`<tool_call>`: Qwen2.5/Qwen3), Llama-3.1's
    JSON (`ipython` role), or None."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return HermesCallFormat()
    if "ipython" in chat_template:
        return JsonCallFormat()
    return None


class ChatRenderer:
    """Observations rendered by the tokenizer's chat template (its tool role).

    Args:
      tokenizer: a Hugging Face tokenizer with a chat template.
      tools: the tools offered to the model (their schemas go to the template's `tools=`).
      call_format: how the model writes calls (default: the template's own, `detect_call_format`).
      end_of_turn: the token that ends an assistant turn (default the tokenizer's EOS); a template whose
        assistant turn does not end with it is refused here (a ValueError naming it).
      template_kwargs: further `apply_chat_template` arguments (e.g. `enable_thinking=False`).
    """

    def __init__(self, tokenizer, *, tools: Sequence[Tool] = (), call_format: CallFormat | None = None,
                 end_of_turn: str | None = None, template_kwargs: Mapping[str, Any] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("ChatRenderer: the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.tools = list(tools)
        self.call_format = call_format or detect_call_format(tokenizer.chat_template) or TagCallFormat()
        self.end_of_turn = end_of_turn or tokenizer.eos_token
        if not self.end_of_turn:
            raise ValueError("ChatRenderer: give end_of_turn (the tokenizer has no EOS token)")
        self.template_kwargs = dict(template_kwargs or {})
        turn = self._render([{"role": "user", "content": "Q"}, {"role": "assistant", "content": _PLACEHOLDER}],
                            add_generation_prompt=False)
        if _PLACEHOLDER not in turn or self.end_of_turn not in turn[turn.index(_PLACEHOLDER):]:
            raise ValueError(f"ChatRenderer: the chat template does not end an assistant turn with "
                             f"end_of_turn={self.end_of_turn!r} (default: the tokenizer's EOS); give end_of_turn= "
                             f"the template's end-of-turn token")
        # A tag format stops decoding at its close tag, before the end-of-turn token: the observation
        # then starts by closing the assistant turn.
        self._turn_closed_by_model = not self.call_format.stop_strings
        self._cuts = _forgery_cuts(tokenizer)

    def _render(self, messages, *, add_generation_prompt: bool) -> str:
        tools = [t.schema() for t in self.tools] or None
        return self.tokenizer.apply_chat_template(list(messages), tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **self.template_kwargs)

    def prompt_tokens(self, prompt: str | Sequence[Mapping[str, Any]]) -> list[int]:
        """A user prompt (or a list of messages) with the tools and the generation prompt, as ids.

        The same ids as an agentic run's data (`rlhf_jax.train.agentic.load_data` renders its prompts
        with `TokenizeConfig.tools` = these tools' schemas; pinned by tests/test_agents.py).
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return _encode(self.tokenizer, self._render(messages, add_generation_prompt=True))

    def _after_turn(self, message: Mapping[str, Any], closed: bool) -> str:
        """The template's text after an assistant turn's end, through `message`, up to the generation prompt;
        from the end-of-turn token on when the turn is not `closed` (by the model's own end-of-turn token)."""
        base = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _PLACEHOLDER}]
        text = self._render(base + [dict(message)], add_generation_prompt=True)
        start = text.index(_PLACEHOLDER)
        end = text.index(self.end_of_turn, start)
        return text[end + len(self.end_of_turn):] if closed else text[end:]

    def _encode_message(self, message: Mapping[str, Any], closed: bool) -> list[int]:
        """The ids of `_after_turn(message, closed)`, as a continuation; special-token text in the message's
        content stays text."""
        text = self._after_turn(message, closed)
        if self._cuts is None or not self._cuts.search(message["content"]):
            return _encode_continuation(self.tokenizer, text)
        marked = self._after_turn({**message, "content": _CONTENT}, closed)
        return _encode_continuation(self.tokenizer, text, self._cuts, _content_span(text, marked))

    def observation(self, observation: str | ToolResult, *, turn_closed: bool | None = None) -> Rendered:
        """The observation's ids: the template's text from the end of the model's turn through the next
        generation prompt, as the whole conversation's render has them.

        Args:
          observation: a tool's result (the template's tool role) or an environment's text (a user turn).
          turn_closed: whether the model's turn ended with the end-of-turn token (then the observation
            starts after it) or not (it starts with it). None: as the call format has it (a format with
            stop strings, e.g. `</tool>`, stops before the end-of-turn token; the others at it).
        """
        closed = self._turn_closed_by_model if turn_closed is None else bool(turn_closed)
        if isinstance(observation, ToolResult):
            message = {"role": "tool", "name": observation.name, "content": observation.text}
            try:
                self._after_turn(message, closed)
            except Exception:  # noqa: BLE001 - the template rejects a tool message (no tool role)
                return Rendered(self._encode_message({"role": "user", "content": NO_TOOL_ROLE_MESSAGE}, closed),
                                "no_tool_role")
        else:
            message = {"role": "user", "content": str(observation)}
        return Rendered(self._encode_message(message, closed))
