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
  placeholder conversation, so the model's own tokens are kept exactly as sampled.

The prompt an agentic run starts from is the template's render of the row with the tools
(`ChatRenderer.prompt_tokens`); in training the data pipeline renders it so
(`rlhf_jax.train.agentic.load_data`: `TokenizeConfig.tools`), where it is measured against the
prompt budget, so the model is told which tools exist and the observations extend it.

A template without a tool role (it raises on `role="tool"`) cannot show a tool's result: the model
then gets an error message in a user turn (`status="no_tool_role"`, counted by the rollout), never
a crash.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rlhf_jax.agents.tools import CallFormat, HermesCallFormat, JsonCallFormat, TagCallFormat, Tool, ToolResult

__all__ = ["RawRenderer", "ChatRenderer", "Rendered", "detect_call_format", "NO_TOOL_ROLE_MESSAGE"]

NO_TOOL_ROLE_MESSAGE = "error: this chat template has no tool role; the tool's result cannot be shown"
_PLACEHOLDER = "PLACEHOLDER_ASSISTANT_TURN"


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


class RawRenderer:
    """Observations as plain text: a `ToolResult` in the call format's result tags, other text as is.

    Args:
      tokenizer: a Hugging Face tokenizer.
      call_format: the tool-call format (its `render_result`, when it has one, wraps results).
    """

    def __init__(self, tokenizer, call_format: CallFormat = TagCallFormat()):
        self.tokenizer, self.call_format = tokenizer, call_format

    def prompt_tokens(self, prompt: str) -> list[int]:
        """The first observation's tokens (BOS when the tokenizer has one, then the text)."""
        bos = self.tokenizer.bos_token_id
        return ([] if bos is None else [bos]) + _encode(self.tokenizer, prompt)

    def observation(self, observation: str | ToolResult) -> Rendered:
        if isinstance(observation, ToolResult):
            wrap = getattr(self.call_format, "render_result", None)
            text = wrap(observation.text) if wrap is not None else observation.text
        else:
            text = str(observation)
        return Rendered(_encode(self.tokenizer, text))


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
      end_of_turn: the token that ends an assistant turn (default the tokenizer's EOS).
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
        # A tag format stops decoding at its close tag, before the end-of-turn token: the observation
        # then starts by closing the assistant turn.
        self._turn_closed_by_model = not self.call_format.stop_strings

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

    def _after_turn(self, message: Mapping[str, Any]) -> str:
        """The template's text after an assistant turn's end, through `message`, up to the generation prompt."""
        base = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _PLACEHOLDER}]
        text = self._render(base + [dict(message)], add_generation_prompt=True)
        start = text.index(_PLACEHOLDER)
        end = text.index(self.end_of_turn, start)
        return text[end + len(self.end_of_turn):] if self._turn_closed_by_model else text[end:]

    def observation(self, observation: str | ToolResult) -> Rendered:
        if not isinstance(observation, ToolResult):
            return Rendered(_encode(self.tokenizer, self._after_turn({"role": "user", "content": str(observation)})))
        try:
            text = self._after_turn({"role": "tool", "name": observation.name, "content": observation.text})
        except Exception:  # noqa: BLE001 - the template rejects a tool message (no tool role)
            text = self._after_turn({"role": "user", "content": NO_TOOL_ROLE_MESSAGE})
            return Rendered(_encode(self.tokenizer, text), "no_tool_role")
        return Rendered(_encode(self.tokenizer, text))
