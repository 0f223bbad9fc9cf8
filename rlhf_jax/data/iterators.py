"""One batch iterator for every kind and source: shuffling by seed, epochs, processes, exact resume.

The *global stream* is the concatenation of epochs; epoch e visits the dataset's N examples in the
order `permutation(seed, e)` (identity without shuffling). Epochs run into each other without a
gap; `num_epochs=None` iterates forever (what training loops use: they stop by step).

A *global batch* takes `batch_size` rows from the stream in order: one example per row, or, packed,
as many as fit (`packing.RowPacker`, which never reads ahead). With P processes every process forms
the same global batch and collates only its block of `batch_size / P` consecutive rows (process p
holds rows `p * B/P ...`, the rows its devices hold when the batch is split over the data-parallel
axes), so for a fixed global batch the sequence of global batches is the same for any process
count. The iterator's whole state is the number of stream examples consumed, the same on every
process, exposed as `{"seed", "epoch", "position", "num_examples", "shuffle", "lengths_digest"}`:
`set_state(get_state())` on a fresh iterator over the same dataset and config continues with exactly
the batches the saved one would have produced next, mid-epoch or at an epoch boundary, with this or
another process count. A state from other data (another size, or other sequence lengths), another
seed or another `shuffle` is refused: the position would index another order, repeating or skipping
examples. The position counts examples, so a state continues the same example stream under another
`batch_size` too (with its own batches).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping

import numpy as np

from rlhf_jax.data.batches import collate, kl_partners
from rlhf_jax.data.dataset import TokenizedDataset
from rlhf_jax.data.packing import RowPacker
from rlhf_jax.data.sharded import ShardedDataset

__all__ = ["BatchConfig", "BatchIterator"]

_STATE_KEYS = ("seed", "epoch", "position", "num_examples")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """How examples become batches.

    Attributes:
      batch_size: rows per *global* batch (all processes together; each process collates its
        `batch_size / process_count` rows of it).
      seq_len: tokens per row (T); every sequence of the dataset must fit.
      pack: place several examples per row (SFT and preference kinds only).
      max_segments: with `pack`, the most examples per row (S).
      shuffle: visit each epoch in a seeded random order (else in dataset order).
      seed: the shuffling seed.
      num_epochs: stop after this many epochs (None: never stop).
      drop_remainder: with `num_epochs`, drop the last batch when the stream ends inside it (else it
        is returned with padding rows).
    """

    batch_size: int
    seq_len: int
    pack: bool = False
    max_segments: int = 8
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None
    drop_remainder: bool = False

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "max_segments"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BatchConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"BatchConfig.seed must be an int >= 0, got {self.seed!r}")
        if self.num_epochs is not None and (
            not isinstance(self.num_epochs, int) or isinstance(self.num_epochs, bool) or self.num_epochs < 1
        ):
            raise ValueError(
                f"BatchConfig.num_epochs must be None or a positive int, got {self.num_epochs!r}"
            )

    @property
    def num_segments(self) -> int:
        """S: segment slots per row (`max_segments` when packing, else 1)."""
        return self.max_segments if self.pack else 1


class BatchIterator:
    """Fixed-shape batches (`batches.collate`) from a `TokenizedDataset`, resumable exactly.

    Args:
      dataset: the tokenized examples.
      config: batch size, row length, packing, shuffling, epochs.
      process_index: this host (default `jax.process_index()`).
      process_count: the number of hosts (default `jax.process_count()`).

    Example:
      >>> it = BatchIterator(dataset, BatchConfig(batch_size=8, seq_len=64, pack=True))
      >>> batch = next(it)
      >>> saved = it.get_state()          # store with the checkpoint
      >>> it2 = BatchIterator(dataset, BatchConfig(batch_size=8, seq_len=64, pack=True))
      >>> it2.set_state(saved)            # next(it2) == next(it)
    """

    def __init__(
        self,
        dataset: TokenizedDataset | ShardedDataset,
        config: BatchConfig,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if not isinstance(dataset, (TokenizedDataset, ShardedDataset)):
            raise TypeError(
                f"BatchIterator: dataset must be a TokenizedDataset or ShardedDataset, got {type(dataset).__name__}"
            )
        if config.pack and dataset.kind not in ("sft", "preference"):
            raise ValueError(
                f"BatchIterator: BatchConfig.pack applies to sft and preference data, not {dataset.kind!r}"
            )
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(
                f"BatchIterator: need 0 <= process_index < process_count, got {process_index} and {process_count}"
            )
        if config.batch_size % process_count:
            raise ValueError(
                f"BatchIterator: the global batch_size {config.batch_size} does not split over {process_count} "
                "processes; use a multiple of the process count"
            )
        self.dataset, self.config = dataset, config
        self.process_index, self.process_count = process_index, process_count
        lengths = dataset.lengths()
        self._lengths = lengths.tolist()
        self._num_tracks, self._min_length = lengths.shape[1], int(lengths.min())
        # Identifies the data in a saved state: the same on every process (lengths are global).
        self._lengths_digest = zlib.crc32(np.ascontiguousarray(lengths, np.int64).tobytes())
        longest = int(lengths.max())
        if longest > config.seq_len:
            first = int(np.argmax(lengths.max(axis=1) > config.seq_len))
            raise ValueError(
                f"BatchIterator: {dataset.source} has a sequence of {longest} tokens but BatchConfig.seq_len="
                f"{config.seq_len} (example {first} is the first that does not fit); raise seq_len or lower "
                "TokenizeConfig.max_len"
            )
        self._n = len(dataset)
        self._consumed = 0  # examples of the global stream taken so far (the same on every process)
        self._order_epoch = -1
        self._order = np.arange(self._n)
        self.last_rows: list[list[int]] = []  # the dataset indices of this process's rows of the last batch
        self.last_global_rows: list[list[int]] = []  # ... and of every row of the last global batch
        # Unpaired (KTO) data: None pairs each row with the next row's example in its global batch
        # (`kl_partners`); an array fixes example i's mismatched completion to example
        # `kl_partner_of[i]`'s, as precomputed reference log-probs of the KL rows need (`train.dpo`).
        self.kl_partner_of: np.ndarray | None = None

    # ------------------------------------------------------------------------------ stream
    def _example(self, k: int) -> int | None:
        """The dataset index of the global stream's k-th example, or None past the last epoch."""
        epoch, position = divmod(k, self._n)
        if self.config.num_epochs is not None and epoch >= self.config.num_epochs:
            return None
        if epoch != self._order_epoch:
            self._order = self.epoch_order(epoch)
            self._order_epoch = epoch
        return int(self._order[position])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset indices in the order epoch `epoch` visits them (all hosts together)."""
        if not self.config.shuffle:
            return np.arange(self._n)
        return np.random.default_rng([self.config.seed, epoch]).permutation(self._n)

    @property
    def epoch(self) -> int:
        """The epoch of the next example."""
        return self._consumed // self._n

    # --------------------------------------------------------------------------- batches
    def __iter__(self) -> "BatchIterator":
        return self

    def _pack(self, consumed: int) -> tuple[list[list[int]], int, bool]:
        """`(rows, consumed after them, whether the stream ended)` of the global batch starting at `consumed`."""
        cfg = self.config
        packer = RowPacker(
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            max_segments=cfg.num_segments,
            num_tracks=self._num_tracks,
            min_length=self._min_length,
        )
        ended = False
        while not packer.full:
            item = self._example(consumed)
            if item is None:
                ended = True
                break
            if not packer.add(item, self._lengths[item]):
                break
            consumed += 1
        return [list(row) for row in packer.rows], consumed, ended

    def _block(self, rows: list[list[int]]) -> list[list[int]]:
        local = self.config.batch_size // self.process_count
        return rows[self.process_index * local:(self.process_index + 1) * local]

    def _partners(self, global_rows: list[list[int]]) -> list[int | None] | None:
        """KTO's mismatched pairs over the global batch (`kl_partners`), this process's block of them."""
        if self.dataset.kind != "unpaired":
            return None
        if self.kl_partner_of is not None:
            return self._block([int(self.kl_partner_of[row[0]]) if row else None for row in global_rows])
        return self._block(kl_partners(global_rows))

    def _needed(self, start: int) -> set[int]:
        """The examples this process collates from the batch at stream position `start` to the end of
        that batch's epoch (the batch that crosses into the next epoch included), with KTO partners."""
        stop = (start // self._n + 1) * self._n
        needed: set[int] = set()
        while start < stop:
            rows, after, ended = self._pack(start)
            block = self._block(rows)
            needed.update(i for row in block for i in row)
            needed.update(p for p in self._partners(rows) or () if p is not None)
            if ended or after == start:
                break
            start = after
        return needed

    def __next__(self) -> dict:
        cfg = self.config
        start = self._consumed
        rows, self._consumed, ended = self._pack(start)
        if sum(len(r) for r in rows) == 0 or (ended and cfg.drop_remainder):
            raise StopIteration
        self.last_global_rows = rows
        self.last_rows = self._block(rows)
        partners = self._partners(rows)
        if isinstance(self.dataset, TokenizedDataset):
            return collate(self.dataset, self.last_rows, seq_len=cfg.seq_len, num_segments=cfg.num_segments,
                           partners=partners)
        # A sharded dataset holds the tokens of this process's examples for the rest of the epoch.
        wanted = {i for row in self.last_rows for i in row} | {p for p in partners or () if p is not None}
        if not wanted <= self.dataset.held:
            self.dataset.ensure(self._needed(start))
        local, index = self.dataset.take(sorted(wanted))
        return collate(local, [[index[i] for i in row] for row in self.last_rows], seq_len=cfg.seq_len,
                       num_segments=cfg.num_segments,
                       partners=None if partners is None else [None if p is None else index[p] for p in partners])

    # ----------------------------------------------------------------------------- state
    def get_state(self) -> dict[str, int]:
        """The position of the next example in the global stream, and what it indexes: `{"seed",
        "epoch", "position", "num_examples", "shuffle", "lengths_digest"}` (plain ints and a bool,
        JSON-serializable, the same on every process; `lengths_digest` is a CRC-32 of every
        example's sequence lengths).

        A state saved by a run with one process count continues exactly under another: every
        process forms the same global batches and collates its share of their rows.
        """
        epoch, position = divmod(self._consumed, self._n)
        return {"seed": self.config.seed, "epoch": epoch, "position": position, "num_examples": self._n,
                "shuffle": self.config.shuffle, "lengths_digest": self._lengths_digest}

    def set_state(self, state: Mapping[str, int]) -> None:
        """Continue from a state of `get_state()` saved by an iterator over the same data and config.

        Raises:
          ValueError: naming the key when the state is incomplete or belongs to another seed,
            `shuffle` setting or dataset (size or sequence lengths).
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                f"BatchIterator.set_state: state must be a mapping from get_state(), got {type(state).__name__}"
            )
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"BatchIterator.set_state: state lacks {missing}; got keys {sorted(state)}")
        # "shuffle" and "lengths_digest" are checked when present: states saved before them lack them.
        for key in (*_STATE_KEYS, *(["lengths_digest"] if "lengths_digest" in state else [])):
            if not isinstance(state[key], (int, np.integer)) or isinstance(state[key], bool):
                raise ValueError(f"BatchIterator.set_state: state[{key!r}] must be an int, got {state[key]!r}")
        if "shuffle" in state and state["shuffle"] is not self.config.shuffle:
            raise ValueError(
                f"BatchIterator.set_state: state['shuffle'] = {state['shuffle']!r} but this iterator has "
                f"shuffle = {self.config.shuffle}"
            )
        expected = {"seed": self.config.seed, "num_examples": self._n, "lengths_digest": self._lengths_digest}
        for key, value in expected.items():
            if key in state and int(state[key]) != value:
                raise ValueError(
                    f"BatchIterator.set_state: state[{key!r}] = {state[key]} but this iterator has {key} = {value}"
                    + (" (another dataset: its examples' sequence lengths differ)" if key == "lengths_digest" else "")
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self._n:
            raise ValueError(
                f"BatchIterator.set_state: need epoch >= 0 and 0 <= position < {self._n}, got {epoch}, {position}"
            )
        self._consumed = epoch * self._n + position
