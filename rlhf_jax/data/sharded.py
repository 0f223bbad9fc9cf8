"""A data source read and tokenized in shards by the processes of a multi-process run.

One process reads, validates and tokenizes everything (`load_dataset`). With P processes each one
tokenizes only a share, yet all of them form the same global batches as one process would:

1. **Validation pass.** Process p parses and tokenizes the rows `r` with `r % P == p` (the other
   rows are read past: a JSONL line's JSON is not parsed, a TFDS record not read, nothing of them
   is tokenized). It notes, per row, whether the row is usable and its sequence lengths, and
   fingerprints the source as its host sees it (a path's SHA-256: hosts with different copies of a
   file would otherwise mix their rows silently).
2. **Exchange.** The processes swap these small integer tables (`allgather`, e.g.
   `rlhf_jax.distributed.gather_rows`). Now every process knows the usable rows, numbers the
   examples exactly as `load_dataset` does (usable rows in source order), and knows every
   example's lengths: all `BatchIterator` needs to shuffle, pack and place the global batches.
   Bad rows are agreed on too: under `on_error="raise"` every process raises the `DataError` of
   the source's first bad row (found by whichever process read it); under "skip" the counts are
   global.
3. **Collation.** A process holds the tokens of the examples it collates, and no others:
   `BatchIterator` asks for the examples of its row block over the rest of the epoch
   (`ShardedDataset.ensure`), which one more pass over the source parses and tokenizes (rows
   already held are kept), then collates each batch from them (`ShardedDataset.take`).

So a process tokenizes its 1/P of the rows once to validate them, then per epoch the ~1/P of the
examples its devices receive. The iterator's state, and hence checkpoints and resume under any
process count, are those of the unsharded dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data.dataset import Ragged, TokenizedDataset, _Builder, _gc_paused, tokenized_rows
from rlhf_jax.data.formats import KINDS, DataError, Kind, RowRef
from rlhf_jax.data.sources import NOT_READ, Source, describe_source, read_rows, source_fingerprint
from rlhf_jax.data.tokenize import TokenizeConfig

__all__ = ["ShardedDataset", "load_sharded"]

logger = logging.getLogger("rlhf_jax.data")
_MESSAGE_BYTES = 2048


def _tracks(kind: Kind) -> int:
    return 2 if kind == "preference" else 1


class ShardedDataset:
    """The examples of one source, as a `BatchIterator` of a multi-process run sees them.

    Global facts (the same on every process): `len()`, `lengths()`, `num_rows`, `num_truncated`
    and the number of skipped rows. Tokens are held for the examples this process collates.
    """

    def __init__(self, *, kind: Kind, source: Source, name: str, split: str | None, tokenizer,
                 config: TokenizeConfig, rename: Mapping[str, str] | None, pad_id: int, rows: np.ndarray,
                 lengths: np.ndarray, num_rows: int, num_truncated: int, num_skipped: int,
                 skipped: tuple[DataError, ...], held: dict[int, tuple[Any, list]]):
        self.kind, self.source, self.pad_id = kind, name, pad_id
        self.num_rows, self.num_truncated, self.num_skipped, self.skipped = num_rows, num_truncated, num_skipped, skipped
        self._source, self._split, self._tokenizer, self._config, self._rename = source, split, tokenizer, config, rename
        self._rows = rows  # int64 [N]: the source row of each example
        self._lengths = lengths  # int64 [N, tracks]
        self._held = held  # example -> (parsed example, tokenized sequences)
        self._column_names = sorted({c for example, _ in held.values() for c in getattr(example, "columns", {})})
        self.rows_validated = 0  # rows this process parsed and tokenized in the validation pass
        self.rows_tokenized = 0  # rows it tokenized after that, to collate them

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def column_names(self) -> tuple[str, ...]:
        """The extra columns (of a "prompt" dataset) of the examples this process held when loaded, sorted."""
        return tuple(self._column_names)

    def lengths(self) -> np.ndarray:
        """int64 [N, tracks] sequence lengths of every example (all processes' examples)."""
        return self._lengths

    def report(self) -> str:
        """`TokenizedDataset.report`'s line with the global counts."""
        text = f"{self.source}: {self.num_rows} rows read, {len(self)} {self.kind} examples"
        if self.num_truncated:
            text += f", {self.num_truncated} sequences truncated"
        if self.num_skipped:
            shown = "; ".join(str(e) for e in self.skipped[:3])
            text += f", {self.num_skipped} rows skipped ({shown}{'; ...' if self.num_skipped > 3 else ''})"
        return text

    @property
    def held(self) -> frozenset[int]:
        """The examples whose tokens this process holds."""
        return frozenset(self._held)

    def ensure(self, examples) -> None:
        """Hold exactly `examples`: tokenize those not held in one pass over the source, drop the others."""
        wanted = set(int(i) for i in examples)
        self._held = {i: v for i, v in self._held.items() if i in wanted}
        missing = sorted(wanted - set(self._held))
        if not missing:
            return
        by_row = {int(self._rows[i]): i for i in missing}

        def fail(error: DataError, row: int) -> None:  # validated before: the source changed since
            raise DataError(error.ref, f"{error.problem} (the row was valid when the run started: did "
                                       f"{self.source} change?)")

        with _gc_paused():
            rows = ((i, ref, row) for i, (ref, row) in
                    enumerate(read_rows(self._source, split=self._split, keep=by_row.__contains__))
                    if row is not NOT_READ)
            for index, _, example, seqs in tokenized_rows(rows, kind=self.kind, tokenizer=self._tokenizer,
                                                          config=self._config, reject=fail, rename=self._rename):
                self._held[by_row[index]] = (example, seqs)
        self.rows_tokenized += len(missing)
        lost = [i for i in missing if i not in self._held]
        if lost:
            raise DataError(RowRef(self.source, int(self._rows[lost[0]])),
                            "the row is gone from the source (it was there when the run started)")

    def take(self, examples: Sequence[int]) -> tuple[TokenizedDataset, dict[int, int]]:
        """`(a TokenizedDataset of just `examples`, example -> its index there)`; all must be held."""
        order = sorted(set(int(i) for i in examples))
        absent = [i for i in order if i not in self._held]
        if absent:
            raise KeyError(f"ShardedDataset.take: examples {absent[:5]} are not held by this process; ensure() them")
        builder = _Builder(self.kind)
        for i in order:
            builder.add(*self._held[i])
        arrays = builder.arrays() if order else _empty_arrays(self.kind)  # a block of padding rows only
        columns = builder.columns if order else {name: [] for name in self._column_names}
        local = TokenizedDataset(kind=self.kind, arrays=arrays, columns=columns, pad_id=self.pad_id,
                                 source=self.source, num_rows=len(order))
        return local, {i: k for k, i in enumerate(order)}


def _empty_arrays(kind: Kind) -> dict[str, Any]:
    """The arrays of a dataset of `kind` with no example."""
    def ragged(dtype):
        return Ragged(np.zeros((0,), dtype), np.zeros((1,), np.int64))

    if kind == "preference":
        return {"chosen_tokens": ragged(np.int32), "chosen_loss_mask": ragged(np.bool_),
                "rejected_tokens": ragged(np.int32), "rejected_loss_mask": ragged(np.bool_),
                "margin": np.zeros((0,), np.float32)}
    if kind == "prompt":
        return {"prompt_tokens": ragged(np.int32)}
    arrays = {"tokens": ragged(np.int32), "loss_mask": ragged(np.bool_)}
    if kind == "unpaired":
        arrays.update(label=np.zeros((0,), np.bool_), prompt_length=np.zeros((0,), np.int32))
    return arrays


def load_sharded(source: Source, *, kind: Kind, tokenizer, config: TokenizeConfig, index: int, count: int,
                 allgather: Callable[[np.ndarray], np.ndarray], on_error: str = "raise", split: str | None = None,
                 rename: Mapping[str, str] | None = None) -> ShardedDataset:
    """`load_dataset` for process `index` of `count`: validate and tokenize rows `index::count`, exchange.

    Every process must call this with the same arguments but its own `index` (it runs `allgather`,
    a collective: `x [n, k] -> every process's x, concatenated in process order`).

    Raises:
      DataError: on every process alike: the processes' copies of a path source differ
        (`source_fingerprint`), the source's first bad row (`on_error="raise"`), or no usable row.
    """
    if kind not in KINDS:
        raise ValueError(f"load_sharded: kind must be one of {KINDS}, got {kind!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"load_sharded: on_error must be 'raise' or 'skip', got {on_error!r}")
    if not 0 <= index < count:
        raise ValueError(f"load_sharded: need 0 <= index < count, got {index} and {count}")
    name, tracks = describe_source(source), _tracks(kind)
    usable: dict[int, tuple[Any, list]] = {}  # source row -> (example, sequences), this process's rows
    skipped: list[DataError] = []
    first_error: tuple[int, DataError] | None = None
    truncated = num_rows = 0

    def reject(error: DataError, row: int) -> None:
        nonlocal first_error
        if on_error == "raise":
            first_error = (row, error)
            raise _Stop
        skipped.append(error)

    def mine():
        nonlocal num_rows
        for i, (ref, row) in enumerate(read_rows(source, split=split, keep=lambda r: r % count == index)):
            num_rows = i + 1
            if row is not NOT_READ:
                yield i, ref, row

    with _gc_paused():
        try:
            for i, _, example, seqs in tokenized_rows(mine(), kind=kind, tokenizer=tokenizer, config=config,
                                                      reject=reject, rename=rename):
                truncated += sum(s.truncated for s in seqs)
                usable[i] = (example, seqs)
        except _Stop:
            pass
    # 1. Counts, the first bad row and the source's fingerprint of every process.
    fingerprint = source_fingerprint(source) or bytes(32)
    meta = np.array([[num_rows, -1 if first_error is None else first_error[0], truncated, len(skipped),
                      *np.frombuffer(fingerprint, np.int32)]], np.int32)
    metas = np.asarray(allgather(meta)).reshape(count, 12)
    copies = {bytes(m[4:]): [p for p in range(count) if (metas[p, 4:] == m[4:]).all()] for m in metas}
    if len(copies) > 1:
        seen = "; ".join(f"sha256 {digest.hex()[:16]} on processes {procs}" for digest, procs in copies.items())
        raise DataError(RowRef(name, None), f"the processes' copies of the source differ ({seen}): every process "
                                            "must read the same data")
    if (metas[:, 1] >= 0).any():  # on_error="raise" and some process read a bad row: all raise the first
        text = b"" if first_error is None else f"{first_error[1].ref}\0{first_error[1].problem}".encode()[:_MESSAGE_BYTES]
        message = np.zeros((1, _MESSAGE_BYTES), np.uint8)
        message[0, :len(text)] = np.frombuffer(text, np.uint8)
        messages = np.asarray(allgather(message)).reshape(count, _MESSAGE_BYTES)
        rows = np.where(metas[:, 1] >= 0, metas[:, 1], np.iinfo(np.int32).max)
        ref, _, problem = bytes(messages[int(np.argmin(rows))]).rstrip(b"\0").decode(errors="replace").partition("\0")
        if first_error is not None and int(np.argmin(rows)) == index:
            raise first_error[1]
        raise DataError(RowRef(ref, None), problem)
    if len(set(metas[:, 0].tolist())) != 1:
        raise DataError(RowRef(name, None), f"the processes read different numbers of rows {metas[:, 0].tolist()} "
                                            "(every process must see the same source)")
    # 2. Per source row: usable, and its lengths (row r = process r % count, entry r // count).
    per = -(-num_rows // count)
    table = np.zeros((per, 1 + tracks), np.int32)  # int32: what a JAX collective carries
    for r, (_, seqs) in usable.items():
        table[r // count] = (1, *[len(s.ids) for s in seqs])
    tables = np.asarray(allgather(table)).reshape(count, per, 1 + tracks)
    by_row = tables.transpose(1, 0, 2).reshape(per * count, 1 + tracks)[:num_rows]  # row r = entry r
    rows = np.flatnonzero(by_row[:, 0] == 1)
    num_skipped, num_truncated = int(metas[:, 3].sum()), int(metas[:, 2].sum())
    if len(rows) == 0:
        raise DataError(RowRef(name, None), f"no usable {kind} rows ({num_rows} read, {num_skipped} skipped"
                                            + (f"; first problem: {skipped[0]}" if skipped else "") + ")")
    example_of = {int(r): e for e, r in enumerate(rows)}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = ShardedDataset(kind=kind, source=source, name=name, split=split, tokenizer=tokenizer, config=config,
                             rename=rename, pad_id=int(pad_id), rows=rows.astype(np.int64),
                             lengths=by_row[rows, 1:].astype(np.int64), num_rows=num_rows,
                             num_truncated=num_truncated, num_skipped=num_skipped,
                             skipped=tuple(sorted(skipped, key=lambda e: (e.ref.source, e.ref.index))),
                             held={example_of[r]: v for r, v in usable.items()})
    dataset.rows_validated = len(usable) + len(skipped)
    if num_skipped or num_truncated:
        logger.warning("rlhf_jax.data: %s", dataset.report())
    return dataset


class _Stop(Exception):
    """The first bad row under on_error='raise': stop reading, tell the other processes."""
