"""TrainState / RLState: abstract shapes, sharded materialisation, optimizer-state placement."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import sharding as sh
from rlhf_jax.kl_control import adaptive_kl_controller
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import OptimizerConfig, make_optimizer
from rlhf_jax.state import (
    RLState,
    TrainState,
    abstract_train_state,
    as_raw_key,
    create_train_state,
    rl_state_shardings,
    train_state_from_params,
    train_state_shardings,
)
from rlhf_jax.testing import tiny_config

LM = CausalLM(tiny_config())
TX = make_optimizer(OptimizerConfig(learning_rate=1e-3))


def _toy_init(key):
    """A small two-leaf 'model' (fast to compile) with logical axes below."""
    k1, k2 = jax.random.split(key)
    return {"w": jax.random.normal(k1, (16, 8)), "b": jax.random.normal(k2, (8,))}


TOY_AXES = {"w": ("embed", "mlp"), "b": ("mlp",)}


def test_abstract_state_allocates_nothing_and_has_adam_moments():
    abstract = abstract_train_state(LM.init, TX)
    assert isinstance(abstract, TrainState)
    assert abstract.step.shape == () and abstract.step.dtype == jnp.int32
    assert abstract.rng.shape == (2,) and abstract.rng.dtype == jnp.uint32
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract.params, LM.abstract_params())
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract.opt_state[1][0].mu, abstract.params)
    # params + mu + nu, plus the two step counters
    n = LM.num_params()
    assert sum(x.size for x in leaves) == 3 * n + 2 + 1 + 2


def test_state_shardings_put_moments_beside_their_parameters():
    mesh = sh.make_mesh({"data": 2, "fsdp": 4})
    abstract = abstract_train_state(LM.init, TX)
    shardings = train_state_shardings(abstract, LM.logical_axes, TX, mesh=mesh, strategy="fsdp")
    adam = shardings.opt_state[1][0]
    assert adam.mu["layers"]["mlp"]["up_proj"].spec == P(None, "fsdp")
    assert adam.nu["embed"].spec == P(None, "fsdp")
    assert adam.count.spec == P() and shardings.step.spec == P() and shardings.rng.spec == P()


def test_create_train_state_is_sharded_and_equals_the_plain_init():
    mesh = sh.make_mesh({"fsdp": 4, "tensor": 2})
    state = create_train_state(_toy_init, TX, rng=7, logical_axes=TOY_AXES, mesh=mesh, strategy="fsdp_tp")
    w = state.params["w"]
    assert w.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in w.addressable_shards} == {(4, 4)}  # never whole on one device
    want = _toy_init(jax.random.fold_in(as_raw_key(7), 0))
    chex.assert_trees_all_equal(state.params, want, strict=True)
    assert int(state.step) == 0
    np.testing.assert_array_equal(np.asarray(state.rng), np.asarray(jax.random.fold_in(as_raw_key(7), 1)))
    adam = state.opt_state[1][0]
    assert adam.mu["w"].sharding.spec == P("fsdp", "tensor")
    chex.assert_trees_all_equal(adam.mu, adam.nu, jax.tree.map(jnp.zeros_like, want), strict=True)


def test_train_state_from_params_places_host_arrays_shard_by_shard():
    params = jax.tree.map(np.asarray, _toy_init(jax.random.key(0)))
    mesh = sh.make_mesh({"fsdp": 8})
    state = train_state_from_params(params, TX, rng=jax.random.key(3), logical_axes=TOY_AXES, mesh=mesh,
                                    strategy="fsdp")
    assert {s.data.shape for s in state.params["w"].addressable_shards} == {(2, 8)}
    assert state.params["b"].sharding.spec == P()
    np.testing.assert_array_equal(np.asarray(state.params["w"]), params["w"])
    assert state.opt_state[1][0].nu["w"].sharding.spec == P("fsdp")


def test_rl_state_shardings_reference_like_policy_kl_replicated():
    mesh = sh.make_mesh({"fsdp": 8})
    policy = abstract_train_state(_toy_init, TX)
    kl = adaptive_kl_controller(init_kl_coef=0.1, target=6.0, horizon=100).init()
    abstract = RLState(policy, policy.params, None, kl)
    shardings = rl_state_shardings(abstract, policy_axes=TOY_AXES, value_axes=None, policy_optimizer=TX,
                                   value_optimizer=None, mesh=mesh, strategy="fsdp")
    assert shardings.reference["w"].spec == P("fsdp") == shardings.policy.params["w"].spec
    assert shardings.value is None and shardings.kl.kl_coef.spec == P()
    with pytest.raises(ValueError, match="value_axes and value_optimizer"):
        rl_state_shardings(RLState(policy, None, policy, None), policy_axes=TOY_AXES, value_axes=None,
                           policy_optimizer=TX, value_optimizer=None, mesh=mesh, strategy="fsdp")


def test_as_raw_key_accepts_seeds_typed_and_raw_keys():
    raw = as_raw_key(5)
    assert raw.dtype == jnp.uint32 and raw.shape == (2,)
    np.testing.assert_array_equal(np.asarray(as_raw_key(jax.random.key(5))), np.asarray(raw))
    np.testing.assert_array_equal(np.asarray(as_raw_key(raw)), np.asarray(raw))
    with pytest.raises(ValueError, match="uint32\\[2\\] key"):
        as_raw_key(jnp.zeros((3,), jnp.float32))


def test_adafactor_factored_statistics_stay_replicated():
    tx = make_optimizer(OptimizerConfig(name="adafactor", learning_rate=1e-3))
    big = lambda k: {"w": jax.random.normal(k, (256, 256))}  # noqa: E731  (factored: both dims >= 128)
    mesh = sh.make_mesh({"fsdp": 8})
    shardings = train_state_shardings(abstract_train_state(big, tx), {"w": ("embed", "mlp")}, tx, mesh=mesh,
                                      strategy="fsdp")
    factored = shardings.opt_state[1][0]
    assert factored.v_row["w"].spec == P() and factored.v_col["w"].spec == P()
    assert shardings.params["w"].spec == P("fsdp")
    assert isinstance(tx, optax.GradientTransformation)


def test_create_train_state_names_a_bad_optimizer_or_init():
    mesh = sh.make_mesh({"data": 1}, devices=jax.devices()[:1])
    with pytest.raises(TypeError, match="create_train_state: optimizer must be an optax.GradientTransformation"):
        create_train_state(_toy_init, None, rng=0, logical_axes=TOY_AXES, mesh=mesh, strategy="dp")
    with pytest.raises(TypeError, match="init_params must be a function"):
        create_train_state({"w": np.ones(2)}, TX, rng=0, logical_axes=TOY_AXES, mesh=mesh, strategy="dp")
