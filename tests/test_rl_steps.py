"""RL steps: each configuration's loss and update equal the pure core's on the same arrays.

The reference log-probs here come from full-logit forward passes of each joined row
(`token_logprobs` on `model.forward(...).logits`), independent of `rlhf_jax.rollout`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import advantages as adv_core
from rlhf_jax import losses
from rlhf_jax.config import ConfigError
from rlhf_jax.logprobs import token_entropy, token_logprobs
from rlhf_jax.models import CausalLM
from rlhf_jax.models.heads import init_scalar_head
from rlhf_jax.rollout import completion_logprobs, head_logprobs, join_sequences
from rlhf_jax.state import RLState, init_train_state
from rlhf_jax.steps import (
    GRPO_PRESETS,
    GRPOConfig,
    PPOConfig,
    grpo_advantages,
    grpo_config,
    grpo_objective,
    make_grpo_step,
    make_ppo_step,
    ppo_objective,
)
from rlhf_jax.testing import tiny_config

N, P, C, G = 8, 5, 6, 4
LR = 0.05


@functools.lru_cache(maxsize=None)
def _model(head="lm"):
    model = CausalLM(tiny_config(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                 num_kv_heads=1, head_dim=16), head=head)
    return model, jax.jit(model.init)(jax.random.key(0 if head == "lm" else 1))


def _batch(seed=0, *, noisy_old=0.0):
    """A rollout with ragged prompts and completions; sampler log-probs = exact ones + noise."""
    rng = np.random.default_rng(seed)
    model, params = _model()
    batch = {  # groups of G rows share a prompt, as the sampler returns them
        "prompt_tokens": np.repeat(rng.integers(3, 200, (N // G, P)).astype(np.int32), G, axis=0),
        "prompt_lengths": np.repeat(rng.integers(1, P + 1, N // G).astype(np.int32), G),
        "completion_tokens": rng.integers(3, 200, (N, C)).astype(np.int32),
        "completion_mask": np.arange(C)[None] < rng.integers(1, C + 1, N)[:, None],
        "scores": rng.normal(size=N).astype(np.float32),
    }
    logps, _ = _reference_logps(model, params, batch)
    batch["sampler_logps"] = (logps + noisy_old * rng.normal(size=(N, C))).astype(np.float32)
    batch["ref_logps"] = (logps + 0.3 * rng.normal(size=(N, C))).astype(np.float32)
    return batch


@functools.lru_cache(maxsize=None)
def _full_forward(model):
    return jax.jit(lambda p, t: model.forward(p, t).logits)


def _reference_logps(model, params, batch, temperature=1.0):
    """Per-row full forward: log-probs and entropies of the completion tokens, `[N, C]` numpy."""
    joined = np.zeros((N, P + C), np.int32)
    for b in range(N):
        n = batch["prompt_lengths"][b]
        joined[b, : n + C] = np.concatenate([batch["prompt_tokens"][b, :n], batch["completion_tokens"][b]])
    logits = _full_forward(model)(params, joined)
    logps = np.asarray(token_logprobs(logits[:, :-1], joined[:, 1:], temperature=temperature))
    ent = np.asarray(token_entropy(logits[:, :-1], temperature=temperature))
    idx = batch["prompt_lengths"][:, None] - 1 + np.arange(C)[None]
    return np.take_along_axis(logps, idx, 1), np.take_along_axis(ent, idx, 1)


def _grpo_state(params):
    tx = optax.sgd(LR)
    return RLState(init_train_state(lambda k: params, tx, 0), params, None, None), tx


def _core_grpo_loss(config, logps, old, batch, entropy):
    """The family's objective from the pure core only."""
    mask = batch["completion_mask"]
    s = jnp.asarray(batch["scores"])
    kl_in_reward = config.kl_mode == "reward"
    k_old = losses.kl_divergence(batch["sampler_logps"], batch["ref_logps"], estimator=config.kl_estimator_used)
    if config.advantage in ("reinforce_pp", "reinforce_pp_baseline"):
        group = G if config.advantage == "reinforce_pp_baseline" else None
        a = adv_core.reinforce_plus_plus(s, mask, kl=k_old if kl_in_reward else None,
                                         kl_coef=config.kl_coef if kl_in_reward else 0.0, group_size=group)
    else:
        if kl_in_reward:
            s = s - config.kl_coef * jnp.sum(jnp.where(mask, k_old, 0.0), axis=1)
        a = {
            "grpo": lambda: adv_core.group_normalized(s, G, scale="group", eps=config.adv_eps),
            "dr_grpo": lambda: adv_core.group_normalized(s, G, scale="none"),
            "rloo": lambda: adv_core.leave_one_out(s, G),
            "remax": lambda: adv_core.remax(s, batch.get("baseline_scores")),
        }[config.advantage]()
    if config.policy_loss == "cispo":
        per_token, m = losses.cispo_loss(logps, old, a, mask, clip_eps_high=config.clip_eps_high)
    else:
        per_token, m = losses.ppo_policy_loss(
            logps, old, a, mask, clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high,
            ratio_level="sequence" if config.policy_loss == "gspo" else "token")
    if config.kl_mode == "loss":
        per_token = per_token + config.kl_coef * jnp.where(
            mask, losses.kl_divergence(logps, batch["ref_logps"], estimator=config.kl_estimator_used), 0.0)
    per_token = per_token - config.entropy_coef * jnp.where(mask, entropy, 0.0)
    max_len = {"max_len": C} if config.loss_aggregation == "seq_mean_token_sum_norm" else {}
    return losses.aggregate(per_token, mask, mode=config.loss_aggregation, **max_len), m


