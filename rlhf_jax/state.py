"""Training state pytrees, built abstractly and materialised directly sharded.

`TrainState(step, params, opt_state, rng)` is everything one model's training needs to continue
bit for bit. `RLState` groups the models of online RL: the policy's `TrainState`, the frozen
reference parameters (no optimizer state), the value model's `TrainState` (or None when the value
head shares the policy's backbone: its parameters then live inside the policy's `params`), and the
KL controller's state.

A state is never built whole on one device: its shapes come from `jax.eval_shape`, its shardings
from the strategy's rules, and `jax.jit(init, out_shardings=...)` writes each shard where it lives
(big_vision / MaxText style).

Example:
    >>> mesh = make_mesh({"fsdp": 8})
    >>> tx = make_optimizer(OptimizerConfig(learning_rate=1e-5))
    >>> state = create_train_state(lm.init, tx, rng=jax.random.key(0), logical_axes=lm.logical_axes,
    ...                            mesh=mesh, strategy="fsdp")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from rlhf_jax import sharding as sh

__all__ = [
    "Frozen",
    "trainable_view",
    "with_trainable",
    "TrainState",
    "RLState",
    "as_raw_key",
    "init_train_state",
    "abstract_train_state",
    "train_state_shardings",
    "create_train_state",
    "train_state_from_params",
    "place_params",
    "rl_state_shardings",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Frozen:
    """A parameter subtree that is carried and sharded like any other but never trained.

    A pytree node (its arrays are leaves: they are placed, donated and checkpointed as usual);
    `trainable_view` hides it from the gradient and the optimizer.
    """

    tree: Any


def _is_frozen(x: Any) -> bool:
    return isinstance(x, Frozen)


def trainable_view(params: Any) -> Any:
    """`params` with every `Frozen` subtree replaced by `optax.MaskedNode()` (a node without leaves).

    What gradients, optimizer states and updates are shaped like: `optimizer.init(trainable_view(p))`
    holds no state for frozen weights, and `jax.grad` with respect to the view never computes
    their gradients. The identity for a tree without `Frozen` nodes.
    """
    return jax.tree.map(lambda x: optax.MaskedNode() if _is_frozen(x) else x, params, is_leaf=_is_frozen)


def with_trainable(view: Any, params: Any) -> Any:
    """The full parameter tree: trained leaves from `view`, `Frozen` subtrees from `params`."""
    return jax.tree.map(lambda p, v: p if _is_frozen(p) else v, params, view, is_leaf=_is_frozen)


class TrainState(NamedTuple):
    """One model's training state.

    Attributes:
      step: int32 scalar, the number of steps taken (skipped non-finite updates included).
      params: the parameter tree (`Frozen` subtrees included).
      opt_state: the optax state of `trainable_view(params)`.
      rng: uint32[2] base key; step `s` uses `jax.random.fold_in(rng, s)`.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


class RLState(NamedTuple):
    """The state of online RL (PPO / GRPO family).

    Attributes:
      policy: the policy's `TrainState`.
      reference: frozen reference parameters (no optimizer state), or None (no KL term).
      value: the value model's `TrainState`; None when there is no critic (GRPO) or when the value
        head shares the policy's backbone (its weights are then part of `policy.params`).
      kl: the KL controller's state (`rlhf_jax.kl_control.KLControllerState`) or None.
    """

    policy: TrainState
    reference: Any | None
    value: TrainState | None
    kl: Any | None


def as_raw_key(rng: jax.Array | int) -> jax.Array:
    """A uint32[2] key from a seed, a typed key (`jax.random.key`) or a raw key."""
    if isinstance(rng, int):
        return jax.random.key_data(jax.random.key(rng))
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    if rng.dtype != jnp.uint32 or rng.shape != (2,):
        raise ValueError(f"rng must be a seed, a typed key or a uint32[2] key, got {rng.dtype}{list(rng.shape)}")
    return rng


