"""Continuous batching over a paged KV cache: the per-request sampling API.

    from rlhf_jax.sampling import Request, Sampler, TopP, Greedy
    sampler = Sampler(lm, max_len=576)
    outs = sampler.generate_requests(params, [
        Request(prompt=[1, 17, 4], max_new_tokens=64, method=TopP(p=0.9), stop_ids=(2,), seed=7),
        Request(prompt=[1, 9], max_new_tokens=300, stop_sequences=((13, 14),), num_samples=8, seed=8),
        Request(prompt=[1, 5, 6], max_new_tokens=20, method=Greedy()),
    ], num_slots=16)
    outs[i].tokens[j], outs[i].logprobs[j], outs[i].finish_reasons[j]   # request i, sample j (numpy)
    sampler.continuous_stats()                                          # round trips, blocks, ...

Contract (stable; multi-turn rollouts build on it; the types live in `rlhf_jax.sampling.requests`):
- `Request` (frozen): `prompt` token ids, `max_new_tokens`, `method` (`Greedy`, `Categorical`, `TopK`,
  `TopP`, `MinP`, `Filtered`: per request), `num_samples` (a group sharing the prompt's KV blocks),
  `stop_ids` (any of them ends a sample), `stop_sequences` (token-id sequences; a sample ends when its
  completion ends with one), `seed` (int or PRNG key; None: derived from the call's `rng` and the
  request's index), `min_new_tokens` (no stop before that many tokens, per request, counted from
  its first new token). A completion holds its stop token/sequence, as `Sampler.generate` does.
- `to_sample_output(requests, outputs)` packs them as the static call's `SampleOutput` (numpy rows,
  a request's samples contiguous), what the RL trainer consumes.
- Incremental form (`Sampler.continuous_batcher(...).session(params, rng=...)`, the same scheduler):
  `submit(request) -> handle` at any time, `advance()` admits, runs one segment and returns
  `{handle: RequestOutput}` of the requests that completed; multi-turn rollouts submit a turn's
  request as soon as its tool has answered while the other slots keep decoding.
- `RequestOutput`: per sample `tokens` int32 `[L_j]`, `logprobs` float32 `[L_j]` (log softmax of the
  tempered, untruncated distribution, the trainer's `token_logprobs`), `finish_reasons` "stop" or
  "length"; outputs come back in request order whatever order they finished in.
- Sampling is keyed by request: sample `j`'s token `t` uses `U(fold_in(fold_in(key, t), j))`, the
  same draw `Sampler.generate([prompt], num_samples=n, rng=key)` makes for row `j` at step `t`. So a
  request's completions do not depend on the slot count, the other requests, when it was admitted,
  or whether it was preempted, and equal the static call's under greedy decoding (log-probs within
  float rounding: same model code, different batch shapes).

How it runs (`ContinuousBatcher`):
- `num_slots` decode rows. One jitted *segment* program runs decode steps in `lax.while_loop` until a
  sample ends (EOS, stop sequence, its own `max_new_tokens`), a slot needs a KV block the pool cannot
  give, or a slot outgrows the attention view; then the host (one round trip: a few small arrays)
  collects finished samples, frees their blocks, preempts if the pool is exhausted, and admits
  waiting requests in arrival order (a request waits while slots or blocks are short; no
  reordering). Admission is one jitted *admit* program per request: the prompt's prefill (one per group,
  into a dense cache of the prompt's width, as the static call prefills) written into its blocks
  together with the group's per-sample copies of the block where decoding starts (one in-place
  scatter per layer), and the slots' state. Host round trips per call <= segments <= ends +
  pool-exhaustion events + view growths (`stats`).
- Paged cache (`rlhf_jax.models.paged`): a pool of `num_blocks` blocks of `block_size` positions per
  layer, per-slot block tables; decode allocates a block when a slot crosses into a new one, inside
  the loop (from a free stack the host passes). A group of `n` samples holds the prompt's full blocks
  once (ref-counted); each sample owns a copy of the block where its decoding starts.
  When blocks run out the newest running sample is preempted: its blocks are freed and it waits at
  the front of the queue, to be resumed by a prefill of prompt + its tokens so far (vLLM's recompute
  preemption); its output continues with the same keys. Admission keeps `reserve_blocks` blocks per
  running slot free so that preemption stays rare.
- Decode attention reads the pool where it lies (`attention="pool"`, `rlhf_jax.models.paged.
  routed_attention`): each block is scored against the query of the slot that holds it (a batched
  matrix-vector product over the pool; per-slot softmax sums as one-hot matmuls), so a step's read
  follows the pool size, not slots x `max_len`; blocks a group shares are read once more per further
  sample through a small gather whose size (bucketed) the host counts per segment. That routed
  einsum is the reference decode read (CPU, f32); on TPU / GPU `ModelConfig.paged_attention_impl`
  ("auto", bf16/f16 compute) selects JAX's Pallas paged-attention kernel instead
  (`rlhf_jax.models.paged.kernel_attention`: TPU `ops/tpu/paged_attention`, GPU the Triton
  `ops/gpu/paged_attention`), which reads each slot's pages through its block table up to its
  length: no route, no shared-read count, one table width (`ContinuousBatcher.decode_read` says
  which read runs; `paged.decode_kernel` why not a kernel).
  One segment program per (set of sampling-method kinds, shared-read bucket, whether a request of
  the session has `min_new_tokens`: the stop-id mask is compiled only then), one admit program
  per prompt bucket, compiled once per process (`Sampler.num_compiled()`).

On a device mesh `Sampler.continuous_batcher` builds one engine per data-parallel group, fed from
one shared queue (`rlhf_jax.sampling.data_parallel`). W5's figures: `benchmarks/bench_w5.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import sharding as shd
from rlhf_jax.logprobs import token_logprobs
from rlhf_jax.models import KVCache
from rlhf_jax.models.layers import padded_row_positions
from rlhf_jax.models.paged import PagedKVCache, decode_kernel, pool_route
from rlhf_jax.sampling.continuous_session import ContinuousSession, ContinuousStats
from rlhf_jax.sampling.continuous_slots import _SLOT_FIELDS, SlotState
from rlhf_jax.sampling.decode import stack_layers
from rlhf_jax.sampling.methods import row_fields, select_per_row, suppress_stop_ids
from rlhf_jax.sampling.requests import Request, RequestOutput

__all__ = ["ContinuousStats", "ContinuousBatcher", "ContinuousSession"]


class ContinuousBatcher:
    """Continuous batching programs and scheduler for one `Sampler` (see the module docstring).

    Args:
      sampler: the `Sampler` whose model, `max_len`, prompt buckets and pad id are used.
      num_slots: rows decoding at once.
      block_size: positions per KV block.
      num_blocks: blocks in the pool (default: enough for every slot at `max_len`, i.e. no waiting).
      reserve_blocks: free blocks kept per running slot when admitting (fewer preemptions).
      max_stop_ids, max_stop_sequences, max_stop_len: capacity of the per-slot stop tables.
      attention: how decode reads the cache. "pool" (default): each pool block against the query of
        the slot that holds it (`rlhf_jax.models.paged.routed_attention`: no gather, cost ~ pool
        size); "gather": each row's blocks gathered into a view of a few widths (XLA:CPU's gather
        costs more than the attention over the view); "dense": no paging, one `max_len` cache row
        per slot (the static sampler's layout; memory = slots x max_len, `num_blocks` ignored).
        With "pool" or "gather", a Pallas paged-attention kernel replaces both decode reads where
        `ModelConfig.paged_attention_impl` selects one (TPU / GPU; `decode_read`).
      methods: "auto" compiles the segment for the sampling-method kinds present in a call (the sort of
        top-k / top-p only when used); "all" compiles one segment program that serves every mix
        (a session with `Request.min_new_tokens` adds its own variant, in either mode).
      mesh: the engine's own devices when the sampler has a mesh (`DataParallelBatcher` builds one
        engine per data-parallel group): weights keep the sampler's layout there, the pool's kv heads
        are split by the strategy's `kv_heads` rule (tensor parallelism: each device holds its heads'
        keys and values, as the static call's cache), the rest of the slot state is replicated.
        None: the sampler's one (default) device.
    """

    def __init__(self, sampler, *, num_slots: int = 16, block_size: int = 16, num_blocks: int | None = None,
                 reserve_blocks: int = 1, max_stop_ids: int = 8, max_stop_sequences: int = 4,
                 max_stop_len: int = 8, methods: str = "auto", attention: str = "pool", mesh=None):
        for name, value, low in (("num_slots", num_slots, 1), ("block_size", block_size, 1),
                                 ("reserve_blocks", reserve_blocks, 0), ("max_stop_ids", max_stop_ids, 1),
                                 ("max_stop_sequences", max_stop_sequences, 1), ("max_stop_len", max_stop_len, 1)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"ContinuousBatcher: {name} must be an int >= {low}, got {value!r}")
        num_slots, block_size, reserve_blocks = int(num_slots), int(block_size), int(reserve_blocks)
        max_stop_ids, max_stop_sequences, max_stop_len = int(max_stop_ids), int(max_stop_sequences), int(max_stop_len)
        if isinstance(num_blocks, np.integer):
            num_blocks = int(num_blocks)
        if methods not in ("auto", "all"):
            raise ValueError(f"ContinuousBatcher: methods must be 'auto' or 'all', got {methods!r}")
        self.methods = methods
        if attention not in ("pool", "gather", "dense"):
            raise ValueError(f"ContinuousBatcher: attention must be 'pool', 'gather' or 'dense', got {attention!r}")
        self.attention = attention
        if sampler.mesh is not None and mesh is None:
            raise ValueError("ContinuousBatcher: the Sampler has a mesh; build its engines with "
                             "Sampler.continuous_batcher (one engine per data-parallel group) or pass mesh=")
        self.mesh = mesh          # this engine's devices (a data-parallel group of the sampler's mesh)
        self.sampler = sampler
        self.model = sampler.model
        self.num_slots, self.block_size = num_slots, block_size
        self.max_blocks = -(-sampler.max_len // block_size)          # table width: a slot at max_len
        self.num_blocks = num_slots * self.max_blocks if num_blocks is None else num_blocks
        if attention == "dense":      # a dense max_len cache row per slot: blocks only count tokens
            self.num_blocks, reserve_blocks = num_slots * self.max_blocks, 0
        if not isinstance(self.num_blocks, int) or self.num_blocks < self.max_blocks:
            raise ValueError(
                f"ContinuousBatcher: num_blocks must be an int >= {self.max_blocks} (one slot at max_len="
                f"{sampler.max_len}), got {num_blocks!r}")
        self.trash = self.num_blocks                                  # the pool's extra last block
        # The single-token decode read: "reference" (routed einsum / gathered views) or a Pallas kernel.
        self.decode_read = "reference" if attention == "dense" else decode_kernel(
            self.model.config, block_size, self.max_blocks)
        self.reserve_blocks = reserve_blocks
        self.max_completion = sampler.max_len
        self.shapes = dict(K=max_stop_ids, NS=max_stop_sequences, LS=max_stop_len)
        widths, w = [], 4
        while w < self.max_blocks and attention == "gather" and self.decode_read == "reference":
            widths.append(w)
            w *= 2
        self.view_widths = tuple(widths) + (self.max_blocks,)   # "pool": decode reads the whole pool
        self.stats = ContinuousStats(num_blocks=self.num_blocks, block_size=block_size)
        self._key_shape = jax.random.key_data(jax.random.key(0)).shape
        self._names = tuple(f"{n}_cb{id(self)}_{part}" for n in sampler._names[:1] for part in ("segment", "admit"))
        sampler._names = sampler._names + self._names                 # counted by sampler.num_compiled()
        self._build()

    # ----------------------------------------------------------------------------- programs

    def _build(self) -> None:
        model, bs, trash = self.model, self.block_size, self.trash
        c = self.max_completion

        def segment(params, state: SlotState, tables, free_stack, num_free, max_steps, min_new=None, *, kinds,
                    width, extra):
            # `min_new` int32 [S]: each slot's request's `min_new_tokens` (None: no request of the
            # session has one; the program is then the one without the option).
            state = state.replace(finished=jnp.zeros_like(state.finished), steps=jnp.zeros((), jnp.int32))
            rows = jnp.arange(self.num_slots)

            def needs(s, tables):
                logical = jnp.minimum(s.position // bs, self.max_blocks - 1)
                return s.active & (tables[rows, logical] == trash), logical

            def cond(carry):
                s, tables, num_free = carry
                need, _ = needs(s, tables)
                fits = jnp.all(~s.active | (s.position < width * bs))
                return (jnp.any(s.active) & ~jnp.any(s.finished) & (jnp.sum(need) <= num_free) & fits
                        & (s.steps < max_steps))

            def body(carry):
                s, tables, num_free = carry
                need, logical = needs(s, tables)
                rank = jnp.cumsum(need) - 1
                fresh = free_stack[jnp.clip(num_free - 1 - rank, 0, free_stack.shape[0] - 1)]
                tables = tables.at[rows, logical].set(jnp.where(need, fresh, tables[rows, logical]))
                num_free = num_free - jnp.sum(need)
                if self.attention == "dense":
                    cache = KVCache(jnp.stack(s.pool_k), jnp.stack(s.pool_v))
                elif self.decode_read != "reference":  # the kernel reads through the tables
                    cache = PagedKVCache(jnp.stack(s.pool_k), jnp.stack(s.pool_v), tables)
                elif self.attention == "pool":
                    route = pool_route(tables, s.position, self.num_blocks + 1, bs, extra,
                                       model.config.sliding_window)
                    cache = PagedKVCache(jnp.stack(s.pool_k), jnp.stack(s.pool_v), tables, route)
                else:
                    cache = PagedKVCache(jnp.stack(s.pool_k), jnp.stack(s.pool_v), tables[:, :width])
                out = model.forward(stack_layers(params), s.last_token[:, None], s.position[:, None], cache=cache)
                logits = out.logits[:, 0]
                keys = jax.random.wrap_key_data(s.keys)
                u = jax.vmap(lambda k, t, j: jax.random.uniform(
                    jax.random.fold_in(jax.random.fold_in(k, t), j), (), jnp.float32))(keys, s.t, s.sample_idx)
                drawn_from = logits if min_new is None else suppress_stop_ids(logits, s.stop_ids, s.t < min_new)
                token = select_per_row(drawn_from, u, s.kind, s.temperature, s.top_k, s.top_p, s.log_min_p,
                                       kinds=kinds)
                logp = token_logprobs(logits, token, temperature=s.temperature[:, None])   # unmasked (methods.py)
                act = s.active
                column = jnp.where(act, s.t, c)                        # inactive rows: dropped
                out_tokens = s.out_tokens.at[rows, column].set(token, mode="drop")
                out_logps = s.out_logps.at[rows, column].set(logp, mode="drop")
                recent = jnp.where(act[:, None], jnp.concatenate([s.recent[:, 1:], token[:, None]], 1), s.recent)
                hit_id = jnp.any(token[:, None] == s.stop_ids, axis=-1)
                ls = recent.shape[1]
                in_seq = jnp.arange(ls)[None, None, :] >= ls - s.stop_lens[:, :, None]
                match = jnp.all(~in_seq | (recent[:, None, :] == s.stop_seqs), axis=-1) & (s.stop_lens > 0)
                stopped = act & (hit_id | jnp.any(match, axis=-1))
                if min_new is not None:       # a stop sequence counts from token index min_new_tokens on
                    stopped = stopped & (s.t >= min_new)
                t = s.t + act.astype(jnp.int32)
                finished = act & (stopped | (t >= s.max_new))
                kv = out.cache
                s = s.replace(
                    pool_k=tuple(kv.k[i] for i in range(kv.k.shape[0])),
                    pool_v=tuple(kv.v[i] for i in range(kv.v.shape[0])),
                    last_token=jnp.where(act, token, s.last_token),
                    position=s.position + act.astype(jnp.int32),
                    t=t, active=act & ~finished, finished=s.finished | finished, stopped=s.stopped | stopped,
                    recent=recent, out_tokens=out_tokens, out_logps=out_logps, steps=s.steps + 1,
                )
                return s, tables, num_free

            return jax.lax.while_loop(cond, body, (state, tables, num_free))

        def admit(params, state: SlotState, prompt, prefill_table, copy_src, copy_dst, reset, init):
            # The prompt's prefill into a dense cache of its own width (the static call's prefill), then
            # one write per layer into the pool: no read of the pool, so the donated pool is updated in
            # place (reading it back through the tables made XLA copy every layer's pool twice).
            p = prompt.shape[1]
            # A length-dependent RoPE: the bucket's padding at the prompt's last position (`decode.prefill`);
            # the admitted slots start decoding there (`init["position"]` = the prompt's length - 1).
            positions = padded_row_positions(model.config, p, jnp.max(jnp.where(reset, init["position"], 0))[None])
            if positions is None:
                positions = jnp.arange(p, dtype=jnp.int32)[None]
            kv = model.forward(stack_layers(params), prompt, positions, cache=model.init_cache(1, p),
                               prefill=True).cache
            if self.attention == "dense":
                # The prompt's keys/values into the first slots of every row of the group.
                put = lambda rows, new: rows.at[:, :, :p].set(  # noqa: E731
                    jnp.where(reset[:, None, None, None], new[0][None], rows[:, :, :p]))
            else:
                # Blocks of the prompt to its table's blocks, and the block where decoding starts
                # (logical index `copy_src`) again to each further sample's own block `copy_dst`.
                nb = prefill_table.shape[0]
                dst = jnp.concatenate([prefill_table, copy_dst])
                src = jnp.concatenate([jnp.arange(nb, dtype=jnp.int32), copy_src])

                def put(pool, new):                 # new [1, H, p, D] -> blocks [H, nb, bs, D]
                    new = jnp.pad(new[0], ((0, 0), (0, nb * bs - p), (0, 0)))
                    blocks = new.reshape(new.shape[0], nb, bs, new.shape[-1]).astype(pool.dtype)
                    return pool.at[:, dst].set(blocks[:, src])
            pool_k = tuple(put(state.pool_k[i], kv.k[i]) for i in range(kv.k.shape[0]))
            pool_v = tuple(put(state.pool_v[i], kv.v[i]) for i in range(kv.v.shape[0]))

            def pick(new, old):
                return jnp.where(reset.reshape(reset.shape + (1,) * (old.ndim - 1)), new, old)

            fields = {f: pick(init[f], getattr(state, f)) for f in _SLOT_FIELDS}
            return state.replace(pool_k=pool_k, pool_v=pool_v, active=state.active | reset,
                                 finished=state.finished & ~reset, stopped=state.stopped & ~reset, **fields)

        segment.__name__, admit.__name__ = self._names
        # On an engine's mesh the state keeps its placement (stable input shardings: no recompile).
        seg_out, admit_out = {}, {}
        if self.mesh is not None:
            whole = NamedSharding(self.mesh, PartitionSpec())
            seg_out = dict(out_shardings=(self._state_shardings(), whole, whole))
            admit_out = dict(out_shardings=self._state_shardings())
        self._segment = jax.jit(segment, static_argnames=("kinds", "width", "extra"), donate_argnums=(1,), **seg_out)
        self._admit = jax.jit(admit, donate_argnums=(1,), **admit_out)

    def _pool_shape(self) -> tuple[int, ...]:
        cfg = self.model.config
        if self.attention == "dense":
            return (self.num_slots, cfg.num_kv_heads, self.sampler.max_len, cfg.head_dim)
        return (cfg.num_kv_heads, self.num_blocks + 1, self.block_size, cfg.head_dim)

    def _state_shardings(self) -> "SlotState":
        """On an engine's mesh: the pool's kv heads by the strategy's `kv_heads` rule (replicated where
        the heads do not divide), everything else replicated."""
        logical = ("kv_heads", None, None, None) if self.attention != "dense" else (None, "kv_heads", None, None)
        spec, problems = shd.partition_spec(logical, self._pool_shape(), mesh=self.mesh,
                                            strategy=self.sampler.strategy)
        pool = NamedSharding(self.mesh, PartitionSpec() if problems else spec)
        whole = NamedSharding(self.mesh, PartitionSpec())
        layers = self.model.config.num_layers
        fields = {f.name: whole for f in dataclasses.fields(SlotState)}
        return SlotState(**{**fields, "pool_k": (pool,) * layers, "pool_v": (pool,) * layers})

    def _empty_state(self) -> SlotState:
        cfg = self.model.config
        s, k = self.num_slots, self.shapes
        pool_shape = self._pool_shape()
        dtype = cfg.jnp_dtype
        zi = lambda *shape: jnp.zeros(shape, jnp.int32)  # noqa: E731
        state = SlotState(
            pool_k=tuple(jnp.zeros(pool_shape, dtype) for _ in range(cfg.num_layers)),
            pool_v=tuple(jnp.zeros(pool_shape, dtype) for _ in range(cfg.num_layers)),
            last_token=zi(s), position=zi(s), t=zi(s), max_new=zi(s),
            active=jnp.zeros((s,), bool), finished=jnp.zeros((s,), bool), stopped=jnp.zeros((s,), bool),
            keys=jnp.zeros((s,) + self._key_shape, jnp.uint32), sample_idx=zi(s), kind=zi(s),
            temperature=jnp.ones((s,), jnp.float32), top_k=zi(s), top_p=jnp.ones((s,), jnp.float32),
            log_min_p=jnp.zeros((s,), jnp.float32), stop_ids=jnp.full((s, k["K"]), -1, jnp.int32),
            stop_seqs=jnp.full((s, k["NS"], k["LS"]), -1, jnp.int32), stop_lens=zi(s, k["NS"]),
            recent=jnp.full((s, k["LS"]), -1, jnp.int32),
            out_tokens=jnp.full((s, self.max_completion), self.sampler.pad_id, jnp.int32),
            out_logps=jnp.zeros((s, self.max_completion), jnp.float32), steps=jnp.zeros((), jnp.int32),
        )
        return state if self.mesh is None else jax.device_put(state, self._state_shardings())

    # ----------------------------------------------------------------------------- host side

    def _request_arrays(self, i: int, req: Request, key_data: np.ndarray) -> dict:
        """Per-slot init values of request `i` (numpy), checked against the sampler's limits."""
        k = self.shapes
        where = f"generate_requests: request {i}"
        vocab = self.model.config.vocab_size
        prompt = np.asarray(req.prompt)
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise ValueError(f"{where}: prompt ids outside [0, {vocab})")
        if len(prompt) + req.max_new_tokens - 1 > self.sampler.max_len:
            raise ValueError(f"{where}: prompt of {len(prompt)} tokens + max_new_tokens={req.max_new_tokens} needs "
                             f"{len(prompt) + req.max_new_tokens - 1} cache slots; the sampler's max_len is "
                             f"{self.sampler.max_len}")
        if req.num_samples > self.num_slots:
            raise ValueError(f"{where}: num_samples={req.num_samples} exceeds num_slots={self.num_slots}")
        blocks = sum(self._admit_blocks(len(prompt), req.num_samples))
        if blocks > self.num_blocks:     # said up front: admission would fail only once the pool is empty
            raise ValueError(f"{where}: its prompt needs {blocks} KV blocks for num_samples={req.num_samples}; "
                             f"the pool has {self.num_blocks} "
                             "(num_blocks): raise num_blocks or lower its num_samples")
        outside = sorted({i for i in req.stop_ids + sum(req.stop_sequences, ()) if i >= vocab})
        if outside:  # an id the model never samples would silently never stop the request
            raise ValueError(f"{where}: stop_ids / stop_sequences hold ids {outside} outside the vocabulary [0, {vocab})")
        if len(req.stop_ids) > k["K"]:
            raise ValueError(f"{where}: {len(req.stop_ids)} stop_ids; at most {k['K']} (max_stop_ids)")
        if len(req.stop_sequences) > k["NS"] or any(len(s) > k["LS"] for s in req.stop_sequences):
            raise ValueError(f"{where}: stop_sequences exceed {k['NS']} sequences of {k['LS']} tokens "
                             "(max_stop_sequences, max_stop_len)")
        m = req.method
        stop_ids = np.full((k["K"],), -1, np.int32)
        stop_ids[: len(req.stop_ids)] = req.stop_ids
        seqs = np.full((k["NS"], k["LS"]), -1, np.int32)
        lens = np.zeros((k["NS"],), np.int32)
        for j, seq in enumerate(req.stop_sequences):
            seqs[j, k["LS"] - len(seq):] = seq
            lens[j] = len(seq)
        return dict(keys=key_data, max_new=np.int32(req.max_new_tokens), **row_fields(m),
                    stop_ids=stop_ids, stop_seqs=seqs, stop_lens=lens)

    def _admit_blocks(self, length: int, n: int) -> tuple[int, int]:
        """Blocks a group of `n` samples takes at admission with `length` tokens: (shared, n x own).
        A group holds the full blocks before the one where decoding starts once; each sample owns the rest."""
        shared = (length - 1) // self.block_size if n > 1 else 0
        return shared, n * (-(-length // self.block_size) - shared)

    def run(self, params, requests: Sequence[Request], *, rng: int | jax.Array = 0,
            max_segment_steps: int | None = None) -> list[RequestOutput]:
        """Generate every request's completions (see the module docstring); `stats` describes the call."""
        if not isinstance(requests, Request):
            requests = list(requests)         # an iterator: read once (the type check below consumed it)
        if isinstance(requests, Request) or not all(isinstance(r, Request) for r in requests):
            raise TypeError("generate_requests: requests must be a sequence of Request")
        if not requests:
            raise ValueError("generate_requests: no requests")
        session = self.session(params, rng=rng, max_segment_steps=max_segment_steps)
        for req in requests:
            session.submit(req)
        outputs: dict[int, RequestOutput] = {}
        while not session.idle:
            outputs.update(session.advance())
        return [outputs[i] for i in range(len(requests))]

    def session(self, params, *, rng: int | jax.Array = 0,
                max_segment_steps: int | None = None) -> "ContinuousSession":
        """An open call: `submit` requests at any time, `advance` decodes, finished requests come back.

        The incremental form of `run` (one scheduler): a caller that makes new requests from finished
        ones (the next turn of a multi-turn episode, once its tool has answered) submits them while
        the other slots keep decoding. `stats` describes the session.
        """
        return ContinuousSession(self, params, rng=rng, max_segment_steps=max_segment_steps)
