"""Step-labelled data for process reward models (PRM800K / Math-Shepherd style, TRL's stepwise format).

A row is `{"prompt": str, "completions": [step, ...], "labels": [bool, ...]}` (TRL's stepwise
supervision columns; `steps` is accepted for `completions`), one label per step (True / 1 = the step
is correct; also "+"/"-" as Math-Shepherd writes them). A row whose labels do not match its steps, a
non-string or empty (whitespace-only) step or an unknown label raises a `DataError` naming the file and
line (JSONL) or row: an empty step would put a label on a bare separator, and `PRMScorer.reward` drops
empty steps when it splits a completion, so scoring would not see it.

Tokenization (as TRL's `PRMTrainer`): `[BOS] prompt step_1 sep step_2 sep ... step_K sep`, the
separator (`step_separator`, "\\n" by default) after every step; the label of step k sits on the last
token of its separator, every other position is unlabelled (`step_mask` 0). A solution longer than
`max_len` keeps its first steps that fit (counted in `num_truncated`; no label sits in a cut step); a
row whose prompt and first step do not fit is an error. `solution_labels` keeps each solution's
outcome over all its steps, the cut ones included (the outcome reward model's label).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data.formats import DataError, RowRef, require_columns
from rlhf_jax.data.sources import Source, describe_source, read_rows

__all__ = ["StepExample", "StepDataset", "parse_step_row", "read_step_rows", "tokenize_steps", "load_step_dataset",
           "step_batches"]

_LABELS = {True: 1, False: 0, 1: 1, 0: 0, "+": 1, "-": 0, "true": 1, "false": 0}


@dataclasses.dataclass(frozen=True)
class StepExample:
    """One solution: its prompt, steps and per-step labels (1 = correct)."""

    prompt: str
    steps: tuple[str, ...]
    labels: tuple[int, ...]


def _label(value: Any, ref: RowRef, k: int) -> int:
    key = value.lower() if isinstance(value, str) else value
    if isinstance(key, float) and key in (0.0, 1.0):
        key = int(key)
    try:
        return _LABELS[key]
    except (KeyError, TypeError):
        raise DataError(ref, f"labels[{k}] is {value!r}; a step label is a bool (or 0/1, '+'/'-')") from None


def parse_step_row(row: Any, ref: RowRef) -> StepExample:
    """Validate one step-labelled row (module docstring) and return its `StepExample`."""
    if not isinstance(row, Mapping):
        raise DataError(ref, f"a row must be an object with 'prompt', 'completions' and 'labels', got "
                             f"{type(row).__name__}")
    steps_key = "completions" if "completions" in row or "steps" not in row else "steps"
    require_columns(row, ref, "prompt", steps_key, "labels")
    prompt, steps, labels = row["prompt"], row[steps_key], row["labels"]
    if not isinstance(prompt, str):
        raise DataError(ref, f"column 'prompt' must be a string, got {type(prompt).__name__}")
    if not isinstance(steps, (list, tuple)) or not steps:
        raise DataError(ref, f"column {steps_key!r} must be a non-empty list of step strings, got {steps!r:.80}")
    if not isinstance(labels, (list, tuple)):
        raise DataError(ref, f"column 'labels' must be a list with one label per step, got {labels!r:.80}")
    if len(labels) != len(steps):
        raise DataError(ref, f"{len(labels)} labels for {len(steps)} steps; 'labels' needs one label per step")
    for k, step in enumerate(steps):
        if not isinstance(step, str):
            raise DataError(ref, f"{steps_key}[{k}] must be a string, got {type(step).__name__}")
        if not step.strip():
            raise DataError(ref, f"{steps_key}[{k}] is an empty step {step!r}; every step needs text before its "
                                 "separator")
    return StepExample(prompt, tuple(steps), tuple(_label(v, ref, k) for k, v in enumerate(labels)))


def read_step_rows(source: Source) -> list[StepExample]:
    """Every row of a source (a `.jsonl` / `.json` / `.parquet` / `.csv` path or a list of rows), parsed."""
    out = []
    for ref, row in read_rows(source):
        if isinstance(row, DataError):
            raise row
        out.append(parse_step_row(row, ref))
    if not out:
        raise DataError(RowRef(describe_source(source), None), "no rows")
    return out


@dataclasses.dataclass(frozen=True)
class StepDataset:
    """Tokenized step-labelled solutions, right-padded to `max_len`.

    Attributes:
      tokens: int32 `[N, max_len]`.
      lengths: int32 `[N]` real tokens per row.
      step_mask: bool `[N, max_len]`, True on the last token of each step's separator.
      step_labels: int32 `[N, max_len]`, the step's label there (0 elsewhere).
      pad_id: the padding id.
      num_truncated: rows that lost steps to `max_len`.
      solution_labels: int32 `[N]`, 1 when every step of the solution is correct (all its steps,
        also those cut by `max_len`); None for datasets built without it.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    step_mask: np.ndarray
    step_labels: np.ndarray
    pad_id: int
    num_truncated: int = 0
    solution_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def tokenize_steps(examples: Sequence[StepExample], tokenizer, *, max_len: int, step_separator: str = "\n",
                   source: str = "<rows>") -> StepDataset:
    """Token ids and step-end labels of `examples` (layout in the module docstring).

    Raises:
      ValueError: the separator encodes to no token.
      DataError: a row whose prompt and first step exceed `max_len` (naming `source` and its row).
    """
    sep = _encode(tokenizer, step_separator)
    if not sep:
        raise ValueError(f"tokenize_steps: step_separator {step_separator!r} encodes to no token")
    holding = [i for i, ex in enumerate(examples) if any(step_separator in step for step in ex.steps)]
    if holding:  # trained as one step, scored as several
        warnings.warn(f"tokenize_steps: {len(holding)} rows of {source} have a step containing the step separator "
                      f"{step_separator!r} (the first: row {holding[0]}); each is labelled as one step here, but "
                      "PRMScorer.reward splits a completion at every separator", stacklevel=2)
    bos = [] if getattr(tokenizer, "bos_token_id", None) is None else [tokenizer.bos_token_id]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(examples)
    tokens = np.full((n, max_len), pad_id, np.int32)
    mask = np.zeros((n, max_len), bool)
    labels = np.zeros((n, max_len), np.int32)
    lengths = np.zeros(n, np.int32)
    outcomes = np.array([int(all(label == 1 for label in ex.labels)) for ex in examples], np.int32)
    truncated = 0
    for i, ex in enumerate(examples):
        ids = bos + _encode(tokenizer, ex.prompt)
        ends: list[tuple[int, int]] = []
        for step, label in zip(ex.steps, ex.labels):
            piece = _encode(tokenizer, step) + sep
            if len(ids) + len(piece) > max_len:
                truncated += 1
                break
            ids += piece
            ends.append((len(ids) - 1, label))
        if not ends:
            raise DataError(RowRef(source, i), f"the prompt and first step take more than max_len={max_len} tokens")
        tokens[i, :len(ids)] = ids
        lengths[i] = len(ids)
        for t, label in ends:
            mask[i, t], labels[i, t] = True, label
    return StepDataset(tokens, lengths, mask, labels, int(pad_id), truncated, outcomes)


def load_step_dataset(source: Source, tokenizer, *, max_len: int, step_separator: str = "\n") -> StepDataset:
    """`read_step_rows` then `tokenize_steps`."""
    return tokenize_steps(read_step_rows(source), tokenizer, max_len=max_len, step_separator=step_separator,
                          source=describe_source(source))


def step_batches(dataset: StepDataset, *, batch_size: int, seed: int, start: int = 0, shuffle: bool = True):
    """Endless batches `{"tokens", "step_mask", "step_labels", "example_mask"}` from batch index `start`.

    Epoch `e` visits the rows in the permutation of `(seed, e)`; batch `b` is a pure function of
    `(seed, b)`, so a run resumes by its batch count. The last partial batch of an epoch is dropped.
    """
    n = len(dataset)
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"step_batches: {n} rows do not fill one batch of {batch_size}")
    b = start
    while True:
        epoch, k = divmod(b, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        rows = order[k * batch_size:(k + 1) * batch_size]
        yield {"tokens": dataset.tokens[rows], "step_mask": dataset.step_mask[rows],
               "step_labels": dataset.step_labels[rows], "example_mask": np.ones(batch_size, bool)}
        b += 1
