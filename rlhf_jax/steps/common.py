"""Pieces every training step shares: micro-batching, gradient accumulation, the guarded update, jit.

A step is assembled from three parts (big_vision's `update_fn`, purejaxrl's `make_train`):

1. a *loss function* `loss_fn(params, batch, context, rng) -> (loss, metrics)` on one micro-batch,
   whose loss is normalised by *global* counts found in `context` (e.g. the number of target tokens
   of the whole batch), so that the micro-batch losses and gradients add up to the full batch's;
2. `make_update(loss_fn, optimizer, ...)`: a pure `update(state, batch, *frozen) -> (state,
   metrics)` that derives the step key `fold_in(state.rng, state.step)`, runs an optional
   `prepare(params, batch, frozen, rng) -> (batch, context)` on the full batch (global counts, reference
   log-probs), accumulates gradients over micro-batches with `lax.scan`, and applies the optimizer
   behind a NaN/Inf guard;
3. `jit_step(update, ...)`: `jax.jit` with the state's and batch's shardings and the state donated,
   wrapped in a `Step` that checks every batch against the mesh before anything is compiled
   (`jit_model_step` derives the shardings from a model and an optimizer).

Every `make_*_step` of `rlhf_jax.steps` returns the pure update; the caller jits it, e.g.
`jit_model_step(make_sft_step(model, optim), model, optim, mesh=mesh, strategy="fsdp",
batch_keys=SFT_KEYS)`. The RL steps reuse `accumulate_gradients` and `apply_gradients` directly.
Step keys are typed (`jax.random.key`): `step_key(state)` wraps the state's raw key data.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_args

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import sharding as sh
from rlhf_jax.sharding_lint import lint, warn_lint
from rlhf_jax.config import NonFinitePolicy
from rlhf_jax.optim import OptimizerConfig, global_norm, make_optimizer, make_schedule
from rlhf_jax.state import TrainState, abstract_train_state, train_state_shardings, trainable_view, with_trainable

__all__ = [
    "Metrics",
    "Batch",
    "NonFinitePolicy",
    "LossFn",
    "PrepareFn",
    "Update",
    "split_micro_batches",
    "accumulate_gradients",
    "apply_gradients",
    "make_update",
    "Step",
    "jit_step",
    "jit_model_step",
    "step_key",
    "resolve_optimizer",
    "model_state_shardings",
    "micro_share",
    "reduce_micro_metrics",
]

Metrics = dict[str, jax.Array]
Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Batch, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Metrics]]
PrepareFn = Callable[[Any, Batch, tuple, jax.Array], tuple[Batch, Mapping[str, jax.Array]]]
# What every `make_*_step` returns: `update(state, batch, *frozen) -> (state, metrics)`, pure.
Update = Callable[..., tuple[Any, Metrics]]


def _check_positive_int(fn: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")


def step_key(state: TrainState) -> jax.Array:
    """This step's typed key `fold_in(key(state.rng), state.step)`.

    `TrainState.rng` holds raw `uint32[2]` key data (what checkpoints store); it is wrapped as a
    typed `jax.random.key` (default implementation, so the random bits are the raw key's), and a
    state that already holds a typed key is used as is.
    """
    rng = state.rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    return jax.random.fold_in(rng, state.step)


def _all_finite(tree) -> jax.Array:
    """Scalar bool: every element of every leaf of `tree` is finite."""
    ok = jnp.array(True)
    for leaf in jax.tree.leaves(tree):
        ok = ok & jnp.all(jnp.isfinite(leaf))
    return ok


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
    """Reshape every `[B, ...]` array to `[micro_batches, B / micro_batches, ...]`, interleaved.

    Micro-batch `k` holds rows `k, k + n, k + 2n, ...` (n = `micro_batches`): with the batch split
    contiguously over data-parallel devices, every micro-batch then takes the same number of rows
    from every device and the split moves no data between devices.

    Args:
      batch: mapping of `[B, ...]` arrays, `B` divisible by `micro_batches`.
      micro_batches: number of micro-batches `n`.

    Returns:
      The same mapping with `[n, B / n, ...]` arrays.
    """
    _check_positive_int("split_micro_batches", "micro_batches", micro_batches)

    def split(key, x):
        b = x.shape[0]
        if b % micro_batches:
            raise ValueError(
                f"split_micro_batches: batch[{key!r}] has {b} rows, not divisible by {micro_batches} micro-batches"
            )
        return jnp.swapaxes(x.reshape((b // micro_batches, micro_batches) + x.shape[1:]), 0, 1)

    return {k: split(k, v) for k, v in batch.items()}


def _zeros_f32(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


def accumulate_gradients(loss_fn: LossFn, params: Any, batch: Batch, context: Mapping[str, jax.Array],
                         rng: jax.Array, *, micro_batches: int = 1) -> tuple[jax.Array, Any, Metrics]:
    """Loss, gradients and metrics of the whole batch, one micro-batch at a time.

    `L = sum_k loss_fn(params, batch_k)` and `g = sum_k grad loss_fn(params, batch_k)`: each
    micro-batch loss must already be normalised by the global count in `context`, so these sums
    equal the full-batch loss and gradient. Gradients accumulate in float32 inside a `lax.scan`
    and are cast back to the parameters' dtypes. Metrics are averaged over micro-batches (equal
    sized, so per-example means are exact), but maxima and minima are the max / min over them
    (`reduce_micro_metrics`). Micro-batch `k` gets the key `fold_in(rng, k)`.
    Gradients are taken with respect to `trainable_view(params)` only: `Frozen` subtrees (LoRA's
    base weights) get no gradient buffers and their weight gradients are never computed.

    Args:
      loss_fn: `(params, micro_batch, context, rng) -> (scalar loss, metrics)`.
      params: the parameter tree.
      batch: mapping of `[B, ...]` arrays.
      context: full-batch values the loss needs (global token counts, ...).
      rng: this step's key.
      micro_batches: number of micro-batches (1 = the whole batch at once).

    Returns:
      `(loss, grads, metrics)`; `grads` is shaped like `trainable_view(params)`.
    """
    _check_positive_int("accumulate_gradients", "micro_batches", micro_batches)
    full_params = params
    params = trainable_view(full_params)
    grad_fn = jax.value_and_grad(lambda view, *args: loss_fn(with_trainable(view, full_params), *args), has_aux=True)
    if micro_batches == 1:
        (loss, metrics), grads = grad_fn(params, batch, context, jax.random.fold_in(rng, 0))
        return loss, grads, metrics
    micro = split_micro_batches(batch, micro_batches)
    first = jax.tree.map(lambda x: x[0], micro)
    metric_shapes = jax.eval_shape(lambda: grad_fn(params, first, context, rng)[0][1])
    # Maxima and minima combine by max / min from -inf / +inf, every other metric by its sum (then / n).
    combine = {"max": jnp.maximum, "min": jnp.minimum, None: jnp.add}
    start = {"max": -jnp.inf, "min": jnp.inf, None: 0.0}

    def body(carry, xs):
        loss_sum, grad_sum, metric_acc = carry
        k, mb = xs
        (loss, metrics), grads = grad_fn(params, mb, context, jax.random.fold_in(rng, k))
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        metric_acc = {name: combine[_extreme(str(name))](a, metrics[name].astype(jnp.float32))
                      for name, a in metric_acc.items()}
        return (loss_sum + loss.astype(jnp.float32), grad_sum, metric_acc), None

    init_metrics = {name: jnp.full(m.shape, start[_extreme(str(name))], jnp.float32)
                    for name, m in metric_shapes.items()}
    init = (jnp.zeros((), jnp.float32), _zeros_f32(params), init_metrics)
    (loss, grads, metric_acc), _ = jax.lax.scan(body, init, (jnp.arange(micro_batches), micro))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    metrics = {name: a if _extreme(str(name)) else a / micro_batches for name, a in metric_acc.items()}
    return loss, grads, metrics


def _extreme(name: str) -> str | None:
    """"max" / "min" for a metric named as a maximum / minimum (`max`, `.../max`, `..._max`, or a last
    `/` part `max_...` as TRL's `max_reward`), else None."""
    last = name.rsplit("/", 1)[-1]
    for kind in ("max", "min"):
        if name == kind or name.endswith(("/" + kind, "_" + kind)) or last.startswith(kind + "_"):
            return kind
    return None


def reduce_micro_metrics(stacked: Mapping[str, jax.Array]) -> Metrics:
    """One float32 value per metric from its per-micro-batch values stacked on a leading `[n]` axis.

    A maximum (a metric named `max`, ending in `/max` or `_max`, e.g. `sampler_logprob_diff/max`, or
    whose last `/` part starts with `max_`, e.g. TRL's `max_reward`) is the largest of the
    micro-batches' maxima, a minimum likewise the smallest; every other metric
    is averaged (micro-batch shares of a full-batch mean, `micro_share`, average back to it).
    """
    reduce = {"max": jnp.max, "min": jnp.min, None: jnp.mean}
    return {k: reduce[_extreme(str(k))](v.astype(jnp.float32), axis=0) for k, v in stacked.items()}


def _schedule_count(state: TrainState) -> jax.Array:
    """The step count the optimizer's learning-rate schedule reads (it skips non-finite updates), or
    `state.step` when the optimizer state has no `optax.ScaleByScheduleState`."""
    found = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
             if isinstance(x, optax.ScaleByScheduleState)]
    return found[0].count if found else state.step


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array, optimizer: optax.GradientTransformation, *,
                    nonfinite: NonFinitePolicy = "skip",
                    learning_rate: optax.Schedule | None = None) -> tuple[TrainState, Metrics]:
    """One optimizer update behind a NaN/Inf guard, without a host round trip.

    With `nonfinite` = "skip" or "halt", a non-finite loss or gradient norm, or finite ones whose
    update makes a parameter non-finite (an infinite learning rate, an overflow, Adam with `eps=0`
    on a zero gradient), keeps the parameters and optimizer state unchanged and sets the metric
    `nonfinite` to 1; "halt" also sets `halt` to 1, which the driver reads with the metrics and
    stops on, naming the step. "off" applies every update. The step counter always advances.

    The guard decides first and updates second, on device: the update is computed once only to
    check the new parameters (XLA fuses that pass into reductions that write nothing), then applied
    under `lax.cond`, whose taken branch updates the donated buffers in place. Selecting leaf by
    leaf after the update (`where(ok, new, old)`) needs the new and the old values at once: every
    leaf went through a second, selecting pass (AdamW with clipping on W4's 7.4 M parameters: 37 ->
    29 CPU ms, 17 unguarded; issue 23). A `lax.cond` choosing between a finished update and the
    old state is worse still: XLA:CPU copied every leaf into and out of the conditional.

    Args:
      state: the `TrainState` before the update.
      grads: gradients shaped like `trainable_view(state.params)` (`accumulate_gradients`);
        `Frozen` subtrees of the parameters are carried over unchanged.
      loss: the scalar loss the gradients came from.
      optimizer: the optax transform.
      nonfinite: "skip", "halt" or "off".
      learning_rate: the schedule, for the `learning_rate` metric: the rate this update applies,
        the schedule at the optimizer's own count (`optax.ScaleByScheduleState`), which a skipped
        update does not advance; at `state.step` for an optimizer without one.

    Returns:
      `(new_state, metrics)` with `grad_norm` (before clipping), `learning_rate` (when given),
      `nonfinite` and, for "halt", `halt`.
    """
    if nonfinite not in get_args(NonFinitePolicy):
        raise ValueError(f"apply_gradients: nonfinite must be one of {get_args(NonFinitePolicy)}, got {nonfinite!r}")
    grad_norm = global_norm(grads)
    trained = trainable_view(state.params)

    def updated(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    metrics: Metrics = {"grad_norm": grad_norm}
    if learning_rate is not None:
        metrics["learning_rate"] = jnp.asarray(learning_rate(_schedule_count(state)), jnp.float32)
    if nonfinite == "off":
        params, opt_state = updated(grads, state.opt_state, trained)
    else:
        # an inf/NaN update always shows in the new parameters
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(updated(grads, state.opt_state, trained)[0])
        params, opt_state = jax.lax.cond(ok, updated, lambda _, opt_state, params: (params, opt_state),
                                         grads, state.opt_state, trained)
        metrics["nonfinite"] = (~ok).astype(jnp.float32)
        if nonfinite == "halt":
            metrics["halt"] = metrics["nonfinite"]
    return TrainState(state.step + 1, with_trainable(params, state.params), opt_state, state.rng), metrics


def make_update(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                prepare: PrepareFn | None = None, micro_batches: int = 1, nonfinite: NonFinitePolicy = "skip",
                learning_rate: optax.Schedule | None = None) -> Callable[..., tuple[TrainState, Metrics]]:
    """A pure `update(state, batch, *frozen) -> (state, metrics)` from a micro-batch loss.

    `rng = step_key(state)` (typed); `batch, context = prepare(params, batch, frozen, rng)` (default:
    unchanged batch, empty context); gradients by `accumulate_gradients`; update by
    `apply_gradients`. Metrics: the loss function's, plus `loss`, `grad_norm`, `learning_rate`,
    `nonfinite` (and `halt`).

    Args:
      loss_fn: `(params, micro_batch, context, rng) -> (loss, metrics)`.
      optimizer: the optax transform.
      prepare: `(params, batch, frozen, rng) -> (batch, context)` run once on the full batch,
        outside the gradient (global token counts, reference log-probs from frozen parameters).
      micro_batches: gradient-accumulation micro-batches.
      nonfinite: the NaN/Inf policy of `apply_gradients`.
      learning_rate: the schedule reported as `learning_rate`.

    Returns:
      The pure update function (jit it with `jit_step`).
    """
    _check_positive_int("make_update", "micro_batches", micro_batches)
    if nonfinite not in get_args(NonFinitePolicy):
        raise ValueError(f"make_update: nonfinite must be one of {get_args(NonFinitePolicy)}, got {nonfinite!r}")

    def update(state: TrainState, batch: Batch, *frozen) -> tuple[TrainState, Metrics]:
        prepare_rng, loss_rng = jax.random.split(step_key(state))
        batch = dict(batch)
        if prepare is None:
            context = {}
        else:
            batch, context = prepare(state.params, batch, frozen, prepare_rng)
        loss, grads, metrics = accumulate_gradients(loss_fn, state.params, batch, context, loss_rng,
                                                    micro_batches=micro_batches)
        state, opt_metrics = apply_gradients(state, grads, loss, optimizer, nonfinite=nonfinite,
                                             learning_rate=learning_rate)
        return state, {"loss": loss.astype(jnp.float32), **metrics, **opt_metrics}

    return update


_TOKEN_ROW_FIELDS = ("loss_mask", "positions", "segment_ids")


def _accepted_keys(batch_keys: Sequence[str], optional_keys: Sequence[str]) -> set[str]:
    """Keys a step with required `batch_keys` takes: those, the optional token-row fields of each
    token track (`positions`, `segment_ids`, `loss_mask` with the track's prefix), the data
    pipeline's `example_mask` (and `margin` for pairs: `rlhf_jax.data.batches`), and `optional_keys`."""
    accepted = set(batch_keys) | set(optional_keys) | {"example_mask"}
    for key in batch_keys:
        if key.endswith("tokens"):
            accepted |= {key[: -len("tokens")] + f for f in _TOKEN_ROW_FIELDS}
    if "chosen_tokens" in batch_keys:
        accepted.add("margin")
    return accepted


@dataclasses.dataclass(frozen=True)
class Step:
    """A jitted step that checks its batch against the mesh first: `step(state, batch, *frozen)`.

    Attributes:
      jitted: the `jax.jit`-wrapped update (for `.lower(...)`, e.g. `rlhf_jax.compile`).
      mesh: the device mesh.
      strategy: the sharding strategy.
      micro_batches: gradient-accumulation micro-batches (the batch must split into them evenly
        on every data-parallel shard).
      state_shardings: the `NamedSharding`s of the state.
      batch_keys: the keys a batch must have (None = not checked); other keys are refused unless
        optional for them (see `_accepted_keys`) or in `optional_keys`.
      optional_keys: further keys a batch may have.
      num_frozen: frozen arguments (e.g. reference parameters) the step takes after the batch.
      host_check: `(batch, name) -> None`, run on every batch before the call (host-side value checks:
        token ids in the vocabulary, rollout prompt lengths); None = none.
    """

    jitted: Any
    mesh: Mesh
    strategy: sh.Strategy
    micro_batches: int
    state_shardings: Any
    batch_keys: tuple[str, ...] | None = None
    name: str = "step"
    optional_keys: tuple[str, ...] = ()
    num_frozen: int | None = None
    host_check: Callable[[Mapping[str, Any], str], None] | None = None

    def check_batch(self, batch: Mapping[str, Any]) -> int:
        """Raise a clear error for a batch this step cannot take; return its batch size."""
        if isinstance(batch, Mapping):
            if self.batch_keys is not None:
                missing = [k for k in self.batch_keys if k not in batch]
                if missing:
                    raise KeyError(f"{self.name}: batch lacks keys {missing}; it has {sorted(batch)}")
                accepted = _accepted_keys(self.batch_keys, self.optional_keys)
                unknown = sorted(str(k) for k in batch if k not in accepted)
                if unknown:
                    raise KeyError(f"{self.name}: unknown batch keys {unknown} (a typo?); this step takes "
                                   f"{sorted(accepted)}")
            for key, x in batch.items():
                shape = getattr(x, "shape", None)
                if shape is not None and len(shape) >= 1 and shape[0] == 0:
                    raise ValueError(f"{self.name}: batch[{key!r}] has no rows (shape {tuple(shape)}); a batch needs "
                                     "at least one example")
                if shape is not None and len(shape) == 2 and shape[1] == 0 and str(key).endswith("tokens"):
                    raise ValueError(f"{self.name}: batch[{key!r}] has no positions (shape {tuple(shape)})")
            if self.host_check is not None:
                self.host_check(batch, self.name)
        return sh.check_batch(batch, mesh=self.mesh, strategy=self.strategy, micro_batches=self.micro_batches)

    def _check_frozen(self, frozen: tuple) -> None:
        if self.num_frozen is not None and len(frozen) != self.num_frozen:
            takes = "step(state, batch" + "".join(f", frozen{i}" for i in range(self.num_frozen)) + ")"
            raise TypeError(f"{self.name}: expected {self.num_frozen} frozen parameter tree(s) after the batch "
                            f"({takes}; e.g. the reference parameters of a DPO step with reference='model'), "
                            f"got {len(frozen)}")

    def __call__(self, state, batch, *frozen):
        self._check_frozen(frozen)
        self.check_batch(batch)
        return self.jitted(state, batch, *frozen)

    def lower(self, state, batch, *frozen):
        """`jax.jit(...).lower` on concrete or abstract (`ShapeDtypeStruct`) arguments."""
        self._check_frozen(frozen)
        self.check_batch(batch)
        return self.jitted.lower(state, batch, *frozen)


def jit_step(update: Callable[..., tuple[Any, Metrics]], *, mesh: Mesh, strategy: str | sh.Strategy,
             state_shardings: Any, frozen_shardings: Sequence[Any] = (), micro_batches: int = 1,
             donate: bool = True, batch_keys: Sequence[str] | None = None, name: str = "step",
             optional_keys: Sequence[str] = (), host_check: Callable[[Mapping[str, Any], str], None] | None = None
             ) -> Step:
    """Jit `update(state, batch, *frozen)` with shardings and state donation.

    The state keeps `state_shardings` in and out (so it can be donated and updated in place), every
    batch array is split over the strategy's batch axes on its leading dimension, frozen arguments
    (e.g. reference parameters) keep `frozen_shardings`, and metrics come back replicated. The
    update is traced inside `sharding.activation_sharding`, so the model's
    `constrain_activations` keep activations split like the batch.

    Args:
      update: the pure update (`make_update`).
      mesh: the device mesh.
      strategy: a `Strategy` or registered name (checked against the mesh now).
      state_shardings: the state's `NamedSharding` tree (`train_state_shardings`).
      frozen_shardings: one sharding tree per frozen argument.
      micro_batches: checked against each batch's size.
      donate: donate the state's buffers (`donate_argnums=(0,)`).
      batch_keys: keys every batch must have (checked before compiling); other keys are refused
        unless optional (`Step`).
      name: used in error messages.
      optional_keys: further keys a batch may have.
      host_check: `(batch, name) -> None` value checks run on every batch (default: the update's
        `host_check` attribute, which the `make_*_step` builders set, e.g. token ids in the vocabulary).

    Returns:
      A `Step`.
    """
    strategy = sh.check_strategy(strategy, mesh)
    _check_positive_int("jit_step", "micro_batches", micro_batches)
    rep = sh.replicated(mesh)
    data = sh.batch_sharding(mesh, strategy)

    @functools.wraps(update)
    def traced(*args):
        with sh.activation_sharding(mesh, strategy):
            return update(*args)

    jitted = jax.jit(
        traced,
        in_shardings=(state_shardings, data, *frozen_shardings),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,) if donate else (),
    )
    if host_check is None:
        host_check = getattr(update, "host_check", None)
    return Step(jitted, mesh, strategy, micro_batches, state_shardings,
                None if batch_keys is None else tuple(batch_keys), name, tuple(optional_keys),
                len(frozen_shardings), host_check)


