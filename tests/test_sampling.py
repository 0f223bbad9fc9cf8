"""The sampler against full forward passes and the trainer's log-probs; stops, masks, groups, errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import CausalLM
from rlhf_jax.rollout import completion_logprobs
from rlhf_jax.sampling import (
    Categorical,
    Greedy,
    Sampler,
    SamplingConfig,
    TopK,
    TopP,
    decode,
    finalize,
    prefill,
    unstack_layers,
)
from rlhf_jax.testing import tiny_config

PAD = 0
PROMPTS = [[5, 17, 33, 8, 90, 41, 7], [12, 3], [200, 150, 100, 50, 25]]


@pytest.fixture(scope="module")
def lm():
    return CausalLM(tiny_config())


@pytest.fixture(scope="module")
def params(lm):
    return lm.init(jax.random.key(0))


@pytest.fixture(scope="module")
def sampler(lm):
    return Sampler(lm, max_len=32, prompt_buckets=(8, 16), pad_id=PAD)


@jax.jit
def _full_forward_logits(params, tokens):
    return CausalLM(tiny_config()).forward(params, tokens).logits


def _greedy_by_full_forward(params, prompt, steps, width=24):
    """Reference decoding: the trainer's model, the whole sequence re-run for every new token.

    The sequence is right-padded to a fixed width (one compiled program); causal attention makes
    the logits at the last real token independent of the padding after it.
    """
    seq = list(prompt)
    for _ in range(steps):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : len(seq)] = seq
        seq.append(int(np.argmax(_full_forward_logits(params, tokens)[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_cached_decoding_equals_repeated_full_forward(params, sampler):
    out = sampler.generate(params, PROMPTS, max_new_tokens=8, method=Greedy())
    tokens = np.asarray(out.completion_tokens)
    for i, prompt in enumerate(PROMPTS):
        assert tokens[i].tolist() == _greedy_by_full_forward(params, prompt, 8), f"prompt {i}"
    assert np.asarray(out.completion_mask).all() and np.asarray(out.truncated).all()
    np.testing.assert_array_equal(out.lengths, [8, 8, 8])


def test_variable_length_batch_equals_each_prompt_alone(params, sampler):
    batch = sampler.generate(params, PROMPTS, max_new_tokens=8, method=Greedy())
    for i, prompt in enumerate(PROMPTS):
        alone = sampler.generate(params, [prompt], max_new_tokens=8, method=Greedy())
        np.testing.assert_array_equal(batch.completion_tokens[i], alone.completion_tokens[0])
        np.testing.assert_allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-6)


@jax.jit
def _trainer_logprobs(params, prompt_tokens, prompt_lengths, completion_tokens, temperature):
    lm = CausalLM(tiny_config())
    return completion_logprobs(lm, params, prompt_tokens, prompt_lengths, completion_tokens,
                               temperature=temperature)[0]


@pytest.mark.parametrize("method", [Categorical(temperature=0.7), TopP(p=0.8, temperature=1.3), Greedy()])
def test_sampler_logprobs_equal_the_trainers_recomputation(params, sampler, method):
    out = sampler.generate(params, PROMPTS, max_new_tokens=8, method=method, num_samples=4, eos_id=2, rng=11)
    trainer = _trainer_logprobs(params, out.prompt_tokens, out.prompt_lengths, out.completion_tokens,
                                jnp.float32(method.temperature))
    mask = np.asarray(out.completion_mask)
    diff = np.abs(np.asarray(trainer) - np.asarray(out.logprobs))[mask]
    assert diff.max() <= 1e-5, diff.max()
    assert np.all(np.asarray(out.logprobs)[~mask] == 0)


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def test_sampler_logprobs_are_the_untruncated_tempered_ones(params, sampler):
    # NumPy oracle on a full forward pass per row: token t of row r was drawn among the top 3 of
    # logits / T, and its reported log-prob is log softmax(logits / T) over the whole vocabulary (what
    # the trainer recomputes at T), not the renormalised top-3 one.
    method = TopK(k=3, temperature=0.5)
    out = sampler.generate(params, PROMPTS, max_new_tokens=6, method=method, num_samples=2, rng=5)
    tokens, logps, lengths = (np.asarray(a) for a in (out.completion_tokens, out.logprobs, out.lengths))
    for r in range(len(tokens)):
        prompt = PROMPTS[r // 2]
        seq = np.zeros((1, 24), np.int32)
        seq[0, : len(prompt) + 6] = list(prompt) + tokens[r].tolist()
        logits = np.asarray(_full_forward_logits(params, seq)[0], np.float64)
        for t in range(lengths[r]):
            z = logits[len(prompt) - 1 + t]
            tok = tokens[r, t]
            assert z[tok] >= np.sort(z)[-3], (r, t)                          # inside the top 3
            full = _np_log_softmax(z / 0.5)[tok]
            top3 = _np_log_softmax(np.sort(z / 0.5)[-3:])[np.searchsorted(np.sort(z)[-3:], z[tok])]
            np.testing.assert_allclose(logps[r, t], full, atol=2e-5, err_msg=f"row {r} step {t}")
            assert top3 - full > 1.0                                          # distinguishable here


def test_first_tokens_follow_the_truncated_distribution(lm, params, sampler):
    # 4096 samples of one prompt (one uniform number per row and step): the first tokens' frequencies
    # against the top-p distribution of the trainer's logits (NumPy), Pearson chi-square within 6 sigma.
    prompt, rows = [5, 17, 33, 8], 4096
    out = sampler.generate(params, [prompt], max_new_tokens=2, method=TopP(p=0.9, temperature=0.05),
                           num_samples=rows, rng=3)
    z = np.asarray(lm.forward(params, jnp.asarray([prompt])).logits[0, -1], np.float64) / 0.05
    p = np.exp(_np_log_softmax(z))
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    keep[order[(np.cumsum(p[order]) - p[order]) < 0.9]] = True
    q = np.where(keep, p, 0) / p[keep].sum()
    counts = np.bincount(np.asarray(out.completion_tokens)[:, 0], minlength=len(q))
    assert counts[~keep].sum() == 0 and 5 < keep.sum() < 200
    expected = rows * q
    big = expected >= 5
    obs, exp = np.append(counts[big], counts[keep & ~big].sum()), np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    dof = len(exp) - 1
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)


def test_stop_ids_cut_rows_and_masks_token_by_token(params, sampler):
    free = np.asarray(sampler.generate(params, PROMPTS, max_new_tokens=8, method=Greedy()).completion_tokens)
    eos, other_stop = int(free[0, 2]), int(free[2, 5])
    out = sampler.generate(
        params, PROMPTS, max_new_tokens=8, method=Greedy(), eos_id=eos, stop_ids=(other_stop,)
    )
    tokens, mask = np.asarray(out.completion_tokens), np.asarray(out.completion_mask)
    logps = np.asarray(out.logprobs)
    for i, row in enumerate(free):
        hits = [t for t, tok in enumerate(row) if tok in (eos, other_stop)]
        length = hits[0] + 1 if hits else 8
        assert out.lengths[i] == length
        assert bool(out.truncated[i]) == (not hits)
        np.testing.assert_array_equal(mask[i], np.arange(8) < length)          # through the stop token
        np.testing.assert_array_equal(tokens[i, :length], row[:length])         # same tokens until then
        np.testing.assert_array_equal(tokens[i, length:], PAD)                  # padding after it
        assert np.all(logps[i, length:] == 0) and np.all(logps[i, :length] < 0)
    assert out.lengths[0] == 3 and not out.truncated[0]


def test_loop_stops_early_once_every_row_is_done(lm, params):
    model = CausalLM(lm.config.replace(scan_layers=False))
    prompts, lengths = jnp.asarray([[5, 17, 33], [12, 3, 0]]), jnp.asarray([3, 2])
    state = prefill(model, params, prompts, lengths, max_new_tokens=8, rng=jax.random.key(0))
    free = np.asarray(decode(model, params, state, method=Greedy()).tokens)
    stops = (int(free[0, 1]), int(free[1, 1]))      # every row stops by its 2nd token
    final = decode(model, unstack_layers(params), state, method=Greedy(), stop_ids=stops)
    expected = [next(t for t in range(8) if row[t] in stops) + 1 for row in free]
    assert np.asarray(final.done).all() and int(final.step) == max(expected) <= 2
    out = finalize(final, prompts, lengths)
    np.testing.assert_array_equal(out.lengths, expected)
    np.testing.assert_array_equal(out.completion_mask, np.arange(8)[None, :] < np.array(expected)[:, None])


def test_growing_cache_in_phases_equals_the_full_cache(lm, params):
    model = CausalLM(lm.config.replace(scan_layers=False))
    prompts, lengths = jnp.asarray([[5, 17, 33, 8], [12, 3, 0, 0]]), jnp.asarray([4, 2])
    run = jax.jit(lambda chunk, stops: decode(
        model, params, prefill(model, params, prompts, lengths, max_new_tokens=8, rng=jax.random.key(0),
                               cache_chunk=chunk), method=Greedy(), stop_ids=stops), static_argnums=(0, 1))
    full = run(None, ())
    assert full.cache_len == 8    # the rows' own slots; the prompts' 4 are shared by their rows
    for chunk in (3, 5):   # phases of 3 (own slots 3 -> 6 -> 8) and of 5 (5 -> 8)
        grown = run(chunk, ())
        assert grown.cache_len == full.cache_len
        np.testing.assert_array_equal(grown.tokens, full.tokens)
        np.testing.assert_allclose(grown.logprobs, full.logprobs, atol=1e-6)
    # Rows that all stop in the first phase pass through the later phases without a step.
    stops = tuple(int(t) for t in np.asarray(full.tokens)[:, 0])
    early = run(3, stops)
    assert int(early.step) == 1 and np.asarray(early.done).all()
    np.testing.assert_array_equal(early.lengths, [1, 1])


def test_group_of_n_shares_one_prefill(params, sampler):
    calls = sampler.stats.prefill_calls
    out = sampler.generate(params, PROMPTS, max_new_tokens=8, num_samples=4, method=Categorical(temperature=0.7),
                           eos_id=2, rng=3)
    assert sampler.stats.prefill_calls == calls + 1
    np.testing.assert_array_equal(out.prompt_lengths, np.repeat([7, 2, 5], 4))
    tokens = np.asarray(out.completion_tokens).reshape(3, 4, 8)
    assert all(len({tuple(s) for s in group}) > 1 for group in tokens)   # the samples differ
    greedy = np.asarray(sampler.generate(params, PROMPTS, max_new_tokens=8, num_samples=4, method=Greedy(),
                                         eos_id=2).completion_tokens).reshape(3, 4, 8)
    assert (greedy == greedy[:, :1]).all()                                  # one prefill, n equal copies
    # The compiled prefill of 3 prompts x 4 samples does the work of 3 prompts, not of 12 rows.
    sp = sampler.load_params(params)

    def flops(rows, n):
        lowered = sampler._prefill.lower(sp.tree, jnp.zeros((rows, 8), jnp.int32), jnp.ones((rows,), jnp.int32),
                                         jax.random.key(0), max_new_tokens=8, num_samples=n)
        return lowered.compile().cost_analysis()["flops"]

    one, grouped, twelve = flops(3, 1), flops(3, 4), flops(12, 1)
    assert one <= grouped < 1.001 * one      # only the O(rows) bookkeeping differs
    assert twelve > 3.9 * one                # a prefill per sample would cost 4x
    # The decode loop keeps one copy of each prompt's 8 cache slots for its 4 rows, and per row only
    # the slots of the tokens it feeds (8 new tokens in the sampler's 2 phases: 4 slots, then 8).
    state = sampler._prefill(sp.tree, jnp.zeros((3, 8), jnp.int32), jnp.ones((3,), jnp.int32), jax.random.key(0),
                             max_new_tokens=8, num_samples=4)
    c = sampler.model.config
    assert all(a.shape == (3, c.num_kv_heads, 8, c.head_dim) for a in state.prompt_k + state.prompt_v)
    assert all(a.shape == (12, c.num_kv_heads, 4, c.head_dim) for a in state.cache_k + state.cache_v)


def test_deterministic_for_a_seed(params, sampler):
    run = lambda seed: np.asarray(  # noqa: E731
        sampler.generate(params, PROMPTS, max_new_tokens=8, method=TopP(p=0.8, temperature=1.3), num_samples=4,
                         eos_id=2, rng=seed).completion_tokens
    )
    np.testing.assert_array_equal(run(1), run(1))
    np.testing.assert_array_equal(run(jax.random.key(1)), run(1))
    assert not np.array_equal(run(1), run(2))


def test_number_of_compiled_programs_does_not_grow_with_calls(params, sampler):
    sp = sampler.load_params(params)
    config = SamplingConfig(max_new_tokens=8, method=Greedy())
    sampler.generate(sp, [[3, 4, 5]], config, rng=0)
    compiled = sampler.num_compiled()
    rng = np.random.default_rng(0)
    for call in range(6):   # different lengths (one bucket), contents and seeds
        prompts = [rng.integers(3, 250, size=rng.integers(1, 9)).tolist()]
        sampler.generate(sp, prompts, config, rng=call)
    assert sampler.num_compiled() == compiled
    sampler.generate(sp, [list(range(3, 15))], config)    # a longer prompt: the next bucket
    assert sampler.num_compiled() == compiled + 2          # its prefill and decode programs


def test_padded_array_input_equals_ragged_lists(params, sampler):
    padded = np.zeros((3, 7), np.int64)
    for i, p in enumerate(PROMPTS):
        padded[i, : len(p)] = p
    a = sampler.generate(params, padded, prompt_lengths=[7, 2, 5], max_new_tokens=8, method=Greedy())
    b = sampler.generate(params, PROMPTS, max_new_tokens=8, method=Greedy())
    np.testing.assert_array_equal(a.completion_tokens, b.completion_tokens)
    np.testing.assert_array_equal(a.prompt_tokens[:, :7], padded)


def test_one_new_token(params, sampler):
    out = sampler.generate(params, PROMPTS, max_new_tokens=1, method=Greedy())
    expected = [_greedy_by_full_forward(params, p, 1) for p in PROMPTS]
    np.testing.assert_array_equal(out.completion_tokens, expected)


@pytest.mark.parametrize(
    "prompts, kwargs, error, message",
    [
        ([[1] * 30], dict(max_new_tokens=4), ValueError, r"prompt 0 has 30 tokens; with max_new_tokens=4 it needs 33"),
        ([[1, 2], []], dict(max_new_tokens=4), ValueError, r"prompt 1 is empty"),
        ([], dict(max_new_tokens=4), ValueError, r"the batch has no prompts"),
        ([[1, 2]], dict(max_new_tokens=0), ValueError, r"SamplingConfig.max_new_tokens must be an int >= 1"),
        ([[1, 2]], dict(max_new_tokens=4, num_samples=0), ValueError, r"num_samples must be an int >= 1"),
        ([[1, 999]], dict(max_new_tokens=4), ValueError, r"prompt 0 has token ids outside \[0, 256\)"),
        ([[1, 2]], dict(max_new_tokens=4, method="greedy"), TypeError, r"SamplingConfig.method must be one of"),
        ([[1, 2]], dict(), TypeError, r"at least max_new_tokens"),
        ("hello", dict(max_new_tokens=4), TypeError, r"use generate_text for strings"),
        # A stop id the model cannot sample would never end a row: refused, naming the ids.
        ([[1, 2]], dict(max_new_tokens=4, eos_id=256), ValueError, r"eos_id / stop_ids \[256\] are outside the vocab"),
        ([[1, 2]], dict(max_new_tokens=4, stop_ids=(3, 300)), ValueError, r"stop_ids \[300\] are outside the vocabulary \[0, 256\)"),
        ([[1, 2]], dict(max_new_tokens=4, temperature=0.5), TypeError, r"unknown option\(s\) \['temperature'\]"),
    ],
)
def test_bad_input_raises_clear_errors(params, sampler, prompts, kwargs, error, message):
    with pytest.raises(error, match=message):
        sampler.generate(params, prompts, **kwargs)


def test_top_p_outside_unit_interval_is_refused(params, sampler):
    with pytest.raises(ValueError, match=r"TopP.p must be in \(0, 1\], got 1.5"):
        sampler.generate(params, PROMPTS, max_new_tokens=4, method=TopP(p=1.5))


def test_bucket_choice(sampler):
    assert [sampler.bucket_for(n, 4) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    # Beyond the largest bucket the prompt is padded to what the cache can hold: 32 - 4 + 1.
    assert sampler.bucket_for(17, 4) == 29


# ------------------------------------------------------------------ input validation (audit)


@pytest.mark.parametrize("change", [{"vocab_size": 512}, {"num_layers": 3}, {"hidden_size": 128},
                                    {"intermediate_size": 256}])
def test_load_params_refuses_params_of_another_config(lm, sampler, change):
    other = CausalLM(lm.config.replace(**change)).abstract_params()
    foreign = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), other)
    with pytest.raises(ValueError, match=r"Sampler: param \S+ has shape .* but the model's config wants"):
        sampler.load_params(foreign)
    with pytest.raises(ValueError, match="built for another config"):
        sampler.generate(foreign, [[1, 2]], max_new_tokens=2, method=Greedy())


def test_load_params_accepts_the_decode_layout_and_names_bad_trees(lm, params, sampler):
    from rlhf_jax.sampling.decode import unstack_layers

    out = sampler.generate(sampler.load_params(unstack_layers(params)), [[1, 2]], max_new_tokens=2, method=Greedy())
    ref = sampler.generate(params, [[1, 2]], max_new_tokens=2, method=Greedy())
    np.testing.assert_array_equal(out.completion_tokens, ref.completion_tokens)
    short = {**unstack_layers(params)}
    short["layers"] = short["layers"][:1]
    with pytest.raises(ValueError, match="has 1 layers, the model has 2"):
        sampler.load_params(short)
    with pytest.raises(ValueError, match=r"Sampler: params lack embed required by the model's config"):
        sampler.generate({"foo": np.ones(1)}, [[1]], max_new_tokens=2)
    with pytest.raises(TypeError, match="LoRA params"):
        sampler.load_params({"base": params, "lora": {}})


def test_sampler_refuses_pad_id_outside_the_vocabulary(lm):
    with pytest.raises(ValueError, match=r"pad_id must be a token id in \[0, vocab_size=256\), got 256"):
        Sampler(lm, max_len=32, pad_id=lm.config.vocab_size)


def test_generate_checks_prompt_lengths_and_list_prompts(params, sampler):
    g = lambda prompts, **kw: sampler.generate(params, prompts, max_new_tokens=2, method=Greedy(), **kw)  # noqa: E731
    padded = np.array([[1, 2, 3, 0]])
    for bad in ([-1], [0], [5]):
        with pytest.raises(ValueError, match=rf"prompt_lengths\[0\] = {bad[0]} is outside \[1, 4\]"):
            g(padded, prompt_lengths=bad)
    with pytest.raises(TypeError, match="prompt_lengths must be integers"):
        g(padded, prompt_lengths=[2.9])
    with pytest.raises(TypeError, match="prompt 0 must hold integer token ids"):
        g([[1.7, 2.2, 3.9]])
    with pytest.raises(ValueError, match="prompt 0 must be a flat list of token ids"):
        g([[[1, 2], [3, 4]]])
    assert np.asarray(g(padded, prompt_lengths=[3]).lengths).shape == (1,)


def test_a_max_len_past_the_models_positions_warns(lm):
    """As transformers' generate warns past the model's length: a Sampler whose max_len exceeds
    max_position_embeddings says so (positions never trained); within it, no warning."""
    limit = lm.config.max_position_embeddings
    with pytest.warns(UserWarning, match=rf"^Sampler: max_len={limit + 1} is above the model's "
                                         rf"max_position_embeddings={limit}: positions past it were not trained"):
        Sampler(lm, max_len=limit + 1, prompt_buckets=(8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Sampler(lm, prompt_buckets=(8,)).max_len == limit


def test_a_rows_draws_depend_on_its_position_not_on_the_batch(params, sampler):
    # Draws are keyed by (seed, step, row): prompt 0's 4 samples are the same alone as ahead of two
    # other prompts, and differ at rows 4-7 (the programs of test_deterministic_for_a_seed, but one).
    run = lambda prompts: np.asarray(sampler.generate(  # noqa: E731
        params, prompts, max_new_tokens=8, method=TopP(p=0.8, temperature=1.3), num_samples=4, eos_id=2,
        rng=1).completion_tokens)
    alone = run(PROMPTS[:1])
    np.testing.assert_array_equal(run(PROMPTS)[:4], alone)
    assert not np.array_equal(run([PROMPTS[1], PROMPTS[0], PROMPTS[2]])[4:8], alone)