def _random_rollout_arrays(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.arange(C)[None] < rng.integers(1, C + 1, N)[:, None]
    logps = -rng.uniform(0.1, 3.0, (N, C)).astype(np.float32)
    return dict(
        logps=logps,
        old=(logps + 0.2 * rng.normal(size=(N, C))).astype(np.float32),
        ref=(logps + 0.3 * rng.normal(size=(N, C))).astype(np.float32),
        entropy=rng.uniform(0.0, 4.0, (N, C)).astype(np.float32),
        mask=mask,
        scores=rng.normal(size=N).astype(np.float32),
        baseline=rng.normal(size=N).astype(np.float32),  # ReMax's greedy scores (drawn last: the rest unchanged)
    )


@pytest.mark.parametrize("preset", sorted(GRPO_PRESETS))
def test_grpo_family_objective_equals_the_core(preset):
    """Advantages and loss of every preset against the pure core on the same arrays."""
    a = _random_rollout_arrays()
    config = grpo_config(preset, group_size=G, entropy_coef=0.01)
    if preset == "gspo":
        config = config.replace(clip_eps=0.05, clip_eps_high=0.08)  # wide enough that some rows pass
    batch = {"completion_mask": a["mask"], "scores": a["scores"], "sampler_logps": a["old"], "ref_logps": a["ref"],
             "baseline_scores": a["baseline"]}
    baseline = a["baseline"] if config.greedy_baseline else None

    def ours(logps):
        advantages = grpo_advantages(a["scores"], a["mask"], config=config, old_logps=a["old"], ref_logps=a["ref"],
                                     baseline_scores=baseline)
        return grpo_objective(logps, a["old"], advantages, a["mask"], config=config, ref_logps=a["ref"],
                              entropy=a["entropy"])

    def core(logps):
        return _core_grpo_loss(config, logps, a["old"], batch, a["entropy"])

    (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(a["logps"])
    (core_value, core_metrics), core_grad = jax.value_and_grad(core, has_aux=True)(a["logps"])
    np.testing.assert_allclose(loss, core_value, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, core_grad, rtol=1e-5, atol=1e-7)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "approx_kl"):
        np.testing.assert_allclose(metrics[key], core_metrics[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert float(core_metrics["clip_ratio/region_mean"]) > 0  # the clip is exercised


@functools.lru_cache(maxsize=None)
def _grpo_step(config):
    model, _ = _model()
    return jax.jit(make_grpo_step(model, optax.sgd(LR), config=config))


# "auto" old log-probs (ratio 1, KL in the loss) and sampler old log-probs with the KL in the reward.
_STEP_CONFIGS = {
    "grpo": grpo_config("grpo", group_size=G, entropy_coef=0.01),
    "rloo": grpo_config("rloo", group_size=G, old_logprobs="sampler"),
}


@pytest.mark.parametrize("name", sorted(_STEP_CONFIGS))
def test_grpo_step_loss_and_update_equal_the_core(name):
    """The jitted step's loss and SGD update equal the core's on the model's own log-probs."""
    model, params = _model()
    batch = _batch(noisy_old=0.2)
    config = _STEP_CONFIGS[name]
    state, _ = _grpo_state(params)
    new_state, metrics = _grpo_step(config)(state, batch)

    @jax.jit
    def core_loss_and_grad(p):
        def core_loss(p):
            logps, ent = _logps_entropy_traced(model, p, batch)
            old = jax.lax.stop_gradient(logps) if config.old_logprobs == "auto" else batch["sampler_logps"]
            return _core_grpo_loss(config, logps, old, batch, ent)
        return jax.value_and_grad(core_loss, has_aux=True)(p)

    (loss, core_metrics), grads = core_loss_and_grad(params)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["clip_ratio/region_mean"], core_metrics["clip_ratio/region_mean"], rtol=1e-6)
    expected = jax.tree.map(lambda p, g: p - LR * g, params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new_state.policy.params,
                 expected)
    assert int(new_state.policy.step) == 1


def _logps_entropy_traced(model, params, batch):
    """Like `_reference_logps` but traceable in `params` (for gradients)."""
    joined = np.zeros((N, P + C), np.int32)
    for b in range(N):
        n = batch["prompt_lengths"][b]
        joined[b, : n + C] = np.concatenate([batch["prompt_tokens"][b, :n], batch["completion_tokens"][b]])
    logits = model.forward(params, joined).logits
    idx = batch["prompt_lengths"][:, None] - 1 + np.arange(C)[None]
    logps = token_logprobs(logits[:, :-1], joined[:, 1:])
    ent = token_entropy(logits[:, :-1])
    return jnp.take_along_axis(logps, idx, 1), jnp.take_along_axis(ent, idx, 1)


def test_shared_prompt_forward_equals_the_joined_forward():
    model, params = _model()
    batch = _batch()
    args = (batch["prompt_tokens"], batch["prompt_lengths"], batch["completion_tokens"])
    joined = jax.jit(lambda p: completion_logprobs(model, p, *args, with_entropy=True))(params)
    shared = jax.jit(lambda p: completion_logprobs(model, p, *args, with_entropy=True, group_size=G))(params)
    np.testing.assert_allclose(shared[0], joined[0], atol=1e-5)
    np.testing.assert_allclose(shared[1], joined[1], atol=1e-5)
    expected, _ = _reference_logps(model, params, batch)
    np.testing.assert_allclose(shared[0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="do not split into groups of group_size=3"):
        completion_logprobs(model, params, *args, group_size=3)


@pytest.mark.parametrize("window", [None, 3])
def test_shared_prompt_gradients_equal_the_joined_forward(window):
    """The rows read their group's prompt keys and values in place (`PrefixKV`, one softmax over the
    prompt block and their own): log-probs, entropies and parameter gradients as the joined forward's
    (ragged prompts of 1..P tokens, GQA; a sliding window shorter than the prompts)."""
    model = CausalLM(dataclasses.replace(_model()[0].config, sliding_window=window))
    params = jax.jit(model.init)(jax.random.key(0))
    batch = _batch()
    args = (batch["prompt_tokens"], batch["prompt_lengths"], batch["completion_tokens"])
    weights = np.random.default_rng(5).normal(size=(N, C)).astype(np.float32)

    def loss(p, group):
        logps, ent = completion_logprobs(model, p, *args, with_entropy=True, group_size=group)
        return jnp.sum(logps * weights) + jnp.sum(ent), (logps, ent)

    (_, (lj, ej)), gj = jax.jit(jax.value_and_grad(lambda p: loss(p, 1), has_aux=True))(params)
    (_, (ls, es)), gs = jax.jit(jax.value_and_grad(lambda p: loss(p, G), has_aux=True))(params)
    np.testing.assert_allclose(ls, lj, atol=1e-6)
    np.testing.assert_allclose(es, ej, atol=1e-6)
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gj), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_head_logprobs_one_matmul_equals_the_chunked_rows():
    """Rows within one chunk take one [N, C, V] matmul; longer rows the chunk loop. Same numbers,
    same gradients (C = 6: chunk_size 6 is the one-matmul path, 4 and 1 the chunked one)."""
    model, params = _model()
    batch = _batch()
    args = (batch["prompt_tokens"], batch["prompt_lengths"], batch["completion_tokens"])

    def loss(p, chunk_size):
        logps, ent = completion_logprobs(model, p, *args, with_entropy=True, chunk_size=chunk_size)
        return jnp.sum(logps * jnp.arange(C)) + 0.3 * jnp.sum(ent), (logps, ent)

    results = {k: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, k) for k in (6, 4, 1)}
    (_, (logps, ent)), grads = results[6]
    expected_logps, expected_ent = _logps_entropy_traced(model, params, batch)
    np.testing.assert_allclose(logps, expected_logps, atol=1e-5)
    np.testing.assert_allclose(ent, expected_ent, atol=1e-5)
    for k in (4, 1):
        (_, (other_logps, other_ent)), other_grads = results[k]
        np.testing.assert_allclose(other_logps, logps, atol=1e-5)
        np.testing.assert_allclose(other_ent, ent, atol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), other_grads, grads)
    with pytest.raises(ValueError, match="must equal lm_head_weight's first axis"):
        head_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((4, 7)), jnp.zeros((2, 3), jnp.int32))


def test_join_sequences_matches_per_row_concatenation():
    batch = _batch()
    joined = np.asarray(join_sequences(batch["prompt_tokens"], batch["prompt_lengths"], batch["completion_tokens"]))
    for b in range(N):
        n = batch["prompt_lengths"][b]
        row = np.concatenate([batch["prompt_tokens"][b, :n], batch["completion_tokens"][b]])
        np.testing.assert_array_equal(joined[b, : n + C], row)
        assert (joined[b, n + C:] == 0).all()


