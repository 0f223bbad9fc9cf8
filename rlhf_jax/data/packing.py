"""Packing: place variable-length examples into the fixed rows of one batch.

`RowPacker` assigns examples, in stream order, to the first of `batch_size` rows that has room on
every track (one track for SFT, two for preference pairs: a pair's chosen sequence goes into a row of
the chosen array and its rejected sequence into the same row and slot of the rejected array) and
fewer than `max_segments` examples. The first example that fits nowhere closes the batch and stays
unconsumed, so the stream position after a batch is exact: the iterator's state never has to hold
examples that were read ahead. With `max_segments=1` every row holds one example (no packing).

Example k of a row becomes segment k (1-based) of that row; `segment_ids` 0 marks padding, and
`positions` restart at 0 in every segment (the model's packing convention).
"""

from __future__ import annotations

import numpy as np

__all__ = ["RowPacker", "pack_rows"]


class RowPacker:
    """Greedy first-fit assignment of examples to the rows of one batch.

    Args:
      batch_size: rows in the batch.
      seq_len: tokens per row and track.
      max_segments: the most examples per row (1 = no packing).
      num_tracks: sequences per example (1, or 2 for chosen / rejected).
      min_length: no example is shorter (rows with less room are skipped; a speed hint, 1 is safe).
    """

    def __init__(
        self, *, batch_size: int, seq_len: int, max_segments: int, num_tracks: int = 1, min_length: int = 1
    ):
        for name, value in (
            ("batch_size", batch_size), ("seq_len", seq_len), ("max_segments", max_segments),
            ("num_tracks", num_tracks), ("min_length", min_length),
        ):  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RowPacker: {name} must be a positive int, got {value!r}")
        self.batch_size, self.seq_len, self.max_segments = batch_size, seq_len, max_segments
        self.num_tracks = num_tracks
        self.rows: list[list[int]] = [[] for _ in range(batch_size)]
        self._fill = [[0] * num_tracks for _ in range(batch_size)]  # tokens used per row and track
        self._closed_below = min(max(seq_len - min_length + 1, 0), seq_len)  # a fuller row takes nothing
        self._open = 0  # rows before this index can take no more examples

    def add(self, item: int, lengths) -> bool:
        """Place `item` with per-track `lengths` in the first row with room; False when none has.

        Raises:
          ValueError: naming `item`, when `lengths` does not hold one length per track, or one of
            them is negative or exceeds `seq_len` (it would never fit).
        """
        lengths = [int(n) for n in np.atleast_1d(lengths)]
        if len(lengths) != self.num_tracks:
            raise ValueError(
                f"RowPacker: example {item} has {len(lengths)} lengths {lengths}, but num_tracks={self.num_tracks}"
            )
        if min(lengths) < 0:
            raise ValueError(f"RowPacker: example {item} has a negative length {min(lengths)}")
        if max(lengths) > self.seq_len:
            raise ValueError(
                f"RowPacker: example {item} of length {max(lengths)} exceeds seq_len={self.seq_len}"
            )
        for b in range(self._open, self.batch_size):
            fill = self._fill[b]
            if len(self.rows[b]) < self.max_segments and all(
                f + n <= self.seq_len for f, n in zip(fill, lengths)
            ):
                self.rows[b].append(item)
                for j, n in enumerate(lengths):
                    fill[j] += n
                while self._open < self.batch_size and self._is_closed(self._open):
                    self._open += 1
                return True
        return False

    def _is_closed(self, b: int) -> bool:
        return len(self.rows[b]) == self.max_segments or any(f >= self._closed_below for f in self._fill[b])

    @property
    def full(self) -> bool:
        """True when no row can take another example."""
        return self._open == self.batch_size

    @property
    def num_items(self) -> int:
        return sum(len(r) for r in self.rows)


def pack_rows(lengths, *, batch_size: int, seq_len: int, max_segments: int) -> list[list[list[int]]]:
    """Pack a whole list of examples into batches (the iterator does this incrementally).

    Args:
      lengths: int [N, tracks] (or [N]) example lengths, in stream order.
      batch_size, seq_len, max_segments: as for `RowPacker`.

    Returns:
      Batches, each a list of `batch_size` rows, each row a list of example indices.
    """
    if len(lengths) == 0:
        return []
    lengths = np.asarray(lengths).reshape(len(lengths), -1)
    batches, i = [], 0
    while i < len(lengths):
        packer = RowPacker(
            batch_size=batch_size, seq_len=seq_len, max_segments=max_segments, num_tracks=lengths.shape[1]
        )
        while i < len(lengths) and packer.add(i, lengths[i]):
            i += 1
        batches.append(packer.rows)
    return batches
