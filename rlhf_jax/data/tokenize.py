"""Tokenization with the tokenizer's chat template: loss masks, EOS, truncation; batched fast calls.

A sequence spec (`formats.Plain` or `formats.Chat`) becomes token ids and a loss mask marking the
tokens that are trained on:

- `Plain(prompt, completion)`: `[BOS] + ids(prompt)` (BOS when the tokenizer has one) untrained,
  then `ids(completion) + [EOS]` trained.
- `Chat(messages, num_context)`: for each trained assistant turn `i`, the template renders the
  conversation up to turn `i` with the generation prompt (`A_i`) and up to and including turn `i`
  (`B_i`); `B_i[len(A_i):]` is trained, the text between turns is not. Every render must extend the
  previous one (a "prefix-stable" template); otherwise the row is rejected with that reason (e.g. a
  template that drops earlier turns' reasoning, as Qwen3's does, in a multi-turn row). Any template
  works: `{% generation %}` marks are not needed and not read. A prompt-only conversation renders
  once, with the generation prompt. A prompt/completion row is TRL's: the prompt rendered with the
  generation prompt, the completion the rest of the whole render.

Pieces are tokenized separately, all pieces of a chunk of rows in one batched call of the fast
(Rust) tokenizer, and concatenated; chunks also share identical renders and texts (a preference
pair's prompt is rendered and tokenized once, so chosen and rejected share its tokens). A piece after
another is encoded as a continuation: no start-of-text marker (SentencePiece's "▁" on the first word,
Llama-2 / Mistral). Where a template joins two pieces without a special token or a split of the
tokenizer's pre-tokenizer between them, a merge across the boundary is not made (the prompt keeps the
tokens it has alone, as sampling after it sees them).

EOS exactly once: a trained turn is trained up to and including its EOS; template text after it (e.g.
Qwen's newline after `<|im_end|>`) is untrained, or dropped after the last turn; a last turn without
EOS gets one appended, and a completion whose text already contains the EOS token is rejected. The
template's end-of-turn token is recognized as the tokenizer's EOS only: a tokenizer whose EOS differs
from it (a base model's `<|endoftext|>` with a ChatML template) trains the text after `<|im_end|>`
and gets its EOS appended at the end; set `tokenizer.eos_token` to the end-of-turn token for chat
training. The first token of a sequence is never trained on (nothing precedes it), which
also keeps packed segments from predicting across their boundary.

BOS at most once: a plain text that starts with the BOS token itself gets no second one. A message
whose content holds a special token (e.g. text already rendered with a chat template, which the
template would wrap again) is rejected.

Truncation (`TokenizeConfig.truncation`), as TRL defines it:

1. A prompt (the tokens before the first trained token) longer than `max_prompt_len` keeps its
   first (`keep_start`) or last (`keep_end`) `max_prompt_len` tokens.
2. A prompt that leaves no room for a completion (`>= max_len` tokens) is an error (or a skipped row).
3. A sequence longer than `max_len` keeps its first (`keep_start`: the completion's end and its EOS
   are cut) or last (`keep_end`: the prompt's start is cut) `max_len` tokens.

`keep_end` never cuts a leading BOS: the kept tokens follow it.

Tools (`TokenizeConfig.tools`, agentic runs with `environment.renderer="chat"`): every render of a
message list gets the tools' JSON schemas (`apply_chat_template(..., tools=...)`), so a prompt holds
the template's tool list (e.g. Qwen's `# Tools ... <tools>...</tools>` system turn) and the
generation prompt: the text `rlhf_jax.agents.ChatRenderer.prompt_tokens` gives, which the agent's
turns and observations extend. Such a prompt is never cut: one longer than `max_prompt_len`, or one
that `keep_end` would shorten at the start to fit `max_len`, is a problem of the row (a cut would drop
the tool list or the generation prompt).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal


from rlhf_jax.data.formats import DEFAULT_ROLES, Chat, Plain, SequenceSpec, resolve_prompt_template

if TYPE_CHECKING:  # transformers is imported on first use: it is slow to import
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "Truncation",
    "TokenizeConfig",
    "TokenizedSequence",
    "TokenizerError",
    "load_tokenizer",
    "tokenize_sequences",
    "encode_pieces",
    "special_pattern",
]

Truncation = Literal["keep_start", "keep_end"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """How rows become token ids.

    Attributes:
      max_len: the most tokens in one sequence (prompt + completion).
      max_prompt_len: prompts longer than this are truncated (None: only `max_len` bounds them).
      truncation: "keep_start" or "keep_end" (see the module docstring).
      string_format: "plain": string prompts/completions are raw text without the chat template
        (TRL's standard format); "chat": they become a user and an assistant message rendered with
        the template. Message lists always use the template.
      roles: the message roles accepted (an unknown role is a bad row).
      chunk_size: rows per batched tokenizer call.
      prompt_template: prompt rows only: a name in `PROMPT_TEMPLATES` or a text with one `{prompt}`
        field the prompt is put into (`rlhf_jax.data.formats.parse_row`); None: prompts as they are.
      tools: None (renders without tools), or the JSON schemas (`Tool.schema()`) of the tools an
        agent is offered, possibly none: every render of a message list passes them as
        `apply_chat_template(tools=...)` (None when empty, as `ChatRenderer` does), and a message
        list's prompt is never cut (module docstring). Plain-text sequences are not templated.
    """

    max_len: int
    max_prompt_len: int | None = None
    truncation: Truncation = "keep_end"
    string_format: Literal["plain", "chat"] = "plain"
    roles: tuple[str, ...] = DEFAULT_ROLES
    chunk_size: int = 4096
    prompt_template: str | None = None
    tools: tuple[Mapping[str, Any], ...] | None = None

    def __post_init__(self):
        if not isinstance(self.max_len, int) or isinstance(self.max_len, bool) or self.max_len < 2:
            raise ValueError(f"TokenizeConfig.max_len must be an int >= 2, got {self.max_len!r}")
        if self.max_prompt_len is not None and (
            not isinstance(self.max_prompt_len, int) or isinstance(self.max_prompt_len, bool)
            or not 1 <= self.max_prompt_len < self.max_len
        ):
            raise ValueError(
                f"TokenizeConfig.max_prompt_len must be None or an int in [1, max_len={self.max_len}), "
                f"got {self.max_prompt_len!r}"
            )
        if self.truncation not in ("keep_start", "keep_end"):
            raise ValueError(
                f"TokenizeConfig.truncation must be 'keep_start' or 'keep_end', got {self.truncation!r}"
            )
        if self.string_format not in ("plain", "chat"):
            raise ValueError(
                f"TokenizeConfig.string_format must be 'plain' or 'chat', got {self.string_format!r}"
            )
        if not self.roles or not all(isinstance(r, str) for r in self.roles):
            raise ValueError(f"TokenizeConfig.roles must be a non-empty tuple of strings, got {self.roles!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"TokenizeConfig.chunk_size must be a positive int, got {self.chunk_size!r}")
        resolve_prompt_template(self.prompt_template, "TokenizeConfig.prompt_template")
        if self.tools is not None:
            if not isinstance(self.tools, (tuple, list)) or not all(isinstance(t, Mapping) for t in self.tools):
                raise ValueError(f"TokenizeConfig.tools must be None or a sequence of JSON schema mappings, "
                                 f"got {self.tools!r}")
            object.__setattr__(self, "tools", tuple(self.tools))


@dataclasses.dataclass(frozen=True)
class TokenizedSequence:
    """One tokenized sequence.

    Attributes:
      ids: the L <= max_len token ids.
      mask: L bools, True on trained tokens (the completion / assistant turns and their EOS).
      prompt_len: tokens before the first trained token (L for a prompt-only sequence).
      truncated: True when `max_len` or `max_prompt_len` cut tokens.
    """

    ids: list[int]
    mask: list[bool]
    prompt_len: int
    truncated: bool


class TokenizerError(OSError):
    """A tokenizer directory this package cannot use; the message names the directory."""


_TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _unreadable_json(path: str) -> str | None:
    """Which JSON file of a tokenizer directory does not parse, as "FILE is not valid JSON (...)"; None: all do."""
    for name in _TOKENIZER_JSON_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            with open(file, encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as err:
            return f"{file} is not valid JSON ({err})"
    return None


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a fast Hugging Face tokenizer from a local directory (never from the network).

    Args:
      path: a directory written by `save_pretrained` (tokenizer.json, tokenizer_config.json, ...).

    Returns:
      The `PreTrainedTokenizerFast`.

    Raises:
      FileNotFoundError: naming `path` when it is not a local directory.
      TokenizerError: naming `path` when the directory holds no readable tokenizer (missing or corrupt
        files) or only a slow (Python) one.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"load_tokenizer reads local directories only: {path!r} is not a directory "
            "(download the tokenizer once and pass its directory)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        reason = _unreadable_json(path) or err
        raise TokenizerError(f"load_tokenizer: no usable tokenizer in {path!r}: {reason}") from err
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TokenizerError(
            f"load_tokenizer: {path!r} holds a slow {type(tokenizer).__name__}; "
            "a fast tokenizer (tokenizer.json) is needed"
        )
    config_file = os.path.join(path, "tokenizer_config.json")
    if tokenizer.eos_token is None and not os.path.isfile(config_file):
        raise TokenizerError(
            f"load_tokenizer: {config_file} is missing, so the tokenizer in {path!r} has no EOS, pad or BOS "
            "token and no chat template (rollouts would never stop); write the directory with save_pretrained"
        )
    return tokenizer


# -------------------------------------------------------------------------------------- rendering


def _key(messages: Sequence[Mapping[str, Any]]) -> Hashable:
    """A hashable key of a conversation (an unshareable object when some value is unhashable)."""
    try:
        key = tuple(tuple(sorted(m.items())) for m in messages)
        hash(key)
        return key
    except TypeError:
        return object()


def _render_all(
    requests: dict[tuple[Hashable, bool], tuple[Sequence[Mapping[str, Any]], bool]], tokenizer,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> dict[tuple[Hashable, bool], str | Exception]:
    """Render each distinct (conversation, add_generation_prompt) once, batched per flag (with
    `tools=`, when there are tools)."""
    out: dict[tuple[Hashable, bool], str | Exception] = {}
    options = {"tools": [dict(t) for t in tools]} if tools else {}
    for generation in (False, True):
        keys = [k for k, (_, g) in requests.items() if g == generation]
        if not keys:
            continue
        convs = [list(requests[k][0]) for k in keys]
        try:
            texts = tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=generation,
                                                  **options)
        except Exception:  # noqa: BLE001 -- find the conversations at fault one by one
            texts = []
            for conv in convs:
                try:
                    # as a batch of one: transformers refuses an empty conversation alone, while the
                    # template may render one (the text before a leading assistant message)
                    texts.append(
                        tokenizer.apply_chat_template([conv], tokenize=False, add_generation_prompt=generation,
                                                      **options)[0]
                    )
                except Exception as err:  # noqa: BLE001 -- reported as the row's problem
                    texts.append(err)
        out.update(zip(keys, texts))
    return out


# Pieces of one sequence: (text or token-id list, trained).
_Piece = tuple[Any, bool]


def _chat_pieces(spec: Chat, rendered, keys) -> list[_Piece] | str:
    """Split a conversation's renders into untrained / trained text pieces."""
    messages = spec.messages
    turns = [i for i in range(spec.num_context, len(messages)) if messages[i]["role"] == "assistant"]
    if not turns:
        text = rendered[(keys[len(messages)], True)]
        return f"the chat template failed: {text}" if isinstance(text, Exception) else [(text, False)]
    pieces: list[_Piece] = []
    done = ""
    for turn in turns:
        before, after = rendered[(keys[turn], True)], rendered[(keys[turn + 1], False)]
        for text in (before, after):
            if isinstance(text, Exception):
                if turn == 0 and text is before:
                    return ("the chat template cannot render the empty conversation before the leading assistant "
                            f"message 0 (the text its trained tokens follow): {text}; start the row with a "
                            "system or user message")
                return f"the chat template failed: {text}"
        if not before.startswith(done) or not after.startswith(before):
            return (
                f"the chat template is not prefix-stable at message {turn}: rendering the conversation "
                "turn by turn does not extend the earlier render, so the trained tokens cannot be located"
            )
        pieces.append((before[len(done) :], False))
        pieces.append((after[len(before) :], True))
        done = after
    return pieces


def special_pattern(tokenizer):
    """A regex matching the text of every special token of `tokenizer` (None when it has none)."""
    tokens = set(tokenizer.all_special_tokens)
    tokens.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    tokens.discard("")
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _special_in_content(spec: Chat, pattern, eos_text: str) -> str | None:
    """The problem of a message whose text holds a special token (text already rendered with a chat
    template, which the template would wrap a second time), or None."""
    if pattern is None:
        return None
    for i, message in enumerate(spec.messages):
        content = message.get("content")
        found = pattern.search(content) if isinstance(content, str) else None
        if found and found.group() == eos_text:
            return f"message {i} ({message['role']}) content contains the EOS token {eos_text!r}"
        if found:
            return (
                f"message {i} ({message['role']}) content holds the special token {found.group()!r}: "
                "text already rendered with a chat template would be templated twice; pass such text "
                "with string_format='plain', or raw message contents"
            )
    return None


def _truncate(ids: list[int], mask: list[bool], prompt_len: int, bos: int | None, config: TokenizeConfig,
              *, whole_prompt: bool = False):
    """Apply max_prompt_len and max_len (module docstring); returns (ids, mask, prompt_len, cut) or a problem.

    `whole_prompt`: the prompt may not be cut (a render with tools): a cut it would need is the problem.
    """
    cut = False
    keep_bos = bos is not None and bool(ids) and ids[0] == bos
    limit = config.max_prompt_len
    if whole_prompt and limit is not None and prompt_len > limit:
        return (f"the prompt rendered with the chat template and the agent's tools has {prompt_len} tokens, more "
                f"than max_prompt_len={limit}; it is not cut (that would drop the tool list or the generation "
                "prompt): raise max_prompt_len or shorten the prompt")
    if limit is not None and prompt_len > limit:
        cut = True
        if config.truncation == "keep_start":
            drop = slice(limit, prompt_len)
        else:
            start = 1 if keep_bos else 0
            drop = slice(start, start + prompt_len - limit)
        del ids[drop], mask[drop]
        prompt_len = limit
    if prompt_len >= config.max_len:
        return f"the prompt has {prompt_len} tokens, leaving no room for a completion within max_len={config.max_len}"
    if whole_prompt and len(ids) > config.max_len and config.truncation == "keep_end" and prompt_len:
        return (f"the conversation rendered with the chat template and the agent's tools has {len(ids)} tokens, "
                f"more than max_len={config.max_len}; keep_end would cut its prompt (the tool list) at the start")
    if len(ids) > config.max_len:
        cut = True
        if config.truncation == "keep_start":
            del ids[config.max_len :], mask[config.max_len :]
        else:
            start = 1 if keep_bos else 0
            drop = slice(start, start + len(ids) - config.max_len)
            del ids[drop], mask[drop]
            mask[0] = False
            prompt_len = mask.index(True)
    return ids, mask, prompt_len, cut


def tokenize_sequences(
    specs: Sequence[SequenceSpec], tokenizer: PreTrainedTokenizerFast, config: TokenizeConfig
) -> list[TokenizedSequence | str]:
    """Tokenize sequence specs with masks, EOS handling and truncation (module docstring).

    One batched render per `add_generation_prompt` flag and one batched fast-tokenizer call for all
    specs; identical renders and texts are computed once.

    Args:
      specs: `Plain` / `Chat` sequences (from `formats.parse_row`).
      tokenizer: a fast tokenizer with an EOS token (and a chat template for `Chat` specs).
      config: lengths and truncation.

    Returns:
      Per spec, a `TokenizedSequence`, or a string describing why the spec is unusable (a prompt
      with no room for a completion, EOS inside the text, a template failure).
    """
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(
            f"tokenize_sequences needs a fast tokenizer (PreTrainedTokenizerFast), got {type(tokenizer).__name__}"
        )
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        raise ValueError("tokenize_sequences: the tokenizer has no eos_token; set tokenizer.eos_token first")
    if any(isinstance(s, Chat) for s in specs) and not tokenizer.chat_template:
        raise ValueError("tokenize_sequences: message-list rows need a tokenizer with a chat_template")

    # 1. Render every distinct conversation prefix the chat specs need.
    requests: dict[tuple[Hashable, bool], tuple[Sequence[Mapping[str, Any]], bool]] = {}
    chat_keys: dict[int, list[Hashable]] = {}
    for n, spec in enumerate(specs):
        if not isinstance(spec, Chat):
            continue
        messages = spec.messages
        keys = [_key(messages[:i]) for i in range(len(messages) + 1)]
        chat_keys[n] = keys
        turns = [i for i in range(spec.num_context, len(messages)) if messages[i]["role"] == "assistant"]
        if not turns:
            requests[(keys[-1], True)] = (messages, True)
        for i in turns:
            requests[(keys[i], True)] = (messages[:i], True)
            requests[(keys[i + 1], False)] = (messages[: i + 1], False)
    rendered = _render_all(requests, tokenizer, config.tools)

    # 2. Cut each spec into pieces; collect the distinct texts.
    specials = special_pattern(tokenizer) if chat_keys else None
    # A text after another text of its sequence is encoded as a continuation (`encode_pieces`).
    all_pieces: list[list[_Piece] | str] = []
    texts: dict[tuple[str, bool], int] = {}
    for n, spec in enumerate(specs):
        if isinstance(spec, Plain):
            pieces: list[_Piece] | str = [([bos] if bos is not None else [], False), (spec.prompt, False)]
            if spec.completion is not None:
                pieces.append((spec.completion, True))
        else:
            pieces = (_special_in_content(spec, specials, tokenizer.eos_token)
                      or _chat_pieces(spec, rendered, chat_keys[n]))
        if not isinstance(pieces, str):
            started = False
            for k, (piece, trained) in enumerate(pieces):
                if isinstance(piece, str):
                    key = (piece, started)
                    texts.setdefault(key, len(texts))
                    pieces[k] = (key, trained)
                    started = started or bool(piece)
        all_pieces.append(pieces)
    text_ids = encode_pieces(tokenizer, list(texts)) if texts else []

    # 3. Assemble ids and masks; EOS exactly once; truncate.
    eos_problem = f"the completion text contains the EOS token {tokenizer.eos_token!r}"
    out: list[TokenizedSequence | str] = []
    for spec, pieces in zip(specs, all_pieces):
        if isinstance(pieces, str):
            out.append(pieces)
            continue
        allowed = 0 if isinstance(spec, Plain) else 1  # a template may end a turn with EOS itself
        last = len(pieces) - 1  # the final trained piece, when there is one, is the last piece
        ids: list[int] = []
        mask: list[bool] = []
        problem = None
        for k, (piece, trained) in enumerate(pieces):
            part = piece if isinstance(piece, list) else text_ids[texts[piece]]
            tail: list[int] = []
            if trained:
                count = part.count(eos)
                if count > allowed:
                    problem = eos_problem
                    break
                if count:  # a turn is trained up to its EOS; template text after it is not
                    end = part.index(eos) + 1
                    part, tail = part[:end], ([] if k == last else part[end:])
                elif k == last:
                    part = part + [eos]
            ids += part + tail
            mask += [trained] * len(part) + [False] * len(tail)
        if problem is not None:
            out.append(problem)
            continue
        if isinstance(spec, Plain) and bos is not None and ids[:2] == [bos, bos]:
            del ids[0], mask[0]  # the text starts with BOS itself: one BOS, as TRL keeps it
        if mask:
            mask[0] = False
        prompt_len = mask.index(True) if True in mask else len(mask)
        result = _truncate(ids, mask, prompt_len, bos, config,
                           whole_prompt=config.tools is not None and isinstance(spec, Chat))
        if isinstance(result, str):
            out.append(result)
            continue
        out.append(TokenizedSequence(*result))
    return out


def encode_pieces(tokenizer, keys: list[tuple[str, bool]]) -> list[list[int]]:
    """Token ids of each `(text, continuation)`: a continuation is encoded as it is within a longer text.

    A tokenizer that marks the start of a text (SentencePiece's "▁" word-start prefix, added to the
    first word of each `encode` call, as Llama-2 / Mistral tokenizers do) would put that marker at
    the start of every piece encoded alone, e.g. a completion "The" after "[/INST]" becoming "▁The":
    tokens that neither the whole render nor sampling after the prompt gives. A continuation is
    encoded after the EOS token (a special token, which splits the text there) and that id removed.
    """
    eos, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    encoded = _encode_plain(tokenizer.backend_tokenizer, [eos_text + t if c else t for t, c in keys])
    out = []
    for (text, continuation), e in zip(keys, encoded):
        ids = e.ids
        if continuation:
            ids = ids[1:] if ids[:1] == [eos] else _encode_plain(tokenizer.backend_tokenizer, [text])[0].ids
        out.append(ids)
    return out


def _encode_plain(backend, texts: list[str]) -> list:
    """`backend.encode_batch_fast(texts)` with no padding and no truncation, whatever the backend was left with.

    A `transformers` call such as `tokenizer(texts, padding=True)` leaves padding switched on in the
    shared backend tokenizer; encoding pieces with it would put pad tokens inside every sequence.
    The backend's own settings are restored afterwards.
    """
    padding, truncation = backend.padding, backend.truncation
    if padding is not None:
        backend.no_padding()
    if truncation is not None:
        backend.no_truncation()
    try:
        return backend.encode_batch_fast(texts, add_special_tokens=False)
    finally:
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)
