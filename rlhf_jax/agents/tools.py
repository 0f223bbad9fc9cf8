"""Tools the policy can call from inside a rollout, the call formats it writes them in, and a runner
that executes them on the host with a time limit.

    calc = calculator_tool()                          # "calc": exact integer arithmetic
    fmt = TagCallFormat()                             # <tool>calc(12*34)</tool>
    call = fmt.parse("let me see <tool>calc(12*34)</tool>")   # ToolCall(name="calc", arguments="12*34")
    result = ToolRunner(timeout_s=2.0).run({"calc": calc}, call)
    result.text, result.status                         # "408", "ok"

A call never crashes a rollout: an unknown tool name, malformed arguments, a tool that raises, one
that runs past its time limit, or one that returns more than `max_chars` characters all become an
observation text for the model with a `status` the rollout counts (`ToolResult.status`: `ok`,
`error`, `timeout`, `truncated`, `unknown_tool`, `malformed`).

Formats (what the model writes; `parse(action_text)` -> `ToolCall`, `CallError`, or None = no call):

- `TagCallFormat(open, close)`: `<tool>name(args)</tool>` (the tags are configurable); the rollout
  stops decoding at `close`, so a call is always the end of its turn.
- `HermesCallFormat`: Qwen2.5 / Qwen3's `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  (the turn ends at the template's end-of-turn token).
- `JsonCallFormat`: Llama-3.1's JSON tool call, the whole assistant message being
  `{"name": ..., "parameters": {...}}`.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import operator
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

__all__ = [
    "Tool",
    "ToolCall",
    "CallError",
    "ToolResult",
    "ToolStatus",
    "ToolRunner",
    "TagCallFormat",
    "HermesCallFormat",
    "JsonCallFormat",
    "CallFormat",
    "calculate",
    "calculator_tool",
]

ToolStatus = Literal["ok", "error", "timeout", "truncated", "unknown_tool", "malformed"]


@dataclasses.dataclass(frozen=True)
class Tool:
    """A host function the policy may call.

    Attributes:
      name: the name the model writes in a call.
      fn: `fn(arguments) -> str`; `arguments` is the raw text between the parentheses of a tag call
        (`TagCallFormat`) or the decoded JSON arguments (`HermesCallFormat`, `JsonCallFormat`). A dict
        or list it returns is shown as JSON, any other value by `str` (a value whose `str` raises is
        an `error` observation).
      description: one line for the tool list of a chat template.
      parameters: its JSON-schema parameters (chat templates' `tools=`).
    """

    name: str
    fn: Callable[[Any], Any]
    description: str = ""
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema chat templates render (`tools=[...]`)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": dict(self.parameters)}}


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A parsed call: the tool's name and its arguments (text or decoded JSON)."""

    name: str
    arguments: Any


@dataclasses.dataclass(frozen=True)
class CallError:
    """A call the format recognised but could not parse (status `malformed`)."""

    message: str


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a call gave back: the observation text for the model, and how the call went."""

    name: str
    text: str
    status: ToolStatus


# ------------------------------------------------------------------------------------------ formats

_CALL = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\((.*)\)\s*", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class TagCallFormat:
    """`<open>name(args)<close>`: the last call of the action, which must end the action.

    Attributes:
      open, close: the tags around a call (`close` is where decoding stops).
      result_open, result_close: the tags around a tool's result in the observation (the raw
        renderer; chat templates use their tool role instead).
    """

    open: str = "<tool>"
    close: str = "</tool>"
    result_open: str = "<result>"
    result_close: str = "</result>"
    stops_at_close: bool = True

    def __post_init__(self):
        for name in ("open", "close"):
            if not getattr(self, name):
                raise ValueError(f"TagCallFormat.{name} must be a non-empty string")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Texts that end a turn besides the end-of-sequence token."""
        return (self.close,)

    def parse(self, action: str) -> ToolCall | CallError | None:
        """The call at the end of `action`, a `CallError` for a bad one, or None (a final answer)."""
        body = action.rstrip()
        if not body.endswith(self.close):
            return None
        body = body[: -len(self.close)]
        start = body.rfind(self.open)
        if start < 0:
            return CallError(f"a call ends with {self.close!r} but has no {self.open!r}")
        inner = body[start + len(self.open):]
        match = _CALL.fullmatch(inner)
        if match is None:
            return CallError(f"malformed call {inner[:80]!r}: expected name(arguments)")
        return ToolCall(match.group(1), match.group(2))

    def render_call(self, name: str, arguments: str) -> str:
        """The text of a call (demonstrations)."""
        return f"{self.open}{name}({arguments}){self.close}"

    def render_result(self, text: str) -> str:
        """The observation text of a result (the raw renderer)."""
        return f"{self.result_open}{text}{self.result_close}"


def _json_call(payload: str, argument_keys: tuple[str, ...]) -> ToolCall | CallError:
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as e:
        return CallError(f"tool call is not valid JSON ({e.msg} at char {e.pos})")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return CallError("tool call JSON must be an object with a string 'name'")
    args = next((value[k] for k in argument_keys if k in value), {})
    if not isinstance(args, dict):
        return CallError(f"tool call arguments must be a JSON object, got {type(args).__name__}")
    return ToolCall(value["name"], args)