def test_on_policy_first_update_has_ratio_one():
    model, params = _model()
    batch = _batch(noisy_old=0.0)
    for config in (_STEP_CONFIGS["grpo"], _STEP_CONFIGS["grpo"].replace(old_logprobs="sampler")):
        state, _ = _grpo_state(params)
        _, metrics = _grpo_step(config)(state, batch)
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert float(metrics[key]) == 0.0, (config.old_logprobs, key)
        assert abs(float(metrics["approx_kl"])) < 1e-6
        assert float(metrics["sampler_logprob_diff/max"]) <= 1e-5


def test_epochs_minibatches_and_micro_batches():
    """3 epochs x 2 minibatches = 6 updates, deterministic; micro-batching leaves them unchanged."""
    model, params = _model()
    batch = _batch(noisy_old=0.1)
    results = []
    for micro in (1, 2):
        config = grpo_config("dapo", group_size=G, num_epochs=3, num_minibatches=2, micro_batches=micro)
        state, _ = _grpo_state(params)
        results.append(_grpo_step(config)(state, batch))
    (s1, m1), (s2, m2) = results
    assert int(s1.policy.step) == 6
    assert float(m1["approx_kl"]) > 0  # later updates move away from the sampling policy
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s1.policy.params,
                 s2.policy.params)
    config = grpo_config("dapo", group_size=G, num_epochs=3, num_minibatches=2)  # cached: no recompile
    again, _ = _grpo_step(config)(_grpo_state(params)[0], batch)
    jax.tree.map(np.testing.assert_array_equal, again.policy.params, s1.policy.params)


def test_grpo_metrics_do_not_depend_on_micro_batches():
    """Each micro-batch's metrics were averaged as they came: `loss/policy` (normalised by the minibatch's
    counts) came out divided by micro_batches, and token means (clip fractions, KL, entropy, TIS) as
    unweighted means of the micro-batches' means. They now equal the one-micro-batch values."""
    model, params = _model()
    batch = _batch(noisy_old=0.2)
    config = grpo_config("grpo", group_size=G, entropy_coef=0.01, num_epochs=2, clip_eps=0.02, tis_cap=1.2)
    metrics = {}
    for micro in (1, 4):
        state, _ = _grpo_state(params)
        metrics[micro] = _grpo_step(config.replace(micro_batches=micro))(state, batch)[1]
    assert float(metrics[1]["loss/policy"]) != 0 and float(metrics[1]["clip_ratio/region_mean"]) > 0
    assert 0 < float(metrics[1]["tis/clip_frac"]) < 1
    assert sorted(metrics[1]) == sorted(metrics[4])
    for key in metrics[1]:
        np.testing.assert_allclose(metrics[4][key], metrics[1][key], rtol=2e-5, atol=1e-7, err_msg=key)


def test_tis_ratio_max_is_the_max_over_minibatches():
    """`tis/ratio_max` was the mean over updates of each minibatch's max (1.70 here, for a batch max of
    1.94): metrics named as maxima now take the max over updates, as over micro-batches."""
    model, params = _model()
    batch = _batch(noisy_old=0.3)
    config = grpo_config("dapo", group_size=G, num_minibatches=2, tis_cap=1.5)
    _, metrics = _grpo_step(config)(_grpo_state(params)[0], batch)
    old = _reference_logps(model, params, batch)[0]  # recomputed before the updates: the weights' numerator
    ratio = np.where(batch["completion_mask"], np.exp(old - batch["sampler_logps"]), 0.0)
    np.testing.assert_allclose(metrics["tis/ratio_max"], ratio.max(), rtol=1e-5)
    assert float(metrics["tis/clip_frac"]) > 0


