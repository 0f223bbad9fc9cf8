"""`min_new_tokens`: no sample ends at a stop id before that many tokens (static sampler, continuous
batching per request, the rollout config), and the config messages that name the keys a user wrote.

The model is the tiny one with its EOS made almost certain: every embedding carries a large constant
in hidden dimension 0, so after the final RMSNorm that dimension is ~sqrt(hidden) whatever the
prompt, and the LM head reads it into the EOS logit only (p(EOS) ~ 0.998 at every step).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.models import CausalLM
from rlhf_jax.sampling import Categorical, Greedy, Request, Sampler, SamplingConfig, TopP, row_uniforms
from rlhf_jax.sampling.methods import TOP_P, row_fields, select_per_row, suppress_stop_ids
from rlhf_jax.testing import tiny_config
from rlhf_jax.train.rollouts import RolloutConfig

EOS = 7
PROMPTS = [[11, 40, 99, 3], [25, 130]]


@pytest.fixture(scope="module")
def lm():
    return CausalLM(tiny_config())


@pytest.fixture(scope="module")
def params(lm):
    p = lm.init(jax.random.key(0))
    embed = p["embed"].at[:, 0].add(100.0)
    head = p["lm_head"].at[0, :].set(0.0).at[0, EOS].set(1.5)
    return {**p, "embed": embed, "lm_head": head}


@pytest.fixture(scope="module")
def sampler(lm):
    return Sampler(lm, max_len=24, prompt_buckets=(8,), cache_phases=1)


@pytest.fixture(scope="module")
def sp(sampler, params):
    return sampler.load_params(params)


def _first_step_logits(lm, params, prompt):
    """The model's logits for the first completion token of `prompt` (a full forward, no cache)."""
    tokens = jnp.asarray([prompt], jnp.int32)
    positions = jnp.arange(len(prompt), dtype=jnp.int32)[None]
    return np.asarray(lm.forward(params, tokens, positions).logits[0, -1], np.float64)


def test_without_the_option_rows_stop_at_once_with_it_never_before_min(sampler, sp):
    cfg = SamplingConfig(max_new_tokens=10, method=Categorical(), num_samples=4, eos_id=EOS)
    free = sampler.generate(sp, PROMPTS, cfg, rng=3)
    assert np.mean(np.asarray(free.lengths) == 1) >= 0.75        # EOS first, nearly always
    held = sampler.generate(sp, PROMPTS, cfg, min_new_tokens=5, rng=3)
    tokens, lengths = np.asarray(held.completion_tokens), np.asarray(held.lengths)
    assert not np.any(tokens[:, :5] == EOS)
    # The first stop comes at token index 5 at the earliest (5 tokens, then EOS), and here at once.
    np.testing.assert_array_equal(lengths, 6)
    np.testing.assert_array_equal(tokens[:, 5], EOS)
    assert not np.any(np.asarray(held.truncated))
    assert len({tuple(r) for r in tokens[:, :5].tolist()}) == 8     # the masked steps still sample
    # min_new_tokens = max_new_tokens: no row can stop.
    full = sampler.generate(sp, PROMPTS, cfg, min_new_tokens=10, rng=3)
    assert np.all(np.asarray(full.truncated)) and np.all(np.asarray(full.lengths) == 10)