def init_train_state(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                     rng: jax.Array | int) -> TrainState:
    """A fresh `TrainState`: params from `init_params(fold_in(rng, 0))`, optimizer state, step 0.

    Pure and jittable; `create_train_state` runs it under `jit` with sharded outputs.

    Args:
      init_params: `key -> params` (e.g. `CausalLM.init`).
      optimizer: the optax transform.
      rng: a seed or key; the state keeps `fold_in(rng, 1)` for the training steps.

    Returns:
      `TrainState(step=0, params, opt_state, rng)`.
    """
    key = as_raw_key(rng)
    params = init_params(jax.random.fold_in(key, 0))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(trainable_view(params)),
                      jax.random.fold_in(key, 1))


def abstract_train_state(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation) -> TrainState:
    """The `jax.ShapeDtypeStruct` tree of `init_train_state`, without allocating anything."""
    return jax.eval_shape(lambda k: init_train_state(init_params, optimizer, k), jax.ShapeDtypeStruct((2,), jnp.uint32))


def _opt_state_shardings(optimizer, abstract_opt_state, abstract_params, param_shards, mesh: Mesh):
    """Shard each optimizer leaf shaped like its parameter (Adam's mu, nu, ...) like that parameter.

    Leaves of other shapes (Adafactor's factored row / column statistics), counters and scalars
    are replicated. Parameters and shardings are full trees; the optimizer sees their trainable views.
    """
    rep = sh.replicated(mesh)
    abstract_params, param_shards = trainable_view(abstract_params), trainable_view(param_shards)

    def like_param(leaf, shard, param):
        same = tuple(getattr(leaf, "shape", ())) == tuple(param.shape)
        return shard if same else rep

    return optax.tree_map_params(
        optimizer, like_param, abstract_opt_state, param_shards, abstract_params,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def train_state_shardings(abstract_state: TrainState, logical_axes: Any, optimizer: optax.GradientTransformation,
                          *, mesh: Mesh, strategy: str | sh.Strategy) -> TrainState:
    """The `NamedSharding` of every leaf of a `TrainState`.

    Parameters follow the strategy's rules; optimizer leaves shaped like a parameter follow that
    parameter; counters, scalars and the key are replicated.

    Args:
      abstract_state: a `TrainState` of arrays or ShapeDtypeStructs (`abstract_train_state`).
      logical_axes: the parameters' logical axis names (`CausalLM.logical_axes`).
      optimizer: the optax transform that made `opt_state`.
      mesh: the device mesh.
      strategy: a `Strategy` or registered name.

    Returns:
      A `TrainState` of `NamedSharding`s.
    """
    params = sh.param_shardings(abstract_state.params, logical_axes, mesh=mesh, strategy=strategy)
    rep = sh.replicated(mesh)
    opt = _opt_state_shardings(optimizer, abstract_state.opt_state, abstract_state.params, params, mesh)
    return TrainState(rep, params, opt, rep)


def _check_state_args(fn: str, optimizer, *, init_params=None) -> None:
    """A clear error for an optimizer that is not an optax transform, or an `init_params` that is not callable."""
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"{fn}: optimizer must be an optax.GradientTransformation (e.g. optax.adamw(1e-5) or "
                        f"rlhf_jax.optim.make_optimizer(config)), got {type(optimizer).__name__}")
    if init_params is not None and not callable(init_params):
        raise TypeError(f"{fn}: init_params must be a function key -> params (e.g. CausalLM.init), got "
                        f"{type(init_params).__name__}; for existing parameters use train_state_from_params")


def create_train_state(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation, *,
                       rng: jax.Array | int, logical_axes: Any, mesh: Mesh,
                       strategy: str | sh.Strategy) -> TrainState:
    """A new `TrainState`, each shard initialised on the device that holds it.

    Args:
      init_params: `key -> params`, jittable (e.g. `CausalLM.init`).
      optimizer: the optax transform.
      rng: a seed or key.
      logical_axes: the parameters' logical axis names.
      mesh: the device mesh.
      strategy: a `Strategy` or registered name.

    Returns:
      The materialised, sharded `TrainState`.
    """
    _check_state_args("create_train_state", optimizer, init_params=init_params)
    abstract = abstract_train_state(init_params, optimizer)
    shardings = train_state_shardings(abstract, logical_axes, optimizer, mesh=mesh, strategy=strategy)
    init = jax.jit(lambda k: init_train_state(init_params, optimizer, k), out_shardings=shardings)
    return init(as_raw_key(rng))