def test_nonfinite_scores_skip_the_update():
    model, params = _model()
    batch = _batch()
    batch["scores"] = batch["scores"].copy()
    batch["scores"][0] = np.nan
    state, _ = _grpo_state(params)
    new_state, metrics = _grpo_step(_STEP_CONFIGS["grpo"])(state, batch)
    assert float(metrics["nonfinite"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, new_state.policy.params, params)


def test_bad_configurations_and_batches_are_named():
    with pytest.raises(ConfigError, match=r"algorithm.group_size must be >= 2 for advantage 'grpo'"):
        grpo_config("grpo", group_size=1)
    with pytest.raises(ConfigError, match=r"algorithm.group_size must be >= 2 for advantage 'rloo'"):
        grpo_config("rloo", group_size=1)
    grpo_config("reinforce_pp", group_size=1)  # no group baseline: fine
    with pytest.raises(ValueError, match="unknown preset 'ppo2'"):
        grpo_config("ppo2")
    with pytest.raises(ConfigError, match=r"algorithm.kl_mode must be one of"):
        GRPOConfig(kl_mode="both")
    with pytest.raises(ConfigError, match=r"algorithm.lam must be in \[0, 1\]"):
        PPOConfig(lam=1.5)
    model, params = _model()
    state, tx = _grpo_state(params)
    step = make_grpo_step(model, tx, config=grpo_config("grpo", group_size=3))
    with pytest.raises(ValueError, match="does not split into groups of group_size=3"):
        step(state, _batch())
    batch = _batch()
    del batch["ref_logps"]
    with pytest.raises(KeyError, match=r"kl_mode='loss' with kl_coef=0.04 needs batch\['ref_logps'\]"):
        make_grpo_step(model, tx, config=grpo_config("grpo", group_size=G))(state, batch)
    with pytest.raises(KeyError, match=r"unknown batch keys \['reward'\]"):
        make_grpo_step(model, tx, config=grpo_config("dapo", group_size=G))(state, {**_batch(), "reward": 1})
    bad = _batch()
    bad["scores"] = bad["scores"][:4]
    with pytest.raises(ValueError, match=r"batch\['scores'\] must have shape \[8\], got \[4\]"):
        make_grpo_step(model, tx, config=grpo_config("dapo", group_size=G))(state, bad)


# ----------------------------------------------------------------------------------------- PPO


def test_ppo_objective_equals_a_hand_computation():
    """Every term of PPO's loss on 2 x 2 tokens (one padded), numbers worked out by hand.

    Ratios rho = exp(logp - old) = [1, e^0.2 = 1.2214 | e^0.3 = 1.3499, pad], A = [1, 1 | -1]:
    clip terms -min(rho A, clip(rho, 0.8, 1.2) A) = [-1, -1.2 | e^0.3] (the second clipped at 1.2,
    the third kept: pessimistic for A < 0). k1 = logp - ref = [0.5, 0 | -0.1], beta = 0.1; entropy
    bonus -0.01 H = [-0.02, -0.01 | -0.03]. Token mean over the 3 tokens:
    L_pi = (-0.97 - 1.21 + e^0.3 - 0.04) / 3 = -0.2900471.
    Values V = [0.5, 0.2 | 1.0], V_old = [0.3, 0.2 | 1.05], R = [1, 0 | 0], clip 0.1: clipped V =
    [0.4, 0.2 | 1.0], 1/2 max(sq errors) = [0.18, 0.02 | 0.5], mean 0.2333333, x vf_coef 0.5.
    ptx: -mean([-1, -3]) = 2, x ptx_coef 0.25. Total 0.3266196.
    """
    config = PPOConfig(clip_eps=0.2, kl_mode="loss", kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01,
                       vf_coef=0.5, value_clip=0.1, ptx_coef=0.25, loss_aggregation="token_mean")
    mask = np.array([[True, True], [True, False]])
    logps = np.array([[-1.0, -2.0], [-0.5, -3.0]], np.float32)
    arrays = dict(
        old_logps=np.array([[-1.0, -2.2], [-0.8, 0.0]], np.float32),
        advantages=np.array([[1.0, 1.0], [-1.0, 0.0]], np.float32),
        mask=mask,
        values=np.array([[0.5, 0.2], [1.0, 7.0]], np.float32),
        old_values=np.array([[0.3, 0.2], [1.05, 0.0]], np.float32),
        returns=np.array([[1.0, 0.0], [0.0, 0.0]], np.float32),
        ref_logps=np.array([[-1.5, -2.0], [-0.4, 0.0]], np.float32),
        entropy=np.array([[2.0, 1.0], [3.0, 9.0]], np.float32),
        ptx_logps=np.array([[-1.0, -3.0]], np.float32),
        ptx_mask=np.array([[1, 1]], np.int32),
    )

    def loss(lp, **kw):
        return ppo_objective(lp, config=config, **{**arrays, **kw})

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(logps)
    np.testing.assert_allclose(value, 0.3266196, rtol=1e-6)
    expected = {
        "loss/policy": -0.2833804, "kl": 0.4 / 3, "kl/sequence": 0.2, "entropy": 2.0,
        "value_loss": 0.7 / 3, "value_clipfrac": 1 / 3, "loss/ptx": 2.0, "approx_kl": 0.02375386,
        "clip_ratio/high_mean": 1 / 3, "clip_ratio/low_mean": 0.0, "clip_ratio/region_mean": 1 / 3,
    }
    for key, want in expected.items():
        np.testing.assert_allclose(metrics[key], want, rtol=1e-6, atol=1e-7, err_msg=key)
    # d/dlogp: -rho A where unclipped (t00, t10), 0 where clipped (t01), + beta (k1), / 3 tokens.
    np.testing.assert_allclose(grad, [[-0.3, 0.1 / 3], [0.4832863, 0.0]], rtol=1e-6, atol=1e-7)
    # A traced controller beta replaces config.kl_coef: 0.3 adds 0.2 x (0.5 - 0.1) / 3.
    np.testing.assert_allclose(loss(logps, kl_coef=jnp.float32(0.3))[0], 0.3532863, rtol=1e-6)
    # Without values and ptx data: the policy part alone, and no value / ptx metrics.
    alone, m = loss(logps, values=None, ptx_logps=None)
    np.testing.assert_allclose(alone, -0.2900471, rtol=1e-6)
    assert not {"value_loss", "value_clipfrac", "loss/ptx"} & set(m)


def test_ppo_value_clipfrac_counts_the_tokens_the_clip_sets_and_bad_arguments_are_named():
    """`value_clipfrac` is TRL's `val/clipfrac` (verl's `vf_clipfrac`): tokens whose clipped squared
    error is the larger, so the clip sets the loss. V_old = 0, R = 1, clip 0.2: V = 0.5 is clipped to
    0.2 (error 0.64 > 0.25: counts); V = 2 (0.64 < 1) and V = -0.5 (1.44 < 2.25) left the range but
    keep their unclipped, larger error; V = 0.1 is inside. 1 of 4 (it was 3 of 4: |V - V_old| > clip)."""
    from rlhf_jax.steps.ppo import ppo_value_objective  # noqa: PLC0415

    config = PPOConfig(value_clip=0.2, vf_coef=1.0)
    values, zeros, ones = jnp.array([[0.5, 2.0, -0.5, 0.1]]), jnp.zeros((1, 4)), jnp.ones((1, 4))
    loss, metrics = ppo_value_objective(values, zeros, ones, ones > 0, config=config)
    np.testing.assert_allclose(metrics["value_clipfrac"], 0.25)
    np.testing.assert_allclose(loss, 0.5 * (0.64 + 1.0 + 2.25 + 0.81) / 4, rtol=1e-6)
    lp, m = jnp.zeros((1, 4)), jnp.ones((1, 4), bool)
    with pytest.raises(ValueError, match="ppo_value_objective: returns is None"):
        ppo_objective(lp, lp, lp, m, config=config, values=values, old_values=zeros)
    with pytest.raises(ValueError, match="ppo_objective: ptx_logps needs its ptx_mask"):
        ppo_objective(lp, lp, lp, m, config=config, ptx_logps=lp)


def _ppo_states(params, *, shared):
    tx = optax.sgd(LR)
    if shared:
        model, _ = _model()
        full = {"lm": params, "value_head": init_scalar_head(model.config, jax.random.key(5))}
        return init_train_state(lambda k: full, tx, 0), None, tx
    vmodel, vparams = _model("scalar")
    return init_train_state(lambda k: params, tx, 0), init_train_state(lambda k: vparams, tx, 1), tx


@pytest.mark.parametrize("shared", [False, True])
def test_ppo_metrics_do_not_depend_on_micro_batches(shared):
    """As GRPO's: `loss/policy`, `value_loss` and `loss/ptx` came out divided by micro_batches, and the
    token means (clip fractions, `approx_kl`, `kl`, `entropy`, `value_clipfrac`) as unweighted means of
    the micro-batches' means. Both critics now log the one-micro-batch values."""
    model, params = _model()
    vmodel, _ = _model("scalar")
    batch = _batch(noisy_old=0.2)
    batch["ptx_tokens"] = batch["completion_tokens"]
    batch["ptx_mask"] = batch["completion_mask"]
    config = PPOConfig(num_epochs=2, old_logprobs="sampler", kl_coef=0.1, entropy_coef=0.01, ptx_coef=0.5,
                       value_clip=0.01, clip_eps=0.02)
    metrics = {}
    for micro in (1, 4):
        policy, value, tx = _ppo_states(params, shared=shared)
        step = make_ppo_step(model, tx, config=config.replace(micro_batches=micro),
                             value_model=None if shared else vmodel, value_optimizer=None if shared else tx)
        metrics[micro] = jax.jit(step)(RLState(policy, params, value, config.kl_controller().init()), batch)[1]
    assert float(metrics[1]["value_loss"]) > 0 and float(metrics[1]["loss/ptx"]) > 0
    assert 0 < float(metrics[1]["value_clipfrac"]) < 1 and float(metrics[1]["clip_ratio/region_mean"]) > 0
    assert sorted(metrics[1]) == sorted(metrics[4])
    for key in metrics[1]:
        np.testing.assert_allclose(metrics[4][key], metrics[1][key], rtol=2e-5, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("shared", [False, True])
def test_ppo_loss_and_update_equal_the_core(shared):
    model, params = _model()
    vmodel, _ = _model("scalar")
    batch = _batch(noisy_old=0.2)
    batch["ptx_tokens"] = batch["completion_tokens"]
    batch["ptx_mask"] = batch["completion_mask"]
    config = PPOConfig(num_epochs=1, num_minibatches=1, old_logprobs="sampler", kl_coef=0.1, kl_target=2.0,
                       entropy_coef=0.01, ptx_coef=0.5, vf_coef=0.3, value_clip=0.05, lam=0.9, gamma=0.99,
                       whiten_rewards=not shared)
    policy, value, tx = _ppo_states(params, shared=shared)
    kl_state = config.kl_controller().init()
    step = make_ppo_step(model, tx, config=config, value_model=None if shared else vmodel,
                         value_optimizer=None if shared else tx)
    new, metrics = jax.jit(step)(RLState(policy, params, value, kl_state), batch)

    mask = batch["completion_mask"]
    old, ref = batch["sampler_logps"], batch["ref_logps"]

    joined = np.asarray(join_sequences(batch["prompt_tokens"], batch["prompt_lengths"], batch["completion_tokens"]))
    idx = batch["prompt_lengths"][:, None] - 1 + np.arange(C)[None]

    def values_of(vp, lm_hidden_params=None):
        if shared:
            v = jnp.einsum("bte,e->bt", model.forward(lm_hidden_params, joined).hidden, vp)
        else:
            v = vmodel.forward(vp, joined).values
        return jnp.take_along_axis(v, idx, 1)

    v_old = values_of(policy.params["value_head"], params) if shared else values_of(value.params)
    v_old = jnp.where(mask, v_old, 0.0)
    kl_tok = jnp.where(mask, old - ref, 0.0)
    rewards = adv_core.per_token_rewards(batch["scores"], mask, kl=kl_tok, kl_coef=0.1)
    if not shared:  # TRL's whiten_rewards: unit variance over the batch's tokens, the mean kept
        r = np.asarray(rewards, np.float64)[np.asarray(mask, bool)]
        rewards = jnp.where(mask, (rewards - r.mean()) / np.sqrt(r.var() + 1e-8) + r.mean(), 0.0)
    a, ret = adv_core.gae(rewards, v_old, mask, gamma=0.99, lam=0.9)
    a = adv_core.whiten(a, mask)

    def value_part(v):
        return 0.3 * losses.aggregate(losses.value_loss(v, v_old, ret, mask, clip_range=0.05), mask)

    def policy_loss(p):
        lm = p["lm"] if shared else p
        logps, ent = _logps_entropy_traced(model, lm, batch)
        per_token, m = losses.ppo_policy_loss(logps, old, a, mask, clip_eps=0.2)
        per_token = per_token - 0.01 * jnp.where(mask, ent, 0.0)
        loss = losses.aggregate(per_token, mask)
        toks = batch["ptx_tokens"]
        ptx_logps = token_logprobs(model.forward(lm, toks).logits[:, :-1], toks[:, 1:])
        loss = loss + 0.5 * -losses.aggregate(ptx_logps, batch["ptx_mask"][:, 1:])
        if shared:
            loss = loss + value_part(values_of(p["value_head"], lm))
        return loss, m

    (loss, m), grads = jax.jit(jax.value_and_grad(policy_loss, has_aux=True))(policy.params)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["clip_ratio/region_mean"], m["clip_ratio/region_mean"], rtol=1e-6)
    expected = jax.tree.map(lambda p, g: p - LR * g, policy.params, grads)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), new.policy.params, expected)
    if not shared:
        vl, vgrads = jax.jit(jax.value_and_grad(lambda vp: value_part(values_of(vp))))(value.params)
        np.testing.assert_allclose(metrics["value_loss"] * 0.3, vl, rtol=1e-5, atol=1e-7)
        expected_v = jax.tree.map(lambda p, g: p - LR * g, value.params, vgrads)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), new.value.params,
                     expected_v)
    # The adaptive controller saw the rollout's summed k1 over N sequences.
    seq_kl = jnp.mean(jnp.sum(kl_tok, axis=1))
    expected_kl = config.kl_controller().update(kl_state, seq_kl, N)
    np.testing.assert_allclose(new.kl.kl_coef, expected_kl.kl_coef, rtol=1e-6)
    ev = 1 - np.var(np.asarray(ret - v_old)[mask]) / np.var(np.asarray(ret)[mask])
    np.testing.assert_allclose(metrics["explained_variance"], ev, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("estimator", [None, "k3"])
def test_ppo_reward_kl_takes_the_configured_estimator_and_the_controller_the_k1(estimator):
    """`kl_estimator` shapes PPO's per-token reward (k1 when unset, as TRL's PPO); the adaptive
    controller and `kl/rollout_sequence` read the summed k1 whatever the estimator."""
    model, params = _model()
    batch = _batch(noisy_old=0.3)
    config = PPOConfig(num_epochs=1, num_minibatches=1, old_logprobs="sampler", kl_coef=0.5, kl_target=2.0,
                       kl_estimator=estimator)
    assert config.kl_estimator_used == (estimator or "k1")
    assert PPOConfig(kl_mode="loss").kl_estimator_used == "k3"
    policy, value, tx = _ppo_states(params, shared=True)
    kl_state = config.kl_controller().init()
    step = make_ppo_step(model, tx, config=config)
    new, metrics = jax.jit(step)(RLState(policy, params, value, kl_state), batch)

    mask = np.asarray(batch["completion_mask"], bool)
    d = np.float64(batch["sampler_logps"]) - np.float64(batch["ref_logps"])
    k = _np_kl(batch["sampler_logps"], np.float64(batch["ref_logps"]), config.kl_estimator_used)
    rewards = np.where(mask, -0.5 * k, 0.0)
    rewards[np.arange(N), mask.sum(1) - 1] += np.asarray(batch["scores"])
    np.testing.assert_allclose(metrics["rewards/token_mean"], rewards[mask].mean(), rtol=1e-5)
    seq_k1 = np.where(mask, d, 0.0).sum(1).mean()
    np.testing.assert_allclose(metrics["kl/rollout_sequence"], seq_k1, rtol=1e-5)
    expected = config.kl_controller().update(kl_state, jnp.float32(seq_k1), N)
    np.testing.assert_allclose(new.kl.kl_coef, expected.kl_coef, rtol=1e-6)


def test_ppo_state_mismatch_is_named():
    model, params = _model()
    policy, value, tx = _ppo_states(params, shared=False)
    step = make_ppo_step(model, tx, config=PPOConfig())
    with pytest.raises(ValueError, match="state.value must be None exactly when"):
        step(RLState(policy, params, value, PPOConfig().kl_controller().init()), _batch())
    with pytest.raises(ValueError, match="state.kl is None"):
        step(RLState(policy, params, None, None), _batch())
    with pytest.raises(ValueError, match="needs a value_optimizer"):
        make_ppo_step(model, tx, config=PPOConfig(), value_model=_model("scalar")[0])
    # A language model as the critic, LM parameters in the critic's state, and a shared-head policy state
    # without its value head were a KeyError 'score' / a rank error in scalar_head / a KeyError 'lm'.
    with pytest.raises(ValueError, match=r"value_model must be a scalar-head model .* got head='lm'"):
        make_ppo_step(model, tx, config=PPOConfig(), value_model=model, value_optimizer=tx)
    kl = PPOConfig().kl_controller().init()
    separate = make_ppo_step(model, tx, config=PPOConfig(), value_model=_model("scalar")[0], value_optimizer=tx)
    with pytest.raises(ValueError, match=r"state.value.params has no scalar 'score' head"):
        separate(RLState(policy, params, init_train_state(lambda k: params, tx, 1), kl), _batch())
    with pytest.raises(ValueError, match=r"state.policy.params must be \{'lm': .* got \['embed', 'final_norm', "):
        step(RLState(policy, params, None, kl), _batch())


# ------------------------------------------------------------------ input validation (audit)


def test_rollout_functions_check_prompt_lengths_and_shared_groups():
    model, params = _model()
    pt = jnp.array([[5, 6, 7, 0], [5, 6, 7, 0]])
    comp = jnp.array([[9, 10, 11], [9, 10, 11]])
    for bad in (0, -2, 9):
        with pytest.raises(ValueError, match=rf"prompt_lengths\[0\] = {bad} is outside \[1, P=4\]"):
            completion_logprobs(model, params, pt, jnp.array([bad, 3]), comp)
        with pytest.raises(ValueError, match=rf"prompt_lengths\[0\] = {bad}"):
            completion_logprobs(model, params, pt, jnp.array([bad, bad]), comp, group_size=2)
    with pytest.raises(ValueError, match=r"prompt_lengths\[1\] = 0"):
        join_sequences(pt, jnp.array([3, 0]), comp)
    with pytest.raises(TypeError, match="prompt_lengths must be an integer array"):
        completion_logprobs(model, params, pt, jnp.array([3.0, 3.0]), comp)
    differ = jnp.array([[5, 6, 7, 0], [1, 2, 3, 0]])
    with pytest.raises(ValueError, match="row 1 of group 0 differs"):
        completion_logprobs(model, params, differ, jnp.array([3, 3]), comp, group_size=2)
    # padding after the real prompt may differ within a group
    same = jnp.array([[5, 6, 7, 0], [5, 6, 7, 4]])
    completion_logprobs(model, params, same, jnp.array([3, 3]), comp, group_size=2)


@pytest.mark.parametrize("shared", [True, False])
def test_ppo_step_host_check_refuses_bad_rollouts(shared):
    model, _ = _model()
    kwargs = {} if shared else {"value_model": _model("scalar")[0], "value_optimizer": optax.sgd(LR)}
    step = make_ppo_step(model, optax.sgd(LR), config=PPOConfig(), **kwargs)
    batch = dict(_batch())
    step.host_check(batch, "ppo_step")  # the well-formed rollout passes
    with pytest.raises(ValueError, match=rf"ppo_step: prompt_lengths\[0\] = {P + 1}"):
        step.host_check({**batch, "prompt_lengths": np.full(N, P + 1, np.int32)}, "ppo_step")
    for key in ("prompt_tokens", "completion_tokens"):
        tokens = np.array(batch[key])
        tokens[1, 2] = -1
        with pytest.raises(ValueError, match=rf"batch\['{key}'\] holds token id -1 at position \(1, 2\)"):
            step.host_check({**batch, key: tokens}, "ppo_step")


def test_grpo_step_host_check_refuses_bad_rollouts():
    model, _ = _model()
    step = make_grpo_step(model, optax.sgd(LR), config=grpo_config("grpo", group_size=G))
    batch = {k: v for k, v in _batch().items() if k != "ref_logps"}
    step.host_check(batch, "grpo_step")  # the well-formed rollout passes
    for bad in (0, P + 1):
        with pytest.raises(ValueError, match=rf"grpo_step: prompt_lengths\[0\] = {bad}"):
            step.host_check({**batch, "prompt_lengths": np.full(N, bad, np.int32)}, "grpo_step")
    with pytest.raises(TypeError, match="prompt_lengths must be an integer array"):
        step.host_check({**batch, "prompt_lengths": batch["prompt_lengths"].astype(np.float32)}, "grpo_step")
    tokens = batch["completion_tokens"].copy()
    tokens[2, 1] = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"batch\['completion_tokens'\] holds token id {tokens[2, 1]} at position \(2, 1\)"):
        step.host_check({**batch, "completion_tokens": tokens}, "grpo_step")
    prompts = batch["prompt_tokens"].copy()
    prompts[1, 0] += 1
    with pytest.raises(ValueError, match="row 1 of group 0 differs"):
        step.host_check({**batch, "prompt_tokens": prompts}, "grpo_step")


