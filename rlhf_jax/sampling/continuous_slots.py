"""The continuous batcher's decode slots: the device-side `SlotState` and its host-side defaults.

`SlotState` is the pytree the segment and admit programs of `rlhf_jax.sampling.continuous` carry
(the block pools and every slot's decoding fields); `_SLOT_FIELDS` names the per-slot fields an
admission initializes, and `_HostFields` holds their default values (numpy) on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import numpy as np

if TYPE_CHECKING:
    from rlhf_jax.sampling.continuous import ContinuousBatcher


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("pool_k", "pool_v", "last_token", "position", "t", "max_new", "active",
                                "finished", "stopped", "keys", "sample_idx", "kind", "temperature", "top_k",
                                "top_p", "log_min_p", "stop_ids", "stop_seqs", "stop_lens", "recent",
                                "out_tokens", "out_logps", "steps"),
                   meta_fields=())
@dataclasses.dataclass(frozen=True)
class SlotState:
    """The decode slots and the block pools (device side; block tables and free blocks come from the host)."""

    pool_k: tuple
    pool_v: tuple
    last_token: jax.Array      # int32 [S] token fed next
    position: jax.Array        # int32 [S] its logical slot
    t: jax.Array               # int32 [S] completion tokens so far (the token index of the next draw)
    max_new: jax.Array         # int32 [S]
    active: jax.Array          # bool [S] decoding
    finished: jax.Array        # bool [S] ended in this segment
    stopped: jax.Array         # bool [S] ended at a stop id / sequence
    keys: jax.Array            # uint32 [S, *key] request key data
    sample_idx: jax.Array      # int32 [S] sample j of its request
    kind: jax.Array            # int32 [S]
    temperature: jax.Array     # f32 [S]
    top_k: jax.Array           # int32 [S]
    top_p: jax.Array           # f32 [S]
    log_min_p: jax.Array       # f32 [S]
    stop_ids: jax.Array        # int32 [S, K] (-1 = none)
    stop_seqs: jax.Array       # int32 [S, NS, LS] right-aligned
    stop_lens: jax.Array       # int32 [S, NS] (0 = none)
    recent: jax.Array          # int32 [S, LS] last completion tokens (-1 = none)
    out_tokens: jax.Array      # int32 [S, C] column = token index
    out_logps: jax.Array       # f32 [S, C]
    steps: jax.Array           # int32 [] loop iterations of the last segment

    def replace(self, **changes) -> "SlotState":
        return dataclasses.replace(self, **changes)


_SLOT_FIELDS = ("last_token", "position", "t", "max_new", "keys", "sample_idx", "kind", "temperature", "top_k",
                "top_p", "log_min_p", "stop_ids", "stop_seqs", "stop_lens", "recent")


class _HostFields:
    """Default per-slot init arrays (numpy), copied by `admit` and overwritten for the reset slots."""

    def __init__(self, batcher: ContinuousBatcher, s: int):
        k = batcher.shapes
        self.last_token = np.zeros((s,), np.int32)
        self.position = np.zeros((s,), np.int32)
        self.t = np.zeros((s,), np.int32)
        self.max_new = np.zeros((s,), np.int32)
        self.keys = np.zeros((s,) + batcher._key_shape, np.uint32)
        self.sample_idx = np.zeros((s,), np.int32)
        self.kind = np.zeros((s,), np.int32)
        self.temperature = np.ones((s,), np.float32)
        self.top_k = np.zeros((s,), np.int32)
        self.top_p = np.ones((s,), np.float32)
        self.log_min_p = np.zeros((s,), np.float32)
        self.stop_ids = np.full((s, k["K"]), -1, np.int32)
        self.stop_seqs = np.full((s, k["NS"], k["LS"]), -1, np.int32)
        self.stop_lens = np.zeros((s, k["NS"]), np.int32)
        self.recent = np.full((s, k["LS"]), -1, np.int32)