def jit_model_step(update: Callable[..., tuple[Any, Metrics]], model,
                   optimizer: OptimizerConfig | optax.GradientTransformation, *, mesh: Mesh,
                   strategy: str | sh.Strategy, micro_batches: int = 1, batch_keys: Sequence[str] | None = None,
                   frozen_params: int = 0, donate: bool = True, name: str = "step") -> Step:
    """`jit_step` of a one-model update, its state shardings derived from `model` and `optimizer`.

    Example (any of `make_sft_step`, `make_reward_model_step`, `make_dpo_step`):

        update = make_dpo_step(model, optim, objective=DPO(beta=0.1))
        step = jit_model_step(update, model, optim, mesh=mesh, strategy="fsdp",
                              batch_keys=dpo_batch_keys(DPO(beta=0.1)), frozen_params=1)
        state, metrics = step(state, batch, reference_params)

    Args:
      update: the pure `update(state, batch, *frozen) -> (state, metrics)`.
      model: the trained `CausalLM` (its abstract params and logical axes give the shardings).
      optimizer: the same `OptimizerConfig` or optax transform `update` was built with.
      mesh: the device mesh.
      strategy: a `Strategy` or registered name.
      micro_batches: the update's micro-batches (checked against each batch's size).
      batch_keys: keys every batch must have.
      frozen_params: how many frozen parameter-tree arguments follow the batch (e.g. 1 for DPO's
        reference parameters), each sharded like the trained parameters.
      donate: donate the state's buffers.
      name: used in error messages.

    Returns:
      A `Step` (its `state_shardings.params` place frozen parameters).
    """
    if not isinstance(frozen_params, int) or isinstance(frozen_params, bool) or frozen_params < 0:
        raise ValueError(f"jit_model_step: frozen_params must be an int >= 0, got {frozen_params!r}")
    tx, _ = resolve_optimizer(optimizer)
    shardings = model_state_shardings(model, tx, mesh=mesh, strategy=strategy)
    return jit_step(update, mesh=mesh, strategy=strategy, state_shardings=shardings,
                    frozen_shardings=(shardings.params,) * frozen_params, micro_batches=micro_batches,
                    donate=donate, batch_keys=batch_keys, name=name)