# ------------------------------------------------------------ knobs against a NumPy oracle


def _np_kl(a, b, estimator):
    k1 = np.float64(a) - b
    return {"k1": k1, "k2": 0.5 * k1 ** 2, "k3": np.exp(-k1) + k1 - 1}[estimator]


def _np_advantages(c, a):
    """The family's advantages from the papers' formulas (float64 NumPy, no rlhf_jax code)."""
    m, s = a["mask"].astype(np.float64), a["scores"].astype(np.float64)
    in_reward = c.kl_mode == "reward" and c.kl_coef > 0
    k = _np_kl(a["old"], a["ref"], c.kl_estimator_used) * m if in_reward else np.zeros_like(m)
    if c.advantage in ("reinforce_pp", "reinforce_pp_baseline"):
        if c.advantage == "reinforce_pp_baseline":
            s = (s.reshape(-1, G) - s.reshape(-1, G).mean(1, keepdims=True)).reshape(-1)
        r = -c.kl_coef * k
        r[np.arange(N), a["mask"].sum(1) - 1] += s          # score at the last completion token
        ret = np.cumsum(r[:, ::-1], 1)[:, ::-1] * m         # reward-to-go (gamma 1)
        mu = ret[a["mask"]].mean()
        return (ret - mu) / np.sqrt(ret[a["mask"]].var() + 1e-8) * m
    if c.advantage == "remax":  # minus the prompt's greedy score (Li et al. 2023)
        return s - c.kl_coef * k.sum(1) - a["baseline"]
    g = (s - c.kl_coef * k.sum(1)).reshape(-1, G)
    centered = g - g.mean(1, keepdims=True)
    out = {"grpo": lambda: centered / (g.std(1, ddof=1, keepdims=True) + c.adv_eps),
           "dr_grpo": lambda: centered,
           "batch_std": lambda: centered / (g.std(ddof=1) + c.adv_eps),
           "rloo": lambda: g - (g.sum(1, keepdims=True) - g) / (G - 1)}[c.advantage]()
    return out.reshape(-1)


