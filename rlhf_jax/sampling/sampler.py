"""`Sampler`: the user-facing rollout engine around the pure prefill/decode program.

    sampler = Sampler(lm, max_len=512)                      # optionally mesh=..., strategy="tp"
    out = sampler.generate(params, [[1, 17, 4], [1, 9]], max_new_tokens=64,
                           method=TopP(p=0.9, temperature=0.7), num_samples=8, eos_id=2, rng=0)
    out.completion_tokens, out.completion_mask, out.logprobs    # [16, 64] each
    texts, out = sampler.generate_text(params, ["12+7="], tokenizer=tok, max_new_tokens=8)

What the class adds to `rlhf_jax.sampling.decode`:

- Prompt handling on the host: ragged lists or right-padded arrays, checked (empty prompt, prompt
  plus `max_new_tokens` longer than `max_len`, ids outside the vocabulary), padded to the smallest
  *prompt bucket* that fits, so a run compiles one prefill and one decode program per bucket and
  sampling configuration, however many calls it makes (`num_compiled()`).
- Two jitted programs per call: prefill over the `B` distinct prompts (one call per `generate`,
  counted in `stats.prefill_calls`, whatever `num_samples` is) and the decode loop over the
  `N = B * n` rows. A prompt's keys and values are kept once and read once per step for all its
  rows (`rlhf_jax.sampling.decode`); each row's own cache grows in `cache_phases` phases so early
  steps attend over fewer slots (with one phase the prefill's state is donated and the cache
  updated in place).
- Parameter hand-off: `load_params` casts the trainer's parameters to the sampler's dtype, places
  them with the sampler's own mesh and strategy (e.g. tensor-parallel weights, data-parallel rows)
  and splits the layers for the decode layout in ONE jitted program (input shardings taken from
  the trainer's arrays, e.g. FSDP; output shardings the sampler's; XLA inserts the collectives), no
  host round trip; `stats.handoff_seconds` times it. Weights on another device set of the same
  size (a disjoint sampler mesh) go through the same program on their own devices, laid out as the
  sampler's mesh there, then one device-to-device copy of every shard (`jax.device_put`).
- A deterministic key per call: an int seed or a PRNG key.

Continuous batching over a paged KV cache: `generate_requests(params, [Request(...), ...],
num_slots=16)` (`rlhf_jax.sampling.continuous`): fixed decode slots refilled as requests end, one
`Request` each with its own length, method and stops, a block pool with per-slot block tables and
prefix sharing within a group. On a mesh, one engine per data-parallel group (`num_slots` each) fed
from one arrival-order queue (`DataParallelBatcher`).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.distributed import max_over_processes
from rlhf_jax import sharding as shd
from rlhf_jax.models import CausalLM
from rlhf_jax.sampling.arguments import _as_key, _check_int, _check_params, _device_set
from rlhf_jax.sampling.compile_counter import _COMPILES, _INSTANCES, _count_compiles
from rlhf_jax.sampling.decode import decode, finalize, prefill, unstack_layers
from rlhf_jax.sampling.sampler_config import SamplerParams, SamplerStats, SamplingConfig, default_prompt_buckets
from rlhf_jax.sampling.state import SampleOutput, SamplingState

__all__ = ["SamplingConfig", "SamplerStats", "SamplerParams", "Sampler", "default_prompt_buckets"]


class Sampler:
    """Generates completions for batches of prompts with a KV cache, jitted once per shape.

    Args:
      model: the policy's `CausalLM` (LM head). The sampler runs the same code and numerics with
        `scan_layers=False` (its decode layout) and no rematerialization.
      max_len: positions a row may use = its prompt + `max_new_tokens` - 1 (the last sampled token is
        never fed back), for every call (default: the model's `max_position_embeddings`).
      prompt_buckets: increasing prompt lengths to pad to (default `default_prompt_buckets(max_len)`).
      pad_id: token used to pad prompts and completions.
      cache_phases: the decode loop runs in this many phases with a growing cache (`prefill`'s
        `cache_chunk = ceil(max_new_tokens / cache_phases)`), so early steps attend over fewer
        slots; each phase compiles its own loop body. 1 = the full cache from the start.
      dtype: `"float32"` or `"bfloat16"` to run the sampler in (parameters cast on hand-off);
        default: the model's own dtypes. A dtype other than the trainer's makes sampler and trainer
        log-probs differ (see `logprob_mismatch`).
      mesh: device mesh for the sampler (default: no sharding, one device).
      strategy: sharding strategy on `mesh` (`rlhf_jax.sharding`): parameters follow its rules, rows
        are split over its batch axes, the cache's kv heads over its `kv_heads` rule. When the
        parameters end up whole on every device (`"dp"`), each device runs its own prefill and
        decode loop on its rows (`per_device_loops`): no collective per step, and a device whose
        rows have all stopped finishes early. Otherwise one SPMD loop runs over the mesh.

    On a CPU host, `XLA_FLAGS=--xla_force_host_platform_device_count=<cores>` with
    `mesh=make_mesh({"data": <cores>})` puts one decode loop on each core (XLA:CPU runs one device's
    program per core; its collectives cost hundreds of microseconds, so tensor parallelism does not
    pay there).
    """

    def __init__(
        self,
        model: CausalLM,
        *,
        max_len: int | None = None,
        prompt_buckets: Sequence[int] | None = None,
        pad_id: int = 0,
        cache_phases: int = 2,
        dtype: Literal["float32", "bfloat16"] | None = None,
        mesh: Mesh | None = None,
        strategy: str | shd.Strategy = "dp",
    ):
        if not isinstance(model, CausalLM) or model.head != "lm":
            raise TypeError(f"Sampler: model must be a CausalLM with head='lm', got {model!r}")
        config = model.config.replace(scan_layers=False, remat="none")
        if dtype is not None:
            config = config.replace(param_dtype=dtype, dtype=dtype)
        self.model = CausalLM(config)
        self.max_len = config.max_position_embeddings if max_len is None else max_len
        _check_int("Sampler max_len", self.max_len, low=2)
        if self.max_len > config.max_position_embeddings:  # as transformers' generate warns past max_length
            warnings.warn(f"Sampler: max_len={self.max_len} is above the model's max_position_embeddings="
                          f"{config.max_position_embeddings}: positions past it were not trained (RoPE "
                          "extrapolates; samples there may degrade)", stacklevel=2)
        buckets = default_prompt_buckets(self.max_len) if prompt_buckets is None else tuple(prompt_buckets)
        valid = all(isinstance(b, int) and b >= 1 for b in buckets) and list(buckets) == sorted(set(buckets))
        if not buckets or not valid:
            raise ValueError(f"Sampler: prompt_buckets must be increasing positive ints, got {prompt_buckets!r}")
        self.prompt_buckets = buckets
        _check_int("Sampler pad_id", pad_id, low=0)
        if pad_id >= config.vocab_size:
            raise ValueError(f"Sampler pad_id must be a token id in [0, vocab_size={config.vocab_size}), got {pad_id}")
        self.pad_id = pad_id
        _check_int("Sampler cache_phases", cache_phases, low=1)
        self.cache_phases = cache_phases
        self.mesh = mesh
        self.strategy = None if mesh is None else shd.check_strategy(strategy, mesh)
        self.stats = SamplerStats()
        self._param_dtype = config.jnp_param_dtype
        _count_compiles()          # before any of this sampler's programs can compile
        self._build_programs()

    # ------------------------------------------------------------------------------ programs

    def _build_programs(self) -> None:
        model, pad_id, mesh = self.model, self.pad_id, self.mesh
        self._names = tuple(f"rlhf_jax_sampler{next(_INSTANCES)}_{part}" for part in ("handoff", "prefill", "decode"))
        stacked_shardings = decode_shardings = None
        row_axes: tuple[str, ...] = ()
        if mesh is not None:
            stacked_shardings = shd.param_shardings(
                model.abstract_params(), model.logical_axes, mesh=mesh, strategy=self.strategy
            )
            # A layer's sharding is its stack's without the leading `layers` dimension.
            per_layer = jax.tree.map(
                lambda s: NamedSharding(mesh, PartitionSpec(*s.spec[1:])),
                stacked_shardings["layers"],
                is_leaf=lambda x: isinstance(x, NamedSharding),
            )
            decode_shardings = {**stacked_shardings, "layers": (per_layer,) * model.config.num_layers}
            rows_spec = shd.batch_sharding(mesh, self.strategy).spec
            row_axes = () if not rows_spec or rows_spec[0] is None else (
                (rows_spec[0],) if isinstance(rows_spec[0], str) else tuple(rows_spec[0]))
        self._stacked_shardings = stacked_shardings
        # Pure data parallelism (rows split, weights whole on every device): each device runs its
        # own prefill and decode loop on its rows (`shard_map`), with no collective at any step.
        self.per_device_loops = bool(row_axes) and all(
            not s.spec for s in jax.tree.leaves(decode_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
        )
        rows = PartitionSpec(row_axes if len(row_axes) > 1 else (row_axes[0] if row_axes else None))
        dtype = self._param_dtype

        def handoff(params):
            return unstack_layers(jax.tree.map(lambda a: a.astype(dtype), params))

        handoff.__name__ = self._names[0]
        # Input shardings come from the trainer's arrays (one compilation per trainer layout).
        self._handoff = jax.jit(handoff) if mesh is None else jax.jit(handoff, out_shardings=decode_shardings)
        self._handoff_fn, self._decode_shardings, self._mirrors = handoff, decode_shardings, {}

        phases = self.cache_phases

        def state_specs(state: SamplingState) -> SamplingState:
            per_layer = (rows,) * len(state.cache_k)
            return state.replace(**{f: rows for f in ("last_tokens", "positions", "tokens", "logprobs", "done",
                                                        "lengths", "row_ids")},
                                 step=PartitionSpec(), rng=PartitionSpec(), prompt_k=per_layer, prompt_v=per_layer,
                                 cache_k=per_layer, cache_v=per_layer)

        def prefill_fn(params, prompt_tokens, prompt_lengths, rng, *, max_new_tokens, num_samples):
            def run(params, prompt_tokens, prompt_lengths, rng, row_offset=0):
                return prefill(
                    model, params, prompt_tokens, prompt_lengths, max_new_tokens=max_new_tokens,
                    num_samples=num_samples, rng=rng, pad_id=pad_id, row_offset=row_offset,
                    cache_chunk=None if phases == 1 else -(-max_new_tokens // phases),
                )

            if not self.per_device_loops:
                return self._constrain(run(params, prompt_tokens, prompt_lengths, rng))

            def local(params, prompt_tokens, prompt_lengths, rng):
                offset = jax.lax.axis_index(row_axes) * prompt_tokens.shape[0] * num_samples
                return run(params, prompt_tokens, prompt_lengths, rng, offset)

            out_specs = state_specs(jax.eval_shape(run, params, prompt_tokens, prompt_lengths, rng))
            return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), rows, rows, PartitionSpec()),
                                 out_specs=out_specs, check_vma=False)(params, prompt_tokens, prompt_lengths, rng)

        prefill_fn.__name__ = self._names[1]
        self._prefill = jax.jit(prefill_fn, static_argnames=("max_new_tokens", "num_samples"))

        logits_sharding = None
        if mesh is not None and not self.per_device_loops:
            logits_sharding = NamedSharding(mesh, PartitionSpec(rows[0] if rows else None, None))

        def decode_fn(params, state, prompt_tokens, prompt_lengths, *, method, stop_ids, num_samples,
                      min_new_tokens=0):
            def run(params, state, prompt_tokens, prompt_lengths):
                state = decode(model, params, state, method=method, stop_ids=stop_ids, pad_id=pad_id,
                               logits_sharding=logits_sharding, min_new_tokens=min_new_tokens)
                return finalize(state, prompt_tokens, prompt_lengths, num_samples=num_samples), state

            if not self.per_device_loops:
                return run(params, state, prompt_tokens, prompt_lengths)
            # Each device's loop ends at its own step: only the per-row outputs leave the map.
            out = jax.shard_map(lambda *a: run(*a)[0], mesh=mesh,
                                in_specs=(PartitionSpec(), state_specs(state), rows, rows),
                                out_specs=SampleOutput(*(rows,) * len(SampleOutput._fields)),
                                check_vma=False)(params, state, prompt_tokens, prompt_lengths)
            return out, None

        decode_fn.__name__ = self._names[2]
        # A donated state lets a single-phase loop update the prefill's cache in place; a growing
        # cache, or per-device loops whose state stays inside, end in new buffers.
        donate = phases == 1 and not self.per_device_loops
        self._decode = jax.jit(
            decode_fn, static_argnames=("method", "stop_ids", "num_samples", "min_new_tokens"),
            donate_argnums=(1,) if donate else (),
        )

    def _constrain(self, state: SamplingState) -> SamplingState:
        """Place the loop state: rows over the batch axes, cache heads over the kv_heads rule."""
        if self.mesh is None:
            return state
        rows = shd.batch_sharding(self.mesh, self.strategy)
        row_axes = rows.spec[0] if rows.spec else None
        head_spec, problems = shd.partition_spec(
            (None, "kv_heads", None, None), state.cache_k[0].shape, mesh=self.mesh, strategy=self.strategy
        )
        head_axes = None if problems or len(head_spec) < 2 else head_spec[1]
        cache = NamedSharding(self.mesh, PartitionSpec(row_axes, head_axes))
        whole = shd.replicated(self.mesh)
        c = jax.lax.with_sharding_constraint
        return state.replace(
            step=c(state.step, whole),
            last_tokens=c(state.last_tokens, rows),
            positions=c(state.positions, rows),
            tokens=c(state.tokens, rows),
            logprobs=c(state.logprobs, rows),
            done=c(state.done, rows),
            lengths=c(state.lengths, rows),
            row_ids=c(state.row_ids, rows),
            # The prompts' cache is split as the rows are (a prompt's rows are contiguous, `B * n` of them).
            prompt_k=tuple(c(a, cache) for a in state.prompt_k),
            prompt_v=tuple(c(a, cache) for a in state.prompt_v),
            cache_k=tuple(c(a, cache) for a in state.cache_k),
            cache_v=tuple(c(a, cache) for a in state.cache_v),
        )

    def num_compiled(self) -> int:
        """XLA compilations of this sampler's programs so far (hand-off, prefill, decode; all shapes).

        Counted from JAX's compile events, so it grows only when a call really compiles.
        """
        return sum(count for name, count in _COMPILES.items() if any(n in name for n in self._names))

    # ---------------------------------------------------------------------------- parameters

    def load_params(self, params: dict) -> SamplerParams:
        """Hand the trainer's parameters to the sampler: cast, reshard and split layers, on device.

        Blocks until done and records the time in `stats.handoff_seconds` (the RL "weight handoff"
        phase) and the route in `stats.handoff_path`: "program" (the parameters are on the
        sampler's devices, in any layout: one compiled program), "program+copy" (on as many other
        devices: that program there, then each output shard copied device to device) or "host"
        (another device count: `jax.device_put` gathers through the host). The input is not
        modified; the result holds its own copy.

        Args:
          params: the model's parameter dict (stacked layers), any sharding.

        Returns:
          `SamplerParams` to pass to `generate` (raw params work too, handed off on every call).
        """
        _check_params(params, self.model)  # host side, shapes only: once per hand-off
        start = time.perf_counter()
        path, source = "program", _device_set(params)
        if self.mesh is None or source is None or source == set(self.mesh.devices.flat):
            tree = self._handoff(params)  # one program: cast, reshard (collectives), split layers
        elif len(source) == self.mesh.devices.size:
            # Another device set of the sampler's size (e.g. the trainer's half of the devices): the
            # same program on those devices, laid out as the sampler's mesh, then shard-to-shard copies.
            path = "program+copy"
            tree = jax.device_put(self._mirror_handoff(tuple(sorted(source, key=lambda d: d.id)))(params),
                                  self._decode_shardings)
        else:  # a device count of its own: jax.device_put reshards through the host
            path = "host"
            tree = self._handoff(jax.device_put(params, self._stacked_shardings))
        tree = jax.block_until_ready(tree)
        self.stats.handoff_path = path
        self.stats.handoffs += 1
        self.stats.handoff_seconds = time.perf_counter() - start
        return SamplerParams(tree)

    def _mirror_handoff(self, devices: tuple):
        """The hand-off program on `devices` with the sampler's shardings mapped onto them (cached)."""
        if devices not in self._mirrors:
            mirror = Mesh(np.asarray(devices, dtype=object).reshape(self.mesh.devices.shape), self.mesh.axis_names)
            out = jax.tree.map(lambda s: NamedSharding(mirror, s.spec), self._decode_shardings,
                               is_leaf=lambda x: isinstance(x, NamedSharding))
            self._mirrors[devices] = jax.jit(self._handoff_fn, out_shardings=out)
        return self._mirrors[devices]

    # ------------------------------------------------------------------------------ sampling

    def generate(
        self,
        params: dict | SamplerParams,
        prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
        config: SamplingConfig | None = None,
        *,
        prompt_lengths: Sequence[int] | np.ndarray | None = None,
        rng: int | jax.Array = 0,
        **overrides: Any,
    ) -> SampleOutput:
        """Sample `num_samples` completions for every prompt.

        Args:
          params: `SamplerParams` from `load_params`, or the model's raw parameters.
          prompts: a list of token-id lists (ragged), or an int array `[B, T]`, right-padded when
            `prompt_lengths` is given and all real tokens otherwise.
          config: a `SamplingConfig`; keyword `overrides` replace its fields (or build one alone:
            `generate(params, prompts, max_new_tokens=32, method=Greedy())`).
          prompt_lengths: real lengths of a padded `prompts` array.
          rng: int seed or PRNG key; equal inputs and seed give equal outputs. Row `r`'s draw at step
            `t` is keyed by `(rng, t, r)` (`decode.row_uniforms`): a prompt's samples depend on its
            position in the batch, not on how many prompts follow it or how the rows are split over
            devices (up to float rounding of the logits, e.g. a longer prompt bucket).

        Returns:
          `SampleOutput` with `N = B * num_samples` rows, samples of a prompt contiguous; device
          arrays (fetch with `np.asarray`). In a multi-process run each process passes its own
          prompts and the outputs are global arrays whose rows of this process (its prompts' samples
          first, then padding) `rlhf_jax.sharding.local_rows` returns.

        Raises:
          ValueError: an empty prompt or batch, a prompt that with `max_new_tokens` exceeds
            `max_len`, ids outside the vocabulary, a bad `SamplingConfig` field.
        """
        cfg = self._config(config, overrides)
        vocab = self.model.config.vocab_size
        outside = [i for i in cfg.all_stop_ids if i >= vocab]
        if outside:  # a stop id the model can never sample would silently never end a row
            raise ValueError(f"generate: eos_id / stop_ids {outside} are outside the vocabulary [0, {vocab})")
        tokens, lengths, num_prompts = self._prepare_prompts(prompts, prompt_lengths, cfg.max_new_tokens)
        if not isinstance(params, SamplerParams):
            params = self.load_params(params)
        key = _as_key(rng)
        if self.mesh is not None:
            tokens, lengths = shd.place_rows((tokens, lengths), self.mesh, self.strategy)
        n = cfg.num_samples
        state = self._prefill(
            params.tree, tokens, lengths, key, max_new_tokens=cfg.max_new_tokens, num_samples=n
        )
        self.stats.prefill_calls += 1
        out, _ = self._decode(
            params.tree, state, tokens, lengths, method=cfg.method, stop_ids=cfg.all_stop_ids, num_samples=n,
            min_new_tokens=cfg.min_new_tokens,
        )
        self.stats.decode_calls += 1
        if num_prompts * n != out.lengths.shape[0] and jax.process_count() == 1:
            out = SampleOutput(*(a[: num_prompts * n] for a in out))
        return out

    def generate_requests(self, params: dict | SamplerParams, requests, *, num_slots: int = 16,
                          block_size: int = 16, num_blocks: int | None = None, reserve_blocks: int = 1,
                          rng: int | jax.Array = 0, **limits: int) -> list:
        """Continuous batching over a paged KV cache, one `Request` each (`rlhf_jax.sampling.continuous`).

        Returns a `RequestOutput` per request, in request order. On a mesh, each data-parallel group
        runs its own engine of `num_slots` slots, one shared queue (`DataParallelBatcher`). The programs of each
        `(num_slots, block_size, num_blocks, reserve_blocks, limits)` are built once per sampler;
        `continuous_stats()` describes the last call (host round trips, preemptions, blocks).
        """
        batcher = self.continuous_batcher(num_slots=num_slots, block_size=block_size, num_blocks=num_blocks,
                                          reserve_blocks=reserve_blocks, **limits)
        return batcher.run(params, requests, rng=rng)

    def continuous_batcher(self, *, num_slots: int = 16, block_size: int = 16, num_blocks: int | None = None,
                           reserve_blocks: int = 1, **limits: int):
        """The `ContinuousBatcher` of these options, built once per sampler (what `generate_requests` runs).

        Its `session(params, rng=...)` is the incremental form: submit requests at any time, `advance`
        decodes and returns the finished ones (multi-turn rollouts submit a turn once its tool answered).
        """
        from rlhf_jax.sampling.continuous import ContinuousBatcher
        from rlhf_jax.sampling.data_parallel import DataParallelBatcher

        batchers = self.__dict__.setdefault("_batchers", {})
        key = (num_slots, block_size, num_blocks, reserve_blocks, tuple(sorted(limits.items())))
        if key not in batchers:
            # On a mesh: one engine per data-parallel group, `num_slots` slots each, one shared queue.
            kind = ContinuousBatcher if self.mesh is None else DataParallelBatcher
            batchers[key] = kind(self, num_slots=num_slots, block_size=block_size,
                                 num_blocks=num_blocks, reserve_blocks=reserve_blocks, **limits)
        self._last_batcher = batchers[key]
        return batchers[key]

    def continuous_stats(self):
        """`ContinuousStats` of the last `generate_requests` call (None before one)."""
        batcher = self.__dict__.get("_last_batcher")
        return None if batcher is None else batcher.stats

    def generate_text(
        self,
        params: dict | SamplerParams,
        texts: Sequence[str],
        config: SamplingConfig | None = None,
        *,
        tokenizer,
        rng: int | jax.Array = 0,
        add_special_tokens: bool = False,
        skip_special_tokens: bool = True,
        **overrides: Any,
    ) -> tuple[list[str], SampleOutput]:
        """`generate` from text prompts with a Hugging Face tokenizer, returning decoded completions.

        `eos_id` defaults to `tokenizer.eos_token_id` unless given in `config` or `overrides`.

        Args:
          params: as in `generate`.
          texts: prompt strings (already chat-formatted if the model expects a template).
          config, overrides, rng: as in `generate`.
          tokenizer: a `transformers` tokenizer (`tokenizer(texts)["input_ids"]`, `batch_decode`).
          add_special_tokens: passed to the tokenizer when encoding (default False: the text is
            the exact prompt).
          skip_special_tokens: drop special tokens (e.g. EOS) from the decoded completions.

        Returns:
          `(completions, output)`: `N = len(texts) * num_samples` strings and the `SampleOutput`.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("generate_text: texts must be a sequence of strings")
        if config is None and "eos_id" not in overrides:
            overrides = {**overrides, "eos_id": tokenizer.eos_token_id}
        ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        out = self.generate(params, ids, config, rng=rng, **overrides)
        tokens, lengths = np.asarray(out.completion_tokens), np.asarray(out.lengths)
        rows = [row[:n].tolist() for row, n in zip(tokens, lengths)]
        return tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens), out

    # ------------------------------------------------------------------------- host helpers

    def _config(self, config: SamplingConfig | None, overrides: dict) -> SamplingConfig:
        fields = [f.name for f in dataclasses.fields(SamplingConfig)]
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise TypeError(f"generate: unknown option(s) {unknown}; SamplingConfig fields: {fields} (temperature, "
                            "k and p belong to the method, e.g. method=TopP(p=0.9, temperature=0.7))")
        if config is None:
            if "max_new_tokens" not in overrides:
                raise TypeError("generate: give a SamplingConfig or at least max_new_tokens=...")
            return SamplingConfig(**overrides)
        if not isinstance(config, SamplingConfig):
            raise TypeError(f"generate: config must be a SamplingConfig, got {type(config).__name__}")
        return dataclasses.replace(config, **overrides) if overrides else config

    def bucket_for(self, prompt_len: int, max_new_tokens: int) -> int:
        """Padded prompt length for a batch whose longest prompt has `prompt_len` tokens."""
        limit = self.max_len - max_new_tokens + 1
        bucket = next((b for b in self.prompt_buckets if b >= prompt_len), limit)
        return min(bucket, limit)

    def _prepare_prompts(self, prompts, prompt_lengths, max_new_tokens: int):
        """Right-padded int32 prompts at a bucketed length, rows padded to the data-parallel split."""
        if isinstance(prompts, (np.ndarray, jax.Array)):
            array = np.asarray(prompts)
            if array.ndim != 2:
                raise ValueError(f"generate: a prompts array must be [batch, length], got shape {array.shape}")
            if not np.issubdtype(array.dtype, np.integer):
                raise TypeError(f"generate: prompts must be integer token ids, got dtype {array.dtype}")
            if prompt_lengths is None:
                lengths = np.full((array.shape[0],), array.shape[1], np.int64)
            else:
                lengths = np.asarray(prompt_lengths)
                if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
                    raise TypeError(f"generate: prompt_lengths must be integers, got dtype {lengths.dtype} "
                                    f"({np.ravel(lengths)[:4].tolist()}...)")
                lengths = lengths.astype(np.int64).reshape(-1)
                if lengths.shape != (array.shape[0],):
                    raise ValueError(
                        f"generate: prompt_lengths has shape {lengths.shape}, expected ({array.shape[0]},)"
                    )
                bad_rows = (lengths < 1) | (lengths > array.shape[1])
                if np.any(bad_rows):
                    bad = int(np.argmax(bad_rows))
                    raise ValueError(
                        f"generate: prompt_lengths[{bad}] = {lengths[bad]} is outside [1, {array.shape[1]}] (the "
                        f"prompts' width)"
                    )
            rows = [array[i, : lengths[i]] for i in range(array.shape[0])]
        else:
            if prompt_lengths is not None:
                raise ValueError("generate: prompt_lengths is only for a padded prompts array, not for lists")
            if isinstance(prompts, (str, bytes)):
                raise TypeError("generate: prompts must be token ids; use generate_text for strings")
            rows = []
            for i, p in enumerate(prompts):
                row = np.asarray(p)
                if row.ndim != 1:
                    raise ValueError(f"generate: prompt {i} must be a flat list of token ids, got shape {row.shape} "
                                     "(prompts is a list of token-id lists)")
                if row.size and not np.issubdtype(row.dtype, np.integer):
                    raise TypeError(f"generate: prompt {i} must hold integer token ids, got dtype {row.dtype}")
                rows.append(row.astype(np.int64))
        if not rows:
            raise ValueError("generate: the batch has no prompts")
        vocab = self.model.config.vocab_size
        for i, row in enumerate(rows):
            if row.size == 0:
                raise ValueError(f"generate: prompt {i} is empty; every prompt needs at least one token")
            if row.size + max_new_tokens - 1 > self.max_len:
                raise ValueError(
                    f"generate: prompt {i} has {row.size} tokens; with max_new_tokens={max_new_tokens} it "
                    f"needs {row.size + max_new_tokens - 1} positions but the sampler's max_len is "
                    f"{self.max_len}"
                )
            if row.min() < 0 or row.max() >= vocab:
                raise ValueError(
                    f"generate: prompt {i} has token ids outside [0, {vocab}) (min {row.min()}, max {row.max()})"
                )
        longest = max(r.size for r in rows)
        split = 1 if self.mesh is None else shd.batch_axis_size(self.mesh, self.strategy)
        num_rows = -(-len(rows) // split) * split
        if self.mesh is not None and jax.process_count() > 1:
            # Every process pads its rows to the same count and width (its block of the global batch).
            split //= jax.process_count()
            num_rows = -(-len(rows) // split) * split
            num_rows, longest = (int(v) for v in max_over_processes([num_rows, longest]))
        width = self.bucket_for(longest, max_new_tokens)
        tokens = np.full((num_rows, width), self.pad_id, np.int32)
        lengths = np.ones((num_rows,), np.int32)
        for i, row in enumerate(rows):
            tokens[i, : row.size] = row
            lengths[i] = row.size
        return tokens, lengths, len(rows)
