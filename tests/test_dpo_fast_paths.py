"""The DPO step's fast paths against the plain ones (issue 23): the LM head on target positions only
(`target_token_logprobs`, hand-written gradient) and chosen/rejected sharing their prompt's forward
pass (`make_dpo_step(shared_prefix_len=...)`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from step_fixtures import host_params, max_rel_diff, pair_batches, tiny_lm
from rlhf_jax.logprobs import target_token_logprobs, token_logprobs
from rlhf_jax.steps import make_dpo_step
from rlhf_jax.steps.preference import _shared_prefix_logps, _side_logps
from rlhf_jax.steps.sequences import causal_targets, forward_token_logps, interleave

BATCHES = pair_batches(2)


def _case():
    k = jax.random.split(jax.random.key(0), 3)
    b, t, e, v = 3, 11, 8, 17
    hidden = jax.random.normal(k[0], (b, t, e))
    w = jax.random.normal(k[1], (e, v))
    labels = jax.random.randint(k[2], (b, t), 0, v)
    # Targets from 2, 5 and nowhere (a fully masked row), with a hole at [1, 7].
    mask = (jnp.arange(t)[None] >= jnp.array([[2], [5], [t]])).astype(jnp.float32).at[1, 7].set(0)
    return hidden, w, labels, mask


@pytest.mark.parametrize("chunk", [3, 64])
def test_target_head_equals_full_head_values_and_gradients(chunk):
    hidden, w, labels, mask = _case()
    weights = jnp.arange(1.0, 12.0)  # a non-uniform cotangent

    def full(h, w):
        return jnp.where(mask > 0, token_logprobs(h @ w, labels, temperature=0.7), 0.0)

    def target(h, w):
        return target_token_logprobs(h, w, labels, mask, temperature=0.7, chunk_size=chunk)

    np.testing.assert_allclose(target(hidden, w), full(hidden, w), rtol=0, atol=1e-6)
    assert float(jnp.abs(target(hidden, w)[2]).max()) == 0.0   # no target: exactly 0
    want = jax.grad(lambda h, w: jnp.sum(full(h, w) * weights), argnums=(0, 1))(hidden, w)
    got = jax.grad(lambda h, w: jnp.sum(target(h, w) * weights), argnums=(0, 1))(hidden, w)
    for g, x in zip(got, want):
        np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-5 * float(jnp.abs(x).max()))


def test_target_head_rejects_bad_shapes():
    hidden, w, labels, mask = _case()
    with pytest.raises(ValueError, match="target_token_logprobs: labels"):
        target_token_logprobs(hidden, w, labels[:, 1:], mask)


def _pair_rows():
    b = BATCHES[0]
    tokens = interleave(jnp.asarray(b["chosen_tokens"]), jnp.asarray(b["rejected_tokens"]))
    mask = interleave(jnp.asarray(b["chosen_loss_mask"]), jnp.asarray(b["rejected_loss_mask"]))
    return tokens, mask


def test_dpo_target_head_and_shared_prefix_equal_full_logits_per_token():
    lm, params = tiny_lm(), host_params()
    tokens, mask = _pair_rows()
    targets = causal_targets(tokens, mask)

    def full(p):   # the full-logits path the step used before
        logps, _ = forward_token_logps(lm, p, tokens, targets.labels)
        return jnp.where(targets.mask > 0, logps, 0.0)

    def target(p):
        return _side_logps(lm, p, tokens, mask, None, None, max_segments=1, chunk_size=None)[1]

    def shared(p):
        return _shared_prefix_logps(lm, p, tokens, mask, 5)[1]

    def values_and_grads(fn):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(fn(p) * jnp.arange(1.0, 16.0)), has_aux=False))(params), \
            jax.jit(fn)(params)

    (_, g_want), want = values_and_grads(full)
    for fn, atol in ((target, 1e-6), (shared, 1e-5)):   # shared: the suffix attends through the KV cache
        (_, g), got = values_and_grads(fn)
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
        assert max_rel_diff(g, g_want) <= 1e-5


def test_shared_prefix_contract_broken_is_a_skipped_step():
    lm, params = tiny_lm(), host_params()
    tokens, mask = _pair_rows()
    # A target inside the declared prefix, or a pair whose sides differ there: NaN, not a wrong loss.
    sums = jax.jit(lambda t, n: _shared_prefix_logps(lm, params, t, mask, n)[0].sum, static_argnums=1)
    assert np.isfinite(np.asarray(sums(tokens, 5))).all()
    assert np.isnan(np.asarray(sums(tokens, 6))).all()
    assert np.isnan(np.asarray(sums(tokens.at[1, 2].set(tokens[1, 2] + 1), 5))).all()
    with pytest.raises(ValueError, match="shared_prefix_len must be an int >= 2"):
        make_dpo_step(lm, optax.sgd(1e-3), shared_prefix_len=1)
    with pytest.raises(ValueError, match=f"rows of {tokens.shape[1]} tokens leave nothing after the shared prefix"):
        sums(tokens, tokens.shape[1])




def test_dpo_config_shared_prefix_len_is_checked():
    from rlhf_jax.config import ConfigError
    from rlhf_jax.steps import KTO
    from rlhf_jax.train.dpo import DPOConfig

    assert DPOConfig(name="d", shared_prefix_len=40).shared_prefix_len == 40
    with pytest.raises(ConfigError, match=r"shared_prefix_len \(48\) must be smaller than the rows' 48 tokens"):
        DPOConfig(name="d", shared_prefix_len=48)   # data.max_len 48: no target could follow it
    with pytest.raises(ConfigError, match="shared_prefix_len must be None or an int >= 2 with a paired objective"):
        DPOConfig(name="d", shared_prefix_len=1)
    with pytest.raises(ConfigError, match="got 8 with KTO"):
        DPOConfig(name="d", algorithm=KTO(), shared_prefix_len=8)