def _np_loss(c, a, adv):
    """The family's scalar loss from the papers' formulas (float64 NumPy)."""
    m, lp, old = a["mask"].astype(np.float64), np.float64(a["logps"]), np.float64(a["old"])
    adv = adv if adv.ndim == 2 else np.repeat(adv[:, None], C, 1)
    log_ratio = lp - old
    if c.policy_loss == "gspo":  # one length-normalised ratio per sequence
        log_ratio = np.repeat(((log_ratio * m).sum(1) / m.sum(1))[:, None], C, 1)
    rho = np.exp(log_ratio)
    high = 1 + (c.clip_eps if c.clip_eps_high is None else c.clip_eps_high)
    if c.policy_loss == "cispo":
        per_token = -np.minimum(rho, high) * adv * lp
    else:
        per_token = np.maximum(-adv * rho, -adv * np.clip(rho, 1 - c.clip_eps, high))
        if c.dual_clip is not None:
            per_token = np.where(adv < 0, np.minimum(per_token, -adv * c.dual_clip), per_token)
    if c.tis_cap is not None:
        per_token = per_token * np.minimum(np.exp(old - a["sampler"]), c.tis_cap)
    if c.kl_mode == "loss" and c.kl_coef > 0:
        per_token = per_token + c.kl_coef * _np_kl(lp, a["ref"], c.kl_estimator_used)
    per_token = (per_token - c.entropy_coef * a["entropy"]) * m
    return {"token_mean": lambda: per_token.sum() / m.sum(),
            "seq_mean_token_mean": lambda: np.mean(per_token.sum(1) / m.sum(1)),
            "seq_mean_token_sum": lambda: np.mean(per_token.sum(1)),
            "seq_mean_token_sum_norm": lambda: np.mean(per_token.sum(1) / (c.max_completion_length or C)),
            }[c.loss_aggregation]()