def resolve_optimizer(optimizer: OptimizerConfig | optax.GradientTransformation
                      ) -> tuple[optax.GradientTransformation, optax.Schedule | None]:
    """`(transform, schedule)` from an `OptimizerConfig` (schedule known) or an optax transform (None)."""
    if isinstance(optimizer, OptimizerConfig):
        return make_optimizer(optimizer), make_schedule(optimizer)
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer, None
    raise TypeError(f"optimizer must be an OptimizerConfig or an optax.GradientTransformation, got {type(optimizer).__name__}")


def model_state_shardings(model, optimizer: optax.GradientTransformation, *, mesh: Mesh,
                          strategy: str | sh.Strategy) -> TrainState:
    """The `TrainState` shardings of `model` (a `CausalLM`) trained with `optimizer`.

    Runs the sharding lint first: errors (an axis the mesh lacks, indivisible dimensions) raise
    `ShardingError`, warnings (large replicated parameters, idle mesh axes) become Python warnings.
    """
    warn_lint(lint(model.abstract_params(), model.logical_axes, mesh=mesh, strategy=strategy))
    abstract = abstract_train_state(model.init, optimizer)
    return train_state_shardings(abstract, model.logical_axes, optimizer, mesh=mesh, strategy=strategy)


def micro_share(total: jax.Array, count: jax.Array, micro_batches: int) -> jax.Array:
    """A micro-batch's contribution to a full-batch mean, scaled for averaging over micro-batches.

    `total / count * micro_batches`, with `count` the *global* count: averaging these over the
    micro-batches (as `accumulate_gradients` does with metrics) gives `sum of totals / count`.
    """
    return total.astype(jnp.float32) / jnp.maximum(count, 1.0) * micro_batches