def _nucleus_draw(z, p, u):
    """NumPy top-p then inverse CDF: the smallest most-likely set with mass >= p, token at `u`."""
    probs = np.exp(z - z[np.isfinite(z)].max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    kept = np.zeros_like(probs, bool)
    kept[order[before < p]] = True
    q = np.where(kept, probs, 0.0)
    cdf = np.cumsum(q / q.sum())
    return int(np.argmax(cdf > u))


def test_first_step_draws_from_the_masked_distribution_and_reports_the_unmasked_logprob(lm, params, sampler, sp):
    # TopP(0.9) at T=0.7: unmasked, the nucleus is EOS alone (p ~ 0.9999); masked, it is the
    # renormalised rest, as HF / vLLM apply min_new_tokens before top-p. The reported log-prob is
    # log softmax(logits / T)[token] of the unmasked distribution (the trainer's recomputed one).
    t = 0.7
    cfg = SamplingConfig(max_new_tokens=1, method=TopP(p=0.9, temperature=t), num_samples=3, eos_id=EOS,
                         min_new_tokens=1)
    out = sampler.generate(sp, PROMPTS, cfg, rng=11)
    u = np.asarray(row_uniforms(jax.random.key(11), jnp.int32(0), jnp.arange(6, dtype=jnp.int32)))
    got = np.asarray(out.completion_tokens[:, 0])
    for r in range(6):
        z = _first_step_logits(lm, params, PROMPTS[r // 3]) / t
        unmasked = z - np.log(np.sum(np.exp(z - z.max()))) - z.max()
        assert np.exp(unmasked[EOS]) > 0.999
        masked = z.copy()
        masked[EOS] = -np.inf
        assert got[r] == _nucleus_draw(masked, 0.9, u[r]), r
        np.testing.assert_allclose(float(out.logprobs[r, 0]), unmasked[got[r]], atol=2e-4)
        # The masked distribution's log-prob is higher by -log(1 - p(EOS)) (~7 nats here): not reported.
        renormalised = masked - np.log(np.sum(np.exp(masked[np.isfinite(masked)] - z.max()))) - z.max()
        assert renormalised[got[r]] - float(out.logprobs[r, 0]) > 5
    assert not np.any(got == EOS)


def test_greedy_takes_the_best_non_stop_token(lm, params, sampler, sp):
    out = sampler.generate(sp, PROMPTS, max_new_tokens=2, method=Greedy(), eos_id=EOS, min_new_tokens=1)
    for b, prompt in enumerate(PROMPTS):
        z = _first_step_logits(lm, params, prompt)
        assert int(np.argmax(z)) == EOS
        z[EOS] = -np.inf
        assert int(out.completion_tokens[b, 0]) == int(np.argmax(z))
        assert int(out.completion_tokens[b, 1]) == EOS                # free to stop from index 1
    np.testing.assert_array_equal(np.asarray(out.lengths), 2)


def test_default_is_a_trace_time_no_op(sampler, sp):
    # min_new_tokens=0 lowers the program that omits the option (no stop-id scatter); > 0 adds it.
    tokens, lengths, _ = sampler._prepare_prompts(PROMPTS, None, 4)
    state = sampler._prefill(sp.tree, tokens, lengths, jax.random.key(0), max_new_tokens=4, num_samples=1)
    lower = lambda **kw: sampler._decode.lower(sp.tree, state, tokens, lengths, method=Categorical(),  # noqa: E731
                                               stop_ids=(EOS,), num_samples=1, **kw).as_text()
    default, zero, three = lower(), lower(min_new_tokens=0), lower(min_new_tokens=3)
    assert zero == default and "scatter" not in zero
    assert "scatter" in three


def test_suppress_stop_ids_golden():
    z = jnp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    got = suppress_stop_ids(z, jnp.asarray([[3, -1], [0, 2], [1, 1]]), jnp.asarray([True, True, False]))
    want = np.arange(12, dtype=np.float32).reshape(3, 4)
    want[0, 3] = want[1, 0] = want[1, 2] = -np.inf
    np.testing.assert_array_equal(np.asarray(got), want)


def test_continuous_batching_applies_each_requests_own_min(sampler, sp):
    # Three requests with min 0, 3 and 6 share the slots (a pool of 6 blocks of 4 positions, so samples
    # wait and are preempted): each stops at its own min, counted from its first new token whenever it
    # was admitted or resumed, and draws the static call's tokens for the same key and min.
    reqs = [Request(prompt=PROMPTS[0], max_new_tokens=10, num_samples=2, stop_ids=(EOS,), seed=5, min_new_tokens=m)
            for m in (0, 3, 6)]
    outs = sampler.generate_requests(sp, reqs, num_slots=4, block_size=4, num_blocks=6, reserve_blocks=0)
    assert sampler.continuous_stats().preemptions > 0
    for req, out in zip(reqs, outs):
        m = req.min_new_tokens
        static = sampler.generate(sp, [req.prompt], max_new_tokens=10, num_samples=2, eos_id=EOS,
                                  min_new_tokens=m, rng=jax.random.key(5))
        for j in range(2):
            toks = out.tokens[j]
            assert not np.any(toks[:m] == EOS) and out.finish_reasons[j] == "stop"
            assert len(toks) == m + 1 and toks[-1] == EOS, (m, toks)
            np.testing.assert_array_equal(toks, np.asarray(static.completion_tokens[j, : len(toks)]))
            np.testing.assert_allclose(out.logprobs[j], np.asarray(static.logprobs[j, : len(toks)]), atol=1e-5)


def test_continuous_stop_sequences_count_from_min(lm, sampler, sp):
    # A stop sequence is not masked in the logits (it spans tokens): before min_new_tokens its match
    # does not end the sample, which continues as it would without the stop.
    plain = sampler.load_params(lm.init(jax.random.key(1)))
    prompt = [5, 9, 33, 2]
    free = sampler.generate_requests(plain, [Request(prompt=prompt, max_new_tokens=12, method=Greedy())],
                                     num_slots=4, block_size=4)[0].tokens[0]
    stop = int(free[1])
    first = lambda lo: next((i for i in range(lo, 12) if free[i] == stop), None)  # noqa: E731
    outs = sampler.generate_requests(plain, [
        Request(prompt=prompt, max_new_tokens=12, method=Greedy(), stop_sequences=((stop,),), min_new_tokens=m)
        for m in (0, 3)], num_slots=4, block_size=4)
    for out, m in zip(outs, (0, 3)):
        end = first(m)
        want = free if end is None else free[: end + 1]
        np.testing.assert_array_equal(out.tokens[0], want, err_msg=f"min_new_tokens={m}")
        assert out.finish_reasons[0] == ("length" if end is None else "stop")
    assert len(outs[1].tokens[0]) > len(outs[0].tokens[0])


def test_top_p_cut_is_the_same_float32_test_on_both_paths():
    # Probabilities (0.9, 0.05, 0.05) at p = 0.9: the mass before token 1 is 0.9, not < p, so it is cut
    # (exact arithmetic). `tail > 1 - p` in float64 would keep it (1 - 0.9 = 0.09999999999999998 <
    # 0.1); both paths compare in float32 (`1 - float32(0.9)` = 0.100000024): the static sampler's
    # Python-float p and continuous batching's float32 slot field give one cut-off and one token at
    # every u.
    logits = np.log(np.asarray([[0.9, 0.05, 0.05]], np.float32))
    assert 0.05 + 0.05 > 1 - 0.9
    u = jnp.asarray(np.linspace(0, 1, 512, endpoint=False), jnp.float32)
    rows = jnp.asarray(np.repeat(logits, 512, axis=0))
    f = {k: jnp.full((512,), v) for k, v in row_fields(TopP(p=0.9)).items()}
    per_row = np.asarray(jax.jit(select_per_row, static_argnames="kinds")(
        rows, u, f["kind"], f["temperature"], f["top_k"], f["top_p"], f["log_min_p"], kinds=(TOP_P,)))
    static = np.asarray(jax.jit(TopP(p=0.9).select)(rows, u))
    np.testing.assert_array_equal(per_row, static)
    np.testing.assert_array_equal(static, 0)


@pytest.mark.parametrize("build, message", [
    (lambda: SamplingConfig(max_new_tokens=4, eos_id=2, min_new_tokens=5),
     r"SamplingConfig.min_new_tokens=5 exceeds SamplingConfig.max_new_tokens=4"),
    (lambda: SamplingConfig(max_new_tokens=4, eos_id=2, min_new_tokens=-1),
     r"SamplingConfig.min_new_tokens must be an int >= 0, got -1"),
    (lambda: SamplingConfig(max_new_tokens=4, eos_id=2, min_new_tokens=2.0),
     r"SamplingConfig.min_new_tokens must be an int >= 0, got 2.0"),
    (lambda: SamplingConfig(max_new_tokens=4, min_new_tokens=2),
     r"SamplingConfig.min_new_tokens=2 has no effect without eos_id or stop_ids"),
    (lambda: Request(prompt=[1], max_new_tokens=3, stop_ids=(2,), min_new_tokens=4),
     r"Request.min_new_tokens=4 exceeds Request.max_new_tokens=3"),
    (lambda: Request(prompt=[1], max_new_tokens=3, min_new_tokens=1),
     r"Request.min_new_tokens=1 has no effect without stop_ids or stop_sequences"),
    (lambda: RolloutConfig(min_new_tokens=4, ignore_eos=True),
     r"rollout.min_new_tokens=4 has no effect unless rollout.ignore_eos is false"),
    (lambda: RolloutConfig(max_new_tokens=8, min_new_tokens=9),
     r"rollout.min_new_tokens must be an int in \[0, rollout.max_new_tokens=8\], got 9"),
    (lambda: RolloutConfig(min_new_tokens=True), r"rollout.min_new_tokens must be an int"),
    # The rollout section's knobs are named as the user wrote them (were `make_method.top_p`, ...).
    (lambda: RolloutConfig(top_p=1.5), r"^rollout.top_p must be in \(0, 1\], got 1.5$"),
    (lambda: RolloutConfig(top_k=-1), r"^rollout.top_k must be an int >= 0 \(0 = off\), got -1$"),
    (lambda: RolloutConfig(min_p=2.0), r"^rollout.min_p must be in \[0, 1\] \(0 = off\), got 2.0$"),
])
def test_bad_settings_name_the_key(build, message):
    with pytest.raises(ValueError, match=message) as info:
        build()
    if "rollout." in message:
        assert isinstance(info.value, ConfigError)


def test_rollout_min_new_tokens_reaches_the_sampling_config(sampler):
    from rlhf_jax.train.rollouts import RolloutCollector

    class Tok:
        eos_token_id = EOS

    class Rewards:
        on_error, error_penalty = "raise", 0.0

    class Config:
        rollout = RolloutConfig(max_new_tokens=8, min_new_tokens=3, top_p=0.9)
        rewards = Rewards()

    collector = RolloutCollector.from_config(Config(), sampler=sampler, tokenizer=Tok(), sources=[], weights=None,
                                             group=2, temperature=0.8)
    assert collector.train_sampling.min_new_tokens == 3 and collector.eval_sampling.min_new_tokens == 3
    assert collector.train_sampling.method == TopP(p=0.9, temperature=0.8)
    assert RolloutConfig().min_new_tokens == 0


def test_agentic_runs_refuse_rollout_min_new_tokens():
    # A trajectory is many turns: its static and continuous turn loops would read a minimum differently.
    from rlhf_jax.train.agentic import AgenticGRPORunConfig

    with pytest.raises(ConfigError, match=r"rollout.min_new_tokens=2 is not supported by agentic rollouts"):
        AgenticGRPORunConfig(name="a", rollout=RolloutConfig(min_new_tokens=2))
    assert AgenticGRPORunConfig(name="a").rollout.min_new_tokens == 0