_KNOBS = (dict(), dict(entropy_coef=0.1), dict(clip_eps=0.05, clip_eps_high=0.3), dict(dual_clip=1.5),
          dict(kl_mode="loss", kl_coef=0.1, kl_estimator="k1"), dict(kl_mode="reward", kl_coef=0.2, kl_estimator="k2"),
          dict(kl_mode="reward", kl_coef=0.1, kl_estimator="k3"), dict(loss_aggregation="token_mean"),
          dict(loss_aggregation="seq_mean_token_sum"), dict(loss_aggregation="seq_mean_token_sum_norm"),
          dict(loss_aggregation="seq_mean_token_sum_norm", max_completion_length=10), dict(tis_cap=1.5),
          dict(adv_eps=0.5), dict(advantage="batch_std"))


@pytest.mark.parametrize("preset", sorted(GRPO_PRESETS))
def test_every_grpo_knob_changes_the_loss_as_its_formula_says(preset):
    """Advantages and loss of each preset with each knob turned, against float64 NumPy written from
    the papers' formulas (an oracle that shares no code with `rlhf_jax`)."""
    a = _random_rollout_arrays(3)
    a["sampler"] = (a["old"] + 0.3 * np.random.default_rng(4).normal(size=(N, C))).astype(np.float32)
    seen = set()
    for knob in _KNOBS:
        if preset == "cispo" and "dual_clip" in knob:
            continue  # refused (test_knobs_that_would_be_ignored_are_config_errors)
        config = grpo_config(preset, group_size=G, **knob)
        advantages = grpo_advantages(a["scores"], a["mask"], config=config, old_logps=a["old"], ref_logps=a["ref"],
                                     baseline_scores=a["baseline"] if config.greedy_baseline else None)
        np.testing.assert_allclose(advantages, _np_advantages(config, a), rtol=1e-5, atol=1e-5, err_msg=str(knob))
        loss, _ = grpo_objective(a["logps"], a["old"], advantages, a["mask"], config=config, ref_logps=a["ref"],
                                 entropy=a["entropy"], sampler_logps=a["sampler"])
        np.testing.assert_allclose(loss, _np_loss(config, a, _np_advantages(config, a)), rtol=1e-5, atol=1e-6,
                                   err_msg=str(knob))
        seen.add(round(float(loss), 6))
    assert len(seen) > len(_KNOBS) // 2  # the knobs move the loss


def test_knobs_that_would_be_ignored_are_config_errors():
    with pytest.raises(ConfigError, match=r"^algorithm.dual_clip bounds the PPO clip's loss .* policy_loss 'cispo'"):
        grpo_config("cispo", dual_clip=3.0)
    with pytest.raises(ConfigError, match=r"^algorithm.max_completion_length is Dr.GRPO's normaliser .* "
                                          r"loss_aggregation 'token_mean' does not use it"):
        grpo_config("dapo", max_completion_length=16)
    grpo_config("dr_grpo", max_completion_length=16)
    grpo_config("gspo", dual_clip=3.0)
    with pytest.raises(ConfigError, match=r"^algorithm.kl_target is 0.1, which adapts a KL penalty, but "
                                          r"kl_mode='none' has none"):
        PPOConfig(kl_mode="none", kl_target=0.1)


def test_grpo_knobs_without_their_inputs_are_errors_not_dropped_terms():
    """A KL coefficient under kl_mode 'none', and an in-loss KL or entropy bonus without its input, were
    silently no term at all (grpo_config("dapo", kl_coef=0.1) trained without a KL)."""
    with pytest.raises(ConfigError, match=r"^algorithm.kl_coef is 0.1, but kl_mode='none' applies no KL penalty"):
        grpo_config("dapo", kl_coef=0.1)
    with pytest.raises(ConfigError, match=r"^algorithm.kl_coef is 0.04, but kl_mode='none'"):
        grpo_config("grpo", kl_mode="none")
    grpo_config("grpo", kl_mode="none", kl_coef=0.0)
    a = _random_rollout_arrays()
    adv = np.ones(N, np.float32)
    with pytest.raises(ValueError, match=r"kl_mode='loss' with kl_coef=0.04 needs ref_logps .*; got None"):
        grpo_objective(a["logps"], a["old"], adv, a["mask"], config=grpo_config("grpo", group_size=G))
    with pytest.raises(ValueError, match=r"entropy_coef=0.1 needs the per-token entropy; got None"):
        grpo_objective(a["logps"], a["old"], adv, a["mask"], config=grpo_config("dapo", group_size=G, entropy_coef=0.1))
    loss, _ = grpo_objective(a["logps"], a["logps"], adv, a["mask"], config=grpo_config("dapo", group_size=G))
    np.testing.assert_allclose(loss, -1.0, rtol=1e-6)  # no KL, no entropy: ratio 1 times advantage 1, token mean


def test_ppo_adaptive_kl_controller_moves_with_one_update_and_the_kl_in_the_loss():
    """One update (old log-probs = the training forward's) and a separate critic: the controller still
    reads the rollout's summed k1 (it stayed at its initial beta before)."""
    model, params = _model()
    vmodel, _ = _model("scalar")
    batch = _batch()
    config = PPOConfig(num_epochs=1, kl_mode="loss", kl_coef=0.1, kl_target=0.01, kl_horizon=100.0)
    policy, value, tx = _ppo_states(params, shared=False)
    kl_state = config.kl_controller().init()
    step = make_ppo_step(model, tx, config=config, value_model=vmodel, value_optimizer=tx)
    new, metrics = jax.jit(step)(RLState(policy, params, value, kl_state), batch)
    logps, _ = _reference_logps(model, params, batch)
    seq_kl = np.mean(np.sum(np.where(batch["completion_mask"], logps - batch["ref_logps"], 0.0), axis=1))
    np.testing.assert_allclose(metrics["kl/rollout_sequence"], seq_kl, rtol=1e-4, atol=1e-5)
    expected = config.kl_controller().update(kl_state, seq_kl, N)
    np.testing.assert_allclose(new.kl.kl_coef, expected.kl_coef, rtol=1e-5)
    assert abs(float(new.kl.kl_coef) - 0.1) > 1e-4


def test_ppo_nan_kl_of_a_skipped_batch_keeps_the_adaptive_kl_coef():
    """A NaN reference log-prob makes the step skip its updates; the adaptive beta must not turn NaN
    (it did: every later reward was NaN and every later update skipped, silently)."""
    model, params = _model()
    vmodel, _ = _model("scalar")
    config = PPOConfig(num_epochs=1, kl_coef=0.1, kl_target=1.0, kl_horizon=100.0)
    policy, value, tx = _ppo_states(params, shared=False)
    step = jax.jit(make_ppo_step(model, tx, config=config, value_model=vmodel, value_optimizer=tx))
    bad = _batch()
    bad["ref_logps"] = bad["ref_logps"].copy()
    bad["ref_logps"][0, 0] = np.nan
    state, metrics = step(RLState(policy, params, value, config.kl_controller().init()), bad)
    assert float(metrics["nonfinite"]) == 2.0  # policy and critic updates skipped
    assert float(state.kl.kl_coef) == np.float32(0.1)
    good = _batch(1)
    state, metrics = step(state, good)
    assert float(metrics["nonfinite"]) == 0.0
    seq_kl = float(metrics["kl/rollout_sequence"])
    np.testing.assert_allclose(state.kl.kl_coef, 0.1 * (1 + np.clip(seq_kl / 1.0 - 1, -0.2, 0.2) * N / 100.0),
                               rtol=1e-6)
    ctl = adv_core.adaptive_kl_controller(init_kl_coef=0.2, target=6.0, horizon=100.0)
    for kl, beta in ((np.nan, 0.2), (np.inf, 0.2 * 1.02), (-np.inf, 0.2 * 0.98)):  # traced NaN: beta kept
        np.testing.assert_allclose(jax.jit(ctl.update)(ctl.init(), jnp.float32(kl), 10).kl_coef, beta, rtol=1e-6)
    with pytest.raises(ValueError, match="observed_kl must be finite"):
        ctl.update(ctl.init(), float("nan"), 10)


