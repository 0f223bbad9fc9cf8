"""`load_dataset`: any source -> validated, tokenized examples held as ragged NumPy arrays.

    rows (sources.read_rows) -> examples (formats.parse_row) -> ids + masks (tokenize.tokenize_sequences)

Everything is tokenized up front, in chunks of `TokenizeConfig.chunk_size` rows with one batched
tokenizer call each, so every bad row is found (and named) before training starts, and iterators can
shuffle, shard and resume by index. A row that cannot be used raises `DataError` naming the file, the
line (row) and the problem; with `on_error="skip"` it is counted, kept in `dataset.skipped`, and
reported in a warning instead; sequences cut by truncation are counted and reported in that
warning too. Nothing is dropped or cut silently.

Arrays per kind (`TokenizedDataset.arrays`; `Ragged` = variable-length rows):

- "sft":        tokens, loss_mask (Ragged)
- "preference": chosen_tokens, chosen_loss_mask, rejected_tokens, rejected_loss_mask (Ragged),
                margin float32 [N]
- "unpaired":   tokens, loss_mask (Ragged), label bool [N], prompt_length int32 [N]
- "prompt":     prompt_tokens (Ragged); the extra columns in `TokenizedDataset.columns`
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from rlhf_jax.data.formats import (
    KINDS,
    DataError,
    Kind,
    PreferenceExample,
    PromptExample,
    RowRef,
    parse_row,
)
from rlhf_jax.data.sources import Source, describe_source, read_rows
from rlhf_jax.data.tokenize import TokenizeConfig, TokenizedSequence, tokenize_sequences

__all__ = ["OnError", "Ragged", "TokenizedDataset", "load_dataset"]

OnError = Literal["raise", "skip"]
logger = logging.getLogger("rlhf_jax.data")


@dataclasses.dataclass(frozen=True)
class Ragged:
    """Variable-length rows stored flat: row i is `values[offsets[i]:offsets[i + 1]]`."""

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence], dtype) -> "Ragged":
        """Concatenate `rows` (lists or 1-D arrays) into one ragged array of `dtype`."""
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=int(offsets[-1]))
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """int64 [N] row lengths."""
        return np.diff(self.offsets)


@dataclasses.dataclass(frozen=True)
class TokenizedDataset:
    """Tokenized examples of one kind, ready for `BatchIterator`.

    Attributes:
      kind: "sft", "preference", "unpaired" or "prompt".
      arrays: per-kind arrays (module docstring), one entry per example.
      columns: for "prompt": every extra column (e.g. "answer") as a list, one entry per example.
      pad_id: the id written into padding (the tokenizer's pad token, else its EOS).
      source: the source's name, for messages.
      num_rows: rows read from the source (usable + skipped).
      skipped: the `DataError` of every skipped row (`on_error="skip"`), in source order.
      num_truncated: sequences cut by `max_len` / `max_prompt_len`.
    """

    kind: Kind
    arrays: Mapping[str, Any]
    columns: Mapping[str, list]
    pad_id: int
    source: str
    num_rows: int
    skipped: tuple[DataError, ...] = ()
    num_truncated: int = 0

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    @property
    def column_names(self) -> tuple[str, ...]:
        """The extra columns (of a "prompt" dataset), sorted: what reward functions can read."""
        return tuple(sorted(self.columns))

    def lengths(self) -> np.ndarray:
        """int64 [N, tracks] sequence lengths per example (2 tracks, chosen and rejected, for preference)."""
        if self.kind == "preference":
            return np.stack(
                [self.arrays["chosen_tokens"].lengths, self.arrays["rejected_tokens"].lengths], axis=1
            )
        name = "prompt_tokens" if self.kind == "prompt" else "tokens"
        return self.arrays[name].lengths[:, None]

    def report(self) -> str:
        """One line: rows read, examples kept, rows skipped (with the first few reasons), truncations."""
        text = f"{self.source}: {self.num_rows} rows read, {len(self)} {self.kind} examples"
        if self.num_truncated:
            text += f", {self.num_truncated} sequences truncated"
        if self.skipped:
            shown = "; ".join(str(e) for e in self.skipped[:3])
            more = f"; ... {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            text += f", {len(self.skipped)} rows skipped ({shown}{more})"
        return text


def _specs(example) -> list:
    if isinstance(example, PreferenceExample):
        return [example.chosen, example.rejected]
    if isinstance(example, PromptExample):
        return [example.prompt]
    return [example.sequence]


class _Builder:
    """Accumulates tokenized examples of one kind into lists, then into arrays."""

    def __init__(self, kind: Kind):
        self.kind = kind
        self.lists: dict[str, list] = {}
        self.columns: dict[str, list] = {}
        self.count = 0
        self.truncated = 0

    def _put(self, name: str, value) -> None:
        self.lists.setdefault(name, []).append(value)

    def add(self, example, seqs: list[TokenizedSequence]) -> None:
        self.truncated += sum(s.truncated for s in seqs)
        if self.kind == "preference":
            for prefix, s in zip(("chosen_", "rejected_"), seqs):
                self._put(prefix + "tokens", s.ids)
                self._put(prefix + "loss_mask", s.mask)
            self._put("margin", example.margin)
        elif self.kind == "prompt":
            self._put("prompt_tokens", seqs[0].ids)
            for name in set(self.columns) | set(example.columns):
                # A column missing from some rows is None there (JSONL rows need not agree).
                self.columns.setdefault(name, [None] * self.count).append(example.columns.get(name))
        else:
            self._put("tokens", seqs[0].ids)
            self._put("loss_mask", seqs[0].mask)
            if self.kind == "unpaired":
                self._put("label", example.label)
                self._put("prompt_length", seqs[0].prompt_len)
        self.count += 1

    def arrays(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, values in self.lists.items():
            if name.endswith("tokens"):
                out[name] = Ragged.from_rows(values, np.int32)
            elif name.endswith("loss_mask"):
                out[name] = Ragged.from_rows(values, np.bool_)
            else:
                dtype = {"margin": np.float32, "label": np.bool_, "prompt_length": np.int32}[name]
                out[name] = np.asarray(values, dtype)
        return out


class _Counted:
    """`(index, ref, row)` of an iterator of `(ref, row)`, counting the rows it yields."""

    def __init__(self, rows):
        self._rows, self.count = rows, 0

    def __iter__(self):
        for ref, row in self._rows:
            self.count += 1
            yield self.count - 1, ref, row


def tokenized_rows(rows, *, kind: Kind, tokenizer, config: TokenizeConfig, reject, rename=None):
    """`(index, ref, example, sequences)` of every usable row of `rows`, an iterable of `(index, ref, row)`.

    Rows are parsed one at a time and tokenized in chunks of `config.chunk_size` (one batched
    tokenizer call each). An unusable row (a `DataError` from the source, a bad layout, a sequence
    that cannot be tokenized) goes to `reject(error, index)`, which raises or records it.
    """

    def flush(chunk):
        specs = [spec for _, _, example in chunk for spec in _specs(example)]
        results = tokenize_sequences(specs, tokenizer, config)
        at = 0
        for index, ref, example in chunk:
            seqs = results[at : at + len(_specs(example))]
            at += len(seqs)
            problems = [s for s in seqs if isinstance(s, str)]
            if problems:
                if kind == "preference":
                    which = "chosen" if isinstance(seqs[0], str) else "rejected"
                    reject(DataError(ref, f"{which}: {problems[0]}"), index)
                else:
                    reject(DataError(ref, problems[0]), index)
                continue
            if kind == "preference" and seqs[0].ids == seqs[1].ids:
                # A pair of equal token rows has no preference: a reward model or DPO would train on a tie.
                cut = f" after truncation to max_len={config.max_len} (truncation={config.truncation!r})" \
                    if seqs[0].truncated or seqs[1].truncated else " as tokens"
                reject(DataError(ref, f"'chosen' and 'rejected' are identical{cut}"), index)
                continue
            yield index, ref, example, seqs

    chunk: list = []
    for index, ref, row in rows:
        if isinstance(row, DataError):
            reject(row, index)
            continue
        if rename and isinstance(row, Mapping):
            clash = [(k, rename[k]) for k in row if k in rename and rename[k] in row and rename[k] not in rename]
            if clash:  # the renamed column would silently replace a column of the same name
                reject(DataError(ref, f"rename maps column {clash[0][0]!r} to {clash[0][1]!r}, which the row "
                                      f"already has; found columns {sorted(row)}"), index)
                continue
            row = {rename.get(k, k): v for k, v in row.items()}
        try:
            example = parse_row(row, kind, ref, roles=config.roles, string_format=config.string_format,
                                prompt_template=config.prompt_template)
        except DataError as error:
            reject(error, index)
            continue
        chunk.append((index, ref, example))
        if len(chunk) >= config.chunk_size:
            yield from flush(chunk)
            chunk = []
    if chunk:
        yield from flush(chunk)


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector: loading creates millions of small acyclic objects
    (lists of ids), and the collector's repeated scans of them would double the loading time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_dataset(
    source: Source,
    *,
    kind: Kind,
    tokenizer,
    config: TokenizeConfig,
    on_error: OnError = "raise",
    split: str | None = None,
    rename: Mapping[str, str] | None = None,
) -> TokenizedDataset:
    """Read, validate and tokenize a dataset of `kind` from any source.

    Args:
      source: a path (.jsonl/.json/.parquet/.csv, a saved HF dataset or a TFDS directory), a
        `TFDSSource`, a `datasets.Dataset`, or a list of row mappings.
      kind: "sft", "preference", "unpaired" (KTO) or "prompt" (online RL); layouts in `formats`.
      tokenizer: a fast Hugging Face tokenizer (e.g. `load_tokenizer(dir)` or the offline one).
      config: lengths, truncation, string format, allowed roles.
      on_error: "raise" stops at the first bad row with a `DataError` naming its file and line
        (row) and the problem; "skip" skips such rows, counts them in `skipped` and logs a warning.
      split: the split of a saved `DatasetDict` or TFDS directory.
      rename: source column -> expected column, e.g. `{"question": "prompt"}`.

    Returns:
      The `TokenizedDataset`.

    Raises:
      DataError: for a bad row (with `on_error="raise"`), or when no row is usable.
    """
    if kind not in KINDS:
        raise ValueError(f"load_dataset: kind must be one of {KINDS}, got {kind!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"load_dataset: on_error must be 'raise' or 'skip', got {on_error!r}")
    if not isinstance(config, TokenizeConfig):
        raise TypeError(f"load_dataset: config must be a TokenizeConfig, got {type(config).__name__}")
    name = describe_source(source)
    builder = _Builder(kind)
    skipped: list[DataError] = []

    def reject(error: DataError, index: int) -> None:
        if on_error == "raise":
            raise error
        skipped.append(error)

    with _gc_paused():
        rows = read_rows(source, split=split)
        counted = _Counted(rows)
        for _, _, example, seqs in tokenized_rows(counted, kind=kind, tokenizer=tokenizer, config=config,
                                                  reject=reject, rename=rename):
            builder.add(example, seqs)
        num_rows = counted.count
        arrays = builder.arrays()

    skipped.sort(key=lambda e: (e.ref.source, e.ref.index))
    if builder.count == 0:
        first = f"; first problem: {skipped[0]}" if skipped else ""
        raise DataError(  # the whole source is at fault: the message names it, not a row
            RowRef(name, None), f"no usable {kind} rows ({num_rows} read, {len(skipped)} skipped{first})"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = TokenizedDataset(
        kind=kind,
        arrays=arrays,
        columns=builder.columns,
        pad_id=int(pad_id),
        source=name,
        num_rows=num_rows,
        skipped=tuple(skipped),
        num_truncated=builder.truncated,
    )
    if skipped or builder.truncated:  # nothing dropped or cut without a word
        logger.warning("rlhf_jax.data: %s", dataset.report())
    return dataset
