"""Length-dependent RoPE (LongRoPE, dynamic NTK) in rollouts: padding never switches a row's frequencies, and
an online run whose prompt + completion could pass the threshold is refused.

`rope_angles` takes a row's length from its largest position. The sampler's prefill ran its prompt bucket's
padding at positions up to the bucket's width, and the trainer's log-prob pass its `P + C - 1` columns at
theirs, so a row shorter than the threshold in a wider batch got the long factors (transformers runs such a row
alone with the short ones). Past the threshold the sampler's cached keys keep the factors of the call that wrote
them while the trainer rotates the whole sequence with one set: such runs are refused.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.models import CausalLM, RopeScaling
from rlhf_jax.models.layers import rope_angles
from rlhf_jax.rollout import completion_logprobs, sequence_scores
from rlhf_jax.sampling import Greedy, Request, Sampler
from rlhf_jax.testing import tiny_config
from rlhf_jax.train.online_dpo import OnlineDPOConfig
from rlhf_jax.train.rl import GRPORunConfig, PPORunConfig
from rlhf_jax.train.rollouts import RolloutConfig
from rlhf_jax.train.run_config import DataConfig

THRESHOLD = 8  # original_max_position_embeddings: rows of 3-4 prompt + 4 completion tokens stay within it
SHORT = tuple(1.0 + 0.1 * i for i in range(8))  # head_dim 16: 8 frequencies
LONG = tuple(1.0 + 1.5 * i for i in range(8))


def _longrope(long=LONG, **kw):
    return tiny_config(max_position_embeddings=64, initializer_range=0.1, **kw, rope_scaling=RopeScaling(
        rope_type="longrope", factor=8.0, original_max_position_embeddings=THRESHOLD, short_factor=SHORT,
        long_factor=long))


@pytest.fixture(scope="module")
def longrope():
    """The longrope policy, the same weights with long_factor = short_factor (where no length can switch
    anything: the reference below the threshold), and a sampler with one 16-wide prompt bucket."""
    lm, same = CausalLM(_longrope()), CausalLM(_longrope(long=SHORT))
    return lm, same, lm.init(jax.random.key(0)), Sampler(lm, max_len=32, prompt_buckets=(16,))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logps(model, group, params, *rows):
    return completion_logprobs(model, params, *rows, group_size=group)[0]


def test_padding_keeps_a_short_row_on_the_short_longrope_factors(longrope):
    """Prompts of 3 and 4 tokens in a 16-wide bucket, 4 completion tokens: every row stays within 8 positions,
    so the sampler's log-probs and the trainer's (one pass per row, and shared prompts) equal the short-factor
    model's. The old positions counted the padding: the sampler and the shared-prompt pass were off by 0.064,
    the per-row pass by 0.155."""
    lm, same, params, sampler = longrope
    out = sampler.generate(params, [[5, 7, 9], [3, 4, 6, 8]], max_new_tokens=4, num_samples=2, rng=1)
    rows = (out.prompt_tokens, out.prompt_lengths, out.completion_tokens)
    assert np.asarray(out.prompt_tokens).shape == (4, 16) and bool(np.all(out.completion_mask))
    want = np.asarray(_logps(same, 1, params, *rows))
    assert np.abs(np.asarray(out.logprobs) - want).max() <= 1e-5
    for group in (1, 2):
        assert np.abs(np.asarray(_logps(lm, group, params, *rows)) - want).max() <= 1e-5, group
    # Discriminative: in a 16-position row the long factors rotate the first positions far off the short ones.
    positions = jnp.arange(16)[None]
    assert np.abs(np.asarray(rope_angles(positions, lm.config)[0] - rope_angles(positions, same.config)[0])).max() > 0.1


def test_continuous_batching_gives_a_bucketed_prompt_its_own_factors(longrope):
    """The continuous engine's admission prefilled a prompt in its 16-wide bucket at positions 0..15 as well
    (log-probs off by 0.065 here): its greedy completions' log-probs now equal the short-factor model's."""
    _, same, params, sampler = longrope
    prompts = [[5, 7, 9], [3, 4, 6, 8]]
    outs = sampler.generate_requests(params, [Request(prompt=p, max_new_tokens=4, method=Greedy()) for p in prompts],
                                     num_slots=2, block_size=4)
    tokens = np.stack([np.asarray(o.tokens[0]) for o in outs])
    padded = np.array([p + [0] * (4 - len(p)) for p in prompts], np.int32)
    want = _logps(same, 1, params, padded, np.array([3, 4], np.int32), tokens)
    got = np.stack([np.asarray(o.logprobs[0]) for o in outs])
    assert tokens.shape == (2, 4) and np.abs(got - np.asarray(want)).max() <= 1e-5


def test_reward_score_of_a_padded_row_is_its_score_alone():
    """A longrope reward model scores each prompt + completion at its last real token as it does the row
    without padding (transformers' single-sequence score): the joined batch is 20 wide, past the threshold, the
    rows 7 tokens long."""
    rm = CausalLM(_longrope(), head="scalar")
    params = rm.init(jax.random.key(1))
    prompts = np.array([[5, 7, 9] + [0] * 13, [3, 4, 6, 8] + [0] * 12], np.int32)
    lengths = np.array([3, 4], np.int32)
    completions = np.array([[11, 12, 13, 2], [21, 22, 23, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
    got = np.asarray(jax.jit(functools.partial(sequence_scores, rm))(params, prompts, lengths, completions, mask))
    for b, n in enumerate((4, 3)):
        row = np.concatenate([prompts[b, :lengths[b]], completions[b, :n]])[None]
        alone = float(jax.jit(rm.forward)(params, row).values[0, -1])
        assert abs(got[b] - alone) <= 1e-5, (b, got[b], alone)


ROPES = {
    "longrope": (_longrope(), "model.rope_scaling.original_max_position_embeddings = 8"),
    "dynamic": (tiny_config(max_position_embeddings=8, rope_scaling=RopeScaling(rope_type="dynamic", factor=2.0)),
                "model.max_position_embeddings = 8"),
}


@pytest.mark.parametrize("config_cls", [GRPORunConfig, PPORunConfig, OnlineDPOConfig])
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_online_runs_refuse_rollouts_past_a_length_dependent_rope_threshold(config_cls, rope):
    model, where = ROPES[rope]
    base = config_cls(name="r", model=model, data=DataConfig(max_len=16, max_prompt_len=5),
                      rollout=RolloutConfig(max_new_tokens=3))  # 5 + 3 = 8: within the threshold
    with pytest.raises(ConfigError) as e:
        dataclasses.replace(base, rollout=RolloutConfig(max_new_tokens=4))
    assert str(e.value).startswith(
        f"data.max_prompt_len (5) + rollout.max_new_tokens (4) = 9 tokens pass {where}, past which "
        f"model.rope_scaling (rope_type '{rope}') rotates keys with other frequencies: the sampler's cached keys "
        "keep the ones of the call that wrote them")
    with pytest.raises(ConfigError, match=r"^data.max_len \(16\) \+ rollout.max_new_tokens \(3\) = 19 tokens pass"):
        dataclasses.replace(base, data=DataConfig(max_len=16))  # no max_prompt_len: the prompt is max_len long
    # A RoPE whose frequencies do not depend on the length: any length is fine.
    dataclasses.replace(base, model=tiny_config(max_position_embeddings=8), rollout=RolloutConfig(max_new_tokens=4))