@dataclasses.dataclass(frozen=True)
class HermesCallFormat:
    """Qwen2.5 / Qwen3 (Hermes) calls: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

    The turn ends at the chat template's end-of-turn token (`<|im_end|>`); the last call is run.
    """

    open: str = "<tool_call>"
    close: str = "</tool_call>"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return ()

    def parse(self, action: str) -> ToolCall | CallError | None:
        end = action.rfind(self.close)
        if end < 0:
            return CallError(f"unclosed {self.open!r}") if self.open in action else None
        start = action.rfind(self.open, 0, end)
        if start < 0:
            return CallError(f"{self.close!r} without {self.open!r}")
        return _json_call(action[start + len(self.open): end].strip(), ("arguments", "parameters"))


@dataclasses.dataclass(frozen=True)
class JsonCallFormat:
    """Llama-3.1's JSON tool calls: the whole assistant message is `{"name": ..., "parameters": {...}}`."""

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return ()

    def parse(self, action: str) -> ToolCall | CallError | None:
        text = action.strip()
        if not text.startswith("{"):
            return None
        return _json_call(text, ("parameters", "arguments"))


CallFormat = TagCallFormat | HermesCallFormat | JsonCallFormat


# ------------------------------------------------------------------------------------------- runner


@dataclasses.dataclass(frozen=True)
class ToolRunner:
    """Runs one call with a time limit and an output cap; never raises for the tool's sake.

    Each call runs in its own daemon thread joined for `timeout_s` seconds: the caller never waits
    longer, a hanging tool's thread is abandoned (it cannot block the process's exit), and calls
    from different trajectories run concurrently when the rollout steps them from a thread pool.

    Attributes:
      timeout_s: seconds a call may run.
      max_chars: characters of a result kept (the rest replaced by a note).
    """

    timeout_s: float = 5.0
    max_chars: int = 1024

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"ToolRunner.timeout_s must be > 0, got {self.timeout_s!r}")
        if not isinstance(self.max_chars, int) or self.max_chars < 1:
            raise ValueError(f"ToolRunner.max_chars must be a positive int, got {self.max_chars!r}")

    def run(self, tools: Mapping[str, Tool], call: ToolCall | CallError) -> ToolResult:
        """The observation of `call` against `tools` (see the module docstring for the statuses)."""
        if isinstance(call, CallError):
            return ToolResult("", f"error: {call.message}", "malformed")
        tool = tools.get(call.name)
        if tool is None:
            known = ", ".join(sorted(tools)) or "none"
            return ToolResult(call.name, f"error: unknown tool {call.name!r} (available: {known})", "unknown_tool")
        box: dict[str, Any] = {}

        def target():
            try:
                box["value"] = _result_text(tool.fn(call.arguments))
            except Exception as e:  # noqa: BLE001 - a tool's failure becomes the model's observation
                box["error"] = f"{type(e).__name__}: {e}"

        thread = threading.Thread(target=target, name=f"tool-{call.name}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            return ToolResult(call.name, f"error: tool {call.name!r} timed out after {self.timeout_s:g} s", "timeout")
        if "error" in box:
            return ToolResult(call.name, f"error: {box['error']}"[: self.max_chars], "error")
        text = box["value"]
        if len(text) > self.max_chars:
            note = f"...[truncated {len(text) - self.max_chars} chars]"
            return ToolResult(call.name, text[: self.max_chars] + note, "truncated")
        return ToolResult(call.name, text, "ok")


def _result_text(value: Any) -> str:
    """A tool's return value as observation text: a string as is, a dict or list as JSON (what chat
    templates' tool messages carry), anything else by `str`."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        with contextlib.suppress(TypeError, ValueError):  # not JSON-serialisable (e.g. holds a set): `str`
            return json.dumps(value, ensure_ascii=False)
    return str(value)


# --------------------------------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod, ast.Div: operator.truediv, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly: integers (and decimals), + - * / // % **, parentheses.

    Integer results print as integers, others with up to 10 significant digits. Anything else
    (names, calls, attributes) raises `ValueError`; so does an exponent above 64 or a result
    longer than 1,000 digits.

    Example:
      >>> calculate("347 * 59 + (12 - 2) ** 2")
      '20573'
    """
    try:
        tree = ast.parse(str(expression).strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from e

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError(f"exponent {right} is too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported element {type(node).__name__} in {expression!r}")

    value = ev(tree)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value) if isinstance(value, int) else f"{value:.10g}"
    if len(text) > 1000:
        raise ValueError("result has more than 1000 digits")
    return text


def _calc(arguments: Any) -> str:
    if isinstance(arguments, Mapping):
        if "expression" not in arguments:
            raise ValueError(f"calc needs an 'expression' argument, got {sorted(arguments)}")
        arguments = arguments["expression"]
    return calculate(arguments)


def calculator_tool(name: str = "calc") -> Tool:
    """The calculator: `calc(347*59)` -> `20473` (`calculate`); JSON calls pass `{"expression": ...}`."""
    return Tool(name, _calc, description="Evaluate an arithmetic expression exactly.",
                parameters={"type": "object", "properties": {"expression": {"type": "string"}},
                            "required": ["expression"]})