def place_params(params: Any, logical_axes: Any, *, mesh: Mesh, strategy: str | sh.Strategy) -> Any:
    """Put existing parameters (host numpy or device arrays) on the mesh with the strategy's layout.

    Host arrays are transferred shard by shard (`jax.device_put` with a `NamedSharding`), so no
    device ever holds a whole parameter it should only hold a slice of.
    """
    shardings = sh.param_shardings(params, logical_axes, mesh=mesh, strategy=strategy)
    return jax.device_put(params, shardings)


def train_state_from_params(params: Any, optimizer: optax.GradientTransformation, *, rng: jax.Array | int,
                            logical_axes: Any, mesh: Mesh, strategy: str | sh.Strategy) -> TrainState:
    """A step-0 `TrainState` around existing (e.g. pretrained) parameters, placed on the mesh.

    The optimizer state is created under `jit` directly in the parameters' shardings.
    """
    _check_state_args("train_state_from_params", optimizer)
    params = place_params(params, logical_axes, mesh=mesh, strategy=strategy)
    init = lambda p: optimizer.init(trainable_view(p))  # noqa: E731
    abstract_opt = jax.eval_shape(init, params)
    param_shards = jax.tree.map(lambda x: x.sharding, params)
    opt_shards = _opt_state_shardings(optimizer, abstract_opt, params, param_shards, mesh)
    opt_state = jax.jit(init, out_shardings=opt_shards)(params)
    rep = sh.replicated(mesh)
    key = jax.device_put(jax.random.fold_in(as_raw_key(rng), 1), rep)
    return TrainState(jax.device_put(jnp.zeros((), jnp.int32), rep), params, opt_state, key)


def rl_state_shardings(abstract_state: RLState, *, policy_axes: Any, value_axes: Any | None,
                       policy_optimizer: optax.GradientTransformation,
                       value_optimizer: optax.GradientTransformation | None,
                       mesh: Mesh, strategy: str | sh.Strategy, reference_axes: Any | None = None) -> RLState:
    """The `NamedSharding`s of an `RLState` (reference like the policy, value like `value_axes`).

    Args:
      abstract_state: an `RLState` of arrays or ShapeDtypeStructs.
      policy_axes: logical axes of the policy parameters.
      value_axes: logical axes of the value model's parameters (None without a value TrainState).
      policy_optimizer: the policy's optax transform.
      value_optimizer: the value model's optax transform (None without a value TrainState).
      mesh: the device mesh.
      strategy: a `Strategy` or registered name.
      reference_axes: logical axes of the reference parameters; default `policy_axes` (they differ
        when the policy's parameters hold more than the language model, e.g. PPO's shared value head).

    Returns:
      An `RLState` of `NamedSharding`s (None fields stay None; the KL state is replicated).
    """
    policy = train_state_shardings(abstract_state.policy, policy_axes, policy_optimizer, mesh=mesh, strategy=strategy)
    reference = None
    if abstract_state.reference is not None:
        axes = policy_axes if reference_axes is None else reference_axes
        reference = sh.param_shardings(abstract_state.reference, axes, mesh=mesh, strategy=strategy)
    value = None
    if abstract_state.value is not None:
        if value_axes is None or value_optimizer is None:
            raise ValueError("rl_state_shardings: a value TrainState needs value_axes and value_optimizer")
        value = train_state_shardings(abstract_state.value, value_axes, value_optimizer, mesh=mesh, strategy=strategy)
    rep = sh.replicated(mesh)
    kl = None if abstract_state.kl is None else jax.tree.map(lambda _: rep, abstract_state.kl)
    return RLState(policy, reference, value, kl)
