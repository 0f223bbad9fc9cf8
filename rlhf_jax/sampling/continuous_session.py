"""The scheduler of one open continuous-batching call: `ContinuousSession` and its `ContinuousStats`.

`ContinuousBatcher.session` (`rlhf_jax.sampling.continuous`) opens one: it keeps the waiting queue,
the slots' block tables, the free-block stack and reference counts on the host, admits requests and
runs the batcher's segment program (see the module docstring of `rlhf_jax.sampling.continuous`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING

import jax
import numpy as np

from rlhf_jax.models.paged import num_extra_reads
from rlhf_jax.sampling.continuous_slots import _SLOT_FIELDS, _HostFields
from rlhf_jax.sampling.methods import METHOD_KINDS
from rlhf_jax.sampling.requests import Request, RequestOutput

if TYPE_CHECKING:
    from rlhf_jax.sampling.continuous import ContinuousBatcher

__all__ = ["ContinuousStats", "ContinuousSession"]

@dataclasses.dataclass
class ContinuousStats:
    """Host-side counters of the last `ContinuousBatcher.run` call."""

    host_round_trips: int = 0      # segment programs whose results the host waited for
    decode_steps: int = 0          # loop iterations (each decodes all slots)
    admissions: int = 0            # admit programs (one prefill each)
    preemptions: int = 0
    peak_blocks_in_use: int = 0
    num_blocks: int = 0            # pool size (blocks, the trash block excluded)
    block_size: int = 0
    useful_tokens: int = 0


class ContinuousSession:
    """The scheduler state of one open continuous-batching call (`ContinuousBatcher.session`).

        session = batcher.session(params, rng=0, max_segment_steps=16)
        h = session.submit(Request(prompt=[1, 5], max_new_tokens=8, seed=3))   # a handle: 0, 1, ...
        while not session.idle:
            for handle, output in session.advance().items(): ...             # requests that finished
            session.submit(...)                                               # more at any time

    `advance()` admits waiting requests in submission order (as slots and blocks allow), runs one
    segment program (decode steps until a sample ends, the pool runs dry, the view is outgrown or
    `max_segment_steps` steps) and returns `{handle: RequestOutput}` of the requests whose samples
    have all finished. Draws are keyed by request (seed, token index, sample index), so a request's
    tokens do not depend on when it was submitted or what else shares the slots.
    """

    def __init__(self, batcher: ContinuousBatcher, params, *, rng: int | jax.Array = 0,
                 max_segment_steps: int | None = None):
        from rlhf_jax.sampling.arguments import _as_key, _check_int
        from rlhf_jax.sampling.sampler_config import SamplerParams

        if max_segment_steps is not None:   # 0 steps would never end a sample: `run` would loop forever
            _check_int("generate_requests: max_segment_steps", max_segment_steps, low=1)
        if not isinstance(params, SamplerParams):
            params = batcher.sampler.load_params(params)
        self.batcher, self._p, self._as_key = batcher, params.tree, _as_key
        self._call_key = _as_key(rng)
        self._max_steps = np.int32(batcher.max_completion if max_segment_steps is None else max_segment_steps)
        self._kinds: set[int] = set(METHOD_KINDS.values()) if batcher.methods == "all" else set()
        s_count = batcher.num_slots
        self.requests: list[Request] = []
        self._arrays: list[dict] = []
        self.stats = batcher.stats = ContinuousStats(num_blocks=batcher.num_blocks, block_size=batcher.block_size)
        # A waiting entry: (request, samples, tokens so far per sample, log-probs so far).
        self._waiting: collections.deque = collections.deque()
        self._results: dict[int, list] = {}
        self._slots: list = [None] * s_count          # (request, sample, prefix tokens, prefix logps, order)
        self._tables = np.full((s_count, batcher.max_blocks), batcher.trash, np.int32)
        self._refcount = np.zeros((batcher.num_blocks + 1,), np.int64)
        self._free = list(range(batcher.num_blocks - 1, -1, -1))     # a stack: free[-1] is taken first
        self._position = np.zeros((s_count,), np.int64)
        self._order = 0
        self._hold_admission = False     # after a preemption, admit again only once a sample has finished
        self._state = batcher._empty_state()
        self._state_host = _HostFields(batcher, s_count)   # default per-slot init fields
        # Each slot's request's `min_new_tokens` (host side, passed to every segment once a request
        # of the session has one: a segment program of its own, the default one untouched).
        self._min_new = np.zeros((s_count,), np.int32)
        self._uses_min_new = False

    # ----------------------------------------------------------------------------- public

    def submit(self, request: Request) -> int:
        """Queue `request` (admitted at the next `advance`); returns its handle (submission index)."""
        if not isinstance(request, Request):
            raise TypeError(f"ContinuousSession.submit: expected a Request, got {type(request).__name__}")
        i = len(self.requests)
        key = self._call_key if request.seed is None else self._as_key(request.seed)
        if request.seed is None:
            key = jax.random.fold_in(key, i)
        self._arrays.append(self.batcher._request_arrays(i, request, np.asarray(jax.random.key_data(key))))
        self.requests.append(request)
        if self.batcher.methods == "auto":
            self._kinds.add(METHOD_KINDS[type(request.method)])
        self._uses_min_new |= request.min_new_tokens > 0
        self._results[i] = [None] * request.num_samples
        self._waiting.append(_Entry(i, tuple(range(request.num_samples)), None, None))
        return i

    @property
    def running(self) -> int:
        """Samples decoding in slots now."""
        return sum(s is not None for s in self._slots)

    @property
    def waiting(self) -> int:
        """Queued entries (requests or preempted samples) not yet in a slot."""
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting: every submitted request has come back."""
        return not self._waiting and self.running == 0

    def advance(self) -> dict[int, RequestOutput]:
        """Admit, run one segment, collect: `{handle: RequestOutput}` of the requests now complete."""
        b, stats = self.batcher, self.stats
        bs, trash, s_count = b.block_size, b.trash, b.num_slots
        slots, tables, free, refcount, position = self._slots, self._tables, self._free, self._refcount, self._position
        while self._waiting and self._admit(self._waiting[0]):
            self._waiting.popleft()
        stats.peak_blocks_in_use = max(stats.peak_blocks_in_use, b.num_blocks - len(free))
        running = [i for i in range(s_count) if slots[i] is not None]
        if not running:
            if self._waiting:
                raise RuntimeError("generate_requests: a request cannot be admitted (pool too small)")
            return {}
        top = max(position[i] for i in running)
        width = next(w for w in b.view_widths if w * bs > top)
        free_arr = np.zeros((b.num_blocks,), np.int32)
        free_arr[: len(free)] = free
        extra = 0
        # Reads of shared blocks past the first (a segment adds none), bucketed; a kernel needs no count.
        if b.attention == "pool" and b.decode_read == "reference":
            extra = num_extra_reads(tables, trash)
            extra = 0 if extra == 0 else max(8, 1 << (extra - 1).bit_length())
        min_new = self._min_new.copy() if self._uses_min_new else None
        state, tables_dev, num_free = b._segment(self._p, self._state, tables, free_arr, np.int32(len(free)),
                                                 self._max_steps, min_new, kinds=tuple(sorted(self._kinds)),
                                                 width=width, extra=extra)
        self._state = state
        fetched = jax.device_get((tables_dev, num_free, state.active, state.finished, state.stopped, state.t,
                                  state.position, state.steps))
        stats.host_round_trips += 1
        new_tables, num_free, active, finished, stopped, t, pos, steps = fetched
        stats.decode_steps += int(steps)
        tables[:] = new_tables
        for blk in free[int(num_free):]:
            refcount[blk] = 1
        del free[int(num_free):]
        position[:] = pos
        stats.peak_blocks_in_use = max(stats.peak_blocks_in_use, b.num_blocks - len(free))
        done: dict[int, RequestOutput] = {}
        if finished.any():
            self._hold_admission = False
            out_tokens, out_logps = jax.device_get((state.out_tokens, state.out_logps))
            for slot in np.flatnonzero(finished):
                req_i, j, prefix, prefix_lp, _ = slots[slot]
                t0 = len(prefix)
                toks = np.concatenate([np.asarray(prefix, np.int32), out_tokens[slot, t0: t[slot]]])
                lps = np.concatenate([np.asarray(prefix_lp, np.float32), out_logps[slot, t0: t[slot]]])
                row = self._results[req_i]
                row[j] = (toks, lps, "stop" if stopped[slot] else "length")
                stats.useful_tokens += len(toks) - t0
                self._release(slot)
                if all(r is not None for r in row):
                    del self._results[req_i]
                    done[req_i] = RequestOutput(tokens=[r[0] for r in row], logprobs=[r[1] for r in row],
                                                finish_reasons=[r[2] for r in row])
        # Pool exhausted: preempt the newest running samples until the next step can allocate.
        while True:
            running = [i for i in range(s_count) if slots[i] is not None]
            need = sum(1 for i in running if tables[i, min(position[i] // bs, b.max_blocks - 1)] == trash)
            if not running or need <= len(free):
                break
            victim = max(running, key=lambda i: slots[i][4])
            req_i, j, prefix, prefix_lp, _ = slots[victim]
            out_tokens, out_logps = jax.device_get((self._state.out_tokens[victim], self._state.out_logps[victim]))
            t0 = len(prefix)
            toks = list(prefix) + out_tokens[t0: t[victim]].tolist()
            lps = list(prefix_lp) + out_logps[t0: t[victim]].tolist()
            stats.useful_tokens += len(toks) - t0
            self._release(victim)
            self._state = self._state.replace(active=self._state.active.at[victim].set(False))
            self._waiting.appendleft(_Entry(req_i, (j,), toks, lps))
            stats.preemptions += 1
            self._hold_admission = True
        return done

    # ----------------------------------------------------------------------------- internals

    def _release(self, slot: int) -> None:
        trash = self.batcher.trash
        for blk in self._tables[slot]:
            if blk != trash:
                self._refcount[blk] -= 1
                if self._refcount[blk] == 0:
                    self._free.append(int(blk))
        self._tables[slot] = trash
        self._slots[slot] = None

    def _admit(self, entry) -> bool:
        b, stats = self.batcher, self.stats
        bs, trash, s_count = b.block_size, b.trash, b.num_slots
        slots, tables, free, refcount, position = self._slots, self._tables, self._free, self._refcount, self._position
        req = self.requests[entry.req]
        n = len(entry.samples)
        prefix = [] if entry.prefix_tokens is None else list(entry.prefix_tokens)
        tokens = np.asarray(list(req.prompt) + prefix, np.int32)
        length = len(tokens)
        open_slots = [i for i in range(s_count) if slots[i] is None]
        shared, owned = b._admit_blocks(length, n)
        own, needed = owned // n, shared + owned
        running = s_count - len(open_slots)
        if len(open_slots) < n or (running and self._hold_admission):
            return False
        # Blocks the running slots take at their next step stay free (else the newcomer stalls them).
        upcoming = sum(1 for i in range(s_count) if slots[i] is not None
                       and tables[i, min(position[i] // bs, b.max_blocks - 1)] == trash)
        if len(free) < needed + (upcoming + b.reserve_blocks * (running + n) if running else 0):
            if not running:
                raise RuntimeError(f"generate_requests: request {entry.req} needs {needed} KV blocks; the "
                                   f"pool has {b.num_blocks} (num_blocks): raise num_blocks or lower its num_samples")
            return False
        chosen = open_slots[:n]
        shared_blocks = [free.pop() for _ in range(shared)]
        for blk in shared_blocks:
            refcount[blk] = n
        copy_src = np.zeros((s_count,), np.int32)            # logical block of the prompt (its last)
        copy_dst = np.full((s_count,), trash, np.int32)      # trash: no copy
        reset = np.zeros((s_count,), bool)
        init = {f: np.array(getattr(self._state_host, f)) for f in _SLOT_FIELDS}
        for j, slot in enumerate(chosen):
            own_blocks = [free.pop() for _ in range(own)]
            for blk in own_blocks:
                refcount[blk] = 1
            row = shared_blocks + own_blocks
            tables[slot] = trash
            tables[slot, : len(row)] = row
            if j > 0:      # (a group: the prompt's full blocks are shared, its last one is each sample's own)
                copy_src[j], copy_dst[j] = len(row) - 1, own_blocks[-1]
            t0 = len(prefix)
            for f, v in self._arrays[entry.req].items():
                init[f][slot] = v
            init["last_token"][slot] = tokens[-1]
            init["position"][slot] = length - 1
            init["t"][slot] = t0
            init["sample_idx"][slot] = entry.samples[j]
            self._min_new[slot] = req.min_new_tokens
            recent = np.full((b.shapes["LS"],), -1, np.int32)
            tail = prefix[-b.shapes["LS"]:]
            if tail:
                recent[-len(tail):] = tail
            init["recent"][slot] = recent
            reset[slot] = True
            slots[slot] = (entry.req, entry.samples[j], prefix, list(entry.prefix_logps or []), self._order)
            self._order += 1
            position[slot] = length - 1
        width = b.sampler.bucket_for(length, 1)
        prompt = np.full((1, width), b.sampler.pad_id, np.int32)
        prompt[0, :length] = tokens
        prefill_table = tables[chosen[0], : -(-width // bs)]
        if prefill_table.shape[0] < -(-width // bs):
            prefill_table = np.concatenate([prefill_table, np.full((-(-width // bs) - len(prefill_table),),
                                                                    trash, np.int32)])
        self._state = b._admit(self._p, self._state, prompt, prefill_table, copy_src, copy_dst, reset, init)
        stats.admissions += 1
        return True


_Entry = collections.namedtuple("_Entry", "req samples prefix_tokens prefix_logps")