def _ppo_run_config(**algorithm):
    from rlhf_jax.sharding import MeshConfig  # noqa: PLC0415
    from rlhf_jax.train import rl  # noqa: PLC0415
    from rlhf_jax.train.run_config import DataConfig  # noqa: PLC0415

    return rl.PPORunConfig(name="ppo", model=_model()[0].config, value=rl.ValueConfig(init="policy"),
                           mesh=MeshConfig(data=-1, strategy="dp"),
                           data=DataConfig(train="synthetic:vowel", batch_size=8), algorithm=PPOConfig(**algorithm))


def test_ppo_kl_horizon_below_the_batch_is_a_config_error():
    from rlhf_jax.train.rl_algorithms import PPO  # noqa: PLC0415

    with pytest.raises(ConfigError, match=r"^algorithm.kl_horizon 4.0 is smaller than data.batch_size 8"):
        PPO(_ppo_run_config(kl_target=1.0, kl_horizon=4.0), mesh=None)  # refused before the mesh is used


def test_ppo_resume_keeps_an_adaptive_kl_coef_and_takes_a_fixed_one_from_the_config():
    """A checkpoint's beta (0.7) resumes an adaptive controller; a fixed one is the config's (it was
    the checkpoint's, silently, after a resume with a new algorithm.kl_coef)."""
    from rlhf_jax.train.rl_algorithms import PPO  # noqa: PLC0415

    config = _ppo_run_config(kl_coef=0.1, kl_target=1.0)
    mesh = config.mesh.make_mesh()
    saved = PPO(config, mesh)
    state = saved.fresh()
    items = saved.save_items(state._replace(kl=state.kl._replace(kl_coef=jnp.float32(0.7))))
    assert float(PPO(config, mesh).from_items(items).kl.kl_coef) == np.float32(0.7)
    fixed = PPO(dataclasses.replace(config, algorithm=PPOConfig(kl_coef=0.3)), mesh).from_items(items)
    assert float(fixed.kl.kl_coef) == np.float32(0.3)


def _np_gae(rewards, values, mask, gamma, lam):
    """GAE in float64 NumPy, right-padded rows: terminal after the last valid token (TRL, verl)."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n, last = int(mask[b].sum()), 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            last = rewards[b, t] + gamma * next_v - values[b, t] + gamma * lam * last
            adv[b, t] = last
    return adv, np.where(mask, adv + values, 0.0)


def test_ppo_epochs_and_minibatches_equal_a_plain_loop():
    """2 epochs x 2 minibatches of a separate critic and policy against a loop written from TRL's
    `PPOTrainer.train`: rewards, GAE (NumPy, float64) and whitening once over the rollout, then per
    shuffled minibatch a token-mean clipped policy loss and `vf_coef * 1/2 max(...)` value loss over
    that minibatch's tokens, each an SGD step; the old log-probs and values stay the rollout's."""
    from rlhf_jax.steps.common import step_key  # noqa: PLC0415

    model, params = _model()
    vmodel, vparams = _model("scalar")
    batch = _batch(2, noisy_old=0.05)
    gamma, lam, beta, eps, vclip, vf = 0.95, 0.9, 0.2, 0.1, 0.05, 0.5
    config = PPOConfig(num_epochs=2, num_minibatches=2, kl_coef=beta, clip_eps=eps, value_clip=vclip, vf_coef=vf,
                       gamma=gamma, lam=lam)
    tx = optax.sgd(LR)
    policy, value = init_train_state(lambda k: params, tx, 0), init_train_state(lambda k: vparams, tx, 1)
    step = make_ppo_step(model, tx, config=config, value_model=vmodel, value_optimizer=tx)
    new, metrics = jax.jit(step)(RLState(policy, params, value, config.kl_controller().init()), batch)
    assert int(new.policy.step) == int(new.value.step) == 4

    mask = np.asarray(batch["completion_mask"])
    joined = np.asarray(join_sequences(batch["prompt_tokens"], batch["prompt_lengths"], batch["completion_tokens"]))
    idx = batch["prompt_lengths"][:, None] - 1 + np.arange(C)[None]
    values_of = jax.jit(lambda vp: jnp.take_along_axis(vmodel.forward(vp, joined).values, idx, 1))
    old = np.float64(_reference_logps(model, params, batch)[0])  # recomputed: more than one update
    v_old = np.where(mask, np.float64(values_of(vparams)), 0.0)
    rewards = np.where(mask, -beta * (old - batch["ref_logps"]), 0.0)
    rewards[np.arange(N), mask.sum(1) - 1] += batch["scores"]
    adv, ret = _np_gae(rewards, v_old, mask, gamma, lam)
    mu = adv[mask].mean()
    adv = np.where(mask, (adv - mu) / np.sqrt(((adv[mask] - mu) ** 2).mean() + 1e-8), 0.0)

    def policy_loss(p, rows):
        logps = _logps_entropy_traced(model, p, batch)[0][rows]
        m, a = mask[rows], adv[rows]
        ratio = jnp.exp(logps - old[rows])
        per_token = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - eps, 1 + eps) * a)
        return jnp.sum(jnp.where(m, per_token, 0.0)) / m.sum()

    def value_loss(vp, rows):
        v, vo, r, m = values_of(vp)[rows], v_old[rows], ret[rows], mask[rows]
        worst = jnp.maximum((v - r) ** 2, (vo + jnp.clip(v - vo, -vclip, vclip) - r) ** 2)
        return vf * 0.5 * jnp.sum(jnp.where(m, worst, 0.0)) / m.sum()

    p, vp = params, vparams
    for key in jax.random.split(step_key(policy), 2):  # each epoch's shuffle, as `run_updates` draws it
        perm = np.asarray(jax.random.permutation(key, N))
        for rows in (perm[: N // 2], perm[N // 2:]):
            p = jax.tree.map(lambda x, g: x - LR * g, p, jax.grad(policy_loss)(p, rows))
            vp = jax.tree.map(lambda x, g: x - LR * g, vp, jax.grad(value_loss)(vp, rows))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6), new.policy.params, p)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6), new.value.params, vp)
    np.testing.assert_allclose(metrics["returns/mean"], ret[mask].mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["values/mean"], v_old[mask].mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["kl/rollout_sequence"], np.where(mask, old - batch["ref_logps"], 0).sum(1).mean(),
                               rtol=1e-4, atol=1e-5)
