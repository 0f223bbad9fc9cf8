"""Reward sources: the TRL calling convention, weighted combination, failures, built-in functions."""

import dataclasses
import functools

import numpy as np
import pytest

from rlhf_jax.rewards import (
    PythonReward,
    RewardFunctionError,
    RewardInputs,
    combine_rewards,
    even_fraction_reward,
    exact_match,
    format_reward,
    missing_eos_penalty,
    overlong_penalty,
    reward_metrics,
)


def _inputs(completions=("1+1=2", "2+2=5", "<a>x</a>", "oops"), answers=("2", "4", "x", "3")):
    n = len(completions)
    comp = np.array([[4, 5, 2, 0], [6, 7, 8, 9], [10, 2, 0, 0], [11, 12, 13, 14]], np.int32)[:n]
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], bool)[:n]
    return RewardInputs(
        prompt_tokens=np.array([[1, 20, 21], [1, 22, 0], [1, 0, 0], [1, 23, 24]], np.int32)[:n],
        prompt_lengths=np.array([3, 2, 1, 3], np.int32)[:n],
        completion_tokens=comp,
        completion_mask=mask,
        truncated=np.array([False, True, False, True])[:n],
        prompts=[f"p{i}" for i in range(n)],
        completions=list(completions),
        columns={"answer": list(answers)},
    )


def test_python_reward_receives_trl_keywords_and_columns():
    seen = {}

    def spy(prompts, completions, completion_ids, prompt_ids, truncated, answer, **kwargs):
        seen.update(prompts=prompts, completion_ids=completion_ids, prompt_ids=prompt_ids,
                    truncated=truncated, answer=answer, extra=kwargs)
        return [0.0] * len(completions)

    combine_rewards([PythonReward(spy)], _inputs())
    assert seen["completion_ids"] == [[4, 5, 2], [6, 7, 8, 9], [10, 2], [11, 12, 13, 14]]
    assert seen["prompt_ids"] == [[1, 20, 21], [1, 22], [1], [1, 23, 24]]
    assert seen["truncated"] == [False, True, False, True]
    assert seen["answer"] == ["2", "4", "x", "3"]
    assert seen["prompts"] == ["p0", "p1", "p2", "p3"]
    assert seen["extra"] == {}


def test_weighted_combination_and_metrics():
    inputs = _inputs()
    result = combine_rewards(
        [exact_match(), missing_eos_penalty(0.5), PythonReward(even_fraction_reward)],
        inputs,
        weights=[2.0, 1.0, 0.25],
    )
    # "1+1=2" -> "2" matches; "2+2=5" -> "5" does not; "<a>x</a>" has no "=" so the whole text is compared.
    np.testing.assert_array_equal(result.per_source["exact_match"], [1, 0, 0, 0])
    np.testing.assert_array_equal(result.per_source["missing_eos"], [0, -0.5, 0, -0.5])
    # even ids: [4,5,2] -> 2/3, [6,7,8,9] -> 1/2, [10,2] -> 1, [11,12,13,14] -> 1/2
    even = np.array([2 / 3, 0.5, 1.0, 0.5], np.float32)
    np.testing.assert_allclose(result.per_source["even_fraction_reward"], even, rtol=1e-6)
    expected = 2 * np.array([1, 0, 0, 0]) + np.array([0, -0.5, 0, -0.5]) + 0.25 * even
    np.testing.assert_allclose(result.total, expected, rtol=1e-6)
    metrics = reward_metrics(result, group_size=2)
    assert metrics["reward"] == pytest.approx(expected.mean(), rel=1e-6)
    group_std = np.array([np.std(expected[:2], ddof=1), np.std(expected[2:], ddof=1)])  # TRL's (torch) std
    assert metrics["reward_std"] == pytest.approx(group_std.mean(), rel=1e-6)
    assert metrics["frac_reward_zero_std"] == 0.0
    assert metrics["rewards/exact_match/mean"] == 0.25
    assert metrics["rewards/missing_eos/num_errors"] == 0.0


def test_frac_reward_zero_std_counts_constant_groups():
    inputs = _inputs()
    result = combine_rewards([PythonReward(lambda **kw: [1.0, 1.0, 0.0, 1.0], name="r")], inputs)
    metrics = reward_metrics(result, group_size=2)
    assert metrics["frac_reward_zero_std"] == 0.5
    assert metrics["reward_std"] == pytest.approx(np.sqrt(0.5) / 2)  # groups' unbiased stds 0 and 1/sqrt(2)
    with pytest.raises(ValueError, match="groups of 3"):
        reward_metrics(result, group_size=3)


def test_raising_function_is_named_in_the_error():
    def broken_grader(completions, **kwargs):
        raise ZeroDivisionError("boom")

    with pytest.raises(RewardFunctionError, match=r"'broken_grader' raised ZeroDivisionError: boom"):
        combine_rewards([PythonReward(broken_grader)], _inputs())


def test_nan_reward_names_function_and_sample():
    def nan_on_third(completions, **kwargs):
        return [1.0, 1.0, float("nan"), 1.0]

    with pytest.raises(RewardFunctionError, match=r"'nan_on_third' returned nan for sample 2 .*'<a>x</a>'"):
        combine_rewards([PythonReward(nan_on_third)], _inputs())


def test_penalty_mode_finds_failing_samples_and_counts_them():
    def fragile(completions, answer, **kwargs):
        # Fails on any batch containing "oops"; returns NaN for "2+2=5".
        if "oops" in completions:
            raise ValueError("cannot parse")
        return [float("nan") if c == "2+2=5" else 1.0 for c in completions]

    result = combine_rewards(
        [PythonReward(fragile), PythonReward(lambda **kw: [0.5] * 4, name="half")],
        _inputs(), on_error="penalty", error_penalty=-1.0,
    )
    np.testing.assert_array_equal(result.per_source["fragile"], [1.0, -1.0, 1.0, -1.0])
    assert result.num_errors == {"fragile": 2, "half": 0}
    np.testing.assert_allclose(result.total, [1.5, -0.5, 1.5, -0.5])
    assert reward_metrics(result)["rewards/fragile/num_errors"] == 2.0


def test_bad_outputs_and_arguments():
    inputs = _inputs()
    with pytest.raises(RewardFunctionError, match=r"'short' returned 3 rewards for 4 completions"):
        combine_rewards([PythonReward(lambda **kw: [1.0] * 3, name="short")], inputs, on_error="penalty")
    with pytest.raises(RewardFunctionError, match=r"'scalar' must return a list or 1-D array"):
        combine_rewards([PythonReward(lambda **kw: 1.0, name="scalar")], inputs)
    with pytest.raises(RewardFunctionError, match=r"non-numeric reward 'yes' for sample 0"):
        combine_rewards([PythonReward(lambda **kw: ["yes"] * 4, name="text")], inputs)
    with pytest.raises(ValueError, match="on_error must be one of"):
        combine_rewards([PythonReward(even_fraction_reward)], inputs, on_error="ignore")
    with pytest.raises(ValueError, match=r"unique, repeated: \['r'\]"):
        r = PythonReward(even_fraction_reward, name="r")
        combine_rewards([r, r], inputs)
    with pytest.raises(ValueError, match="2 weights for 1 sources"):
        combine_rewards([PythonReward(even_fraction_reward)], inputs, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"RewardInputs.truncated has 3 rows but prompt_tokens has 4"):
        RewardInputs(
            prompt_tokens=inputs.prompt_tokens, prompt_lengths=inputs.prompt_lengths,
            completion_tokens=inputs.completion_tokens, completion_mask=inputs.completion_mask,
            truncated=inputs.truncated[:3],
        )
    with pytest.raises(RewardFunctionError, match=r"'exact_match' raised KeyError.*no column 'solution'; columns: \['answer'\]"):
        combine_rewards([exact_match(column="solution")], inputs)


def test_format_reward_and_overlong_penalty():
    inputs = _inputs()
    fmt = combine_rewards([format_reward(r"<a>.*</a>")], inputs).total
    np.testing.assert_array_equal(fmt, [0, 0, 1, 0])
    with pytest.raises(ValueError, match="invalid pattern"):
        format_reward("(")
    # lengths 3, 4, 2, 4 with L_max = 4, L_buf = 2: 0 up to 2, then (2 - L) / 2, -1 beyond 4.
    over = combine_rewards([overlong_penalty(max_length=4, buffer_length=2)], inputs).total
    np.testing.assert_allclose(over, [-0.5, -1.0, 0.0, -1.0])
    over3 = combine_rewards([overlong_penalty(max_length=3, buffer_length=2)], inputs).total
    # L_max = 3, L_buf = 2: L = 3 sits at the end of the linear zone, (1 - 3) / 2 = -1; L = 2 gives -0.5.
    np.testing.assert_allclose(over3, [-1.0, -1.0, -0.5, -1.0])
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(max_length=4, buffer_length=5)


def test_text_rewards_name_a_completion_that_is_not_a_string():
    # A chat message list or None used to fail deep inside with "'list' object has no attribute 'strip'".
    with pytest.raises(TypeError, match=r"^format: completion 1 is a list, not a string"):
        format_reward(r"\d+").fn(completions=["1", [{"role": "assistant", "content": "2"}]])
    with pytest.raises(TypeError, match=r"^exact_match: completion 0 is a NoneType, not a string"):
        exact_match().fn(completions=[None], answer=["2"])
    with pytest.raises(ValueError, match="needs decoded completions"):
        format_reward(r"\d+").fn(completions=None)


def test_select_keeps_rows_aligned():
    inputs = _inputs()
    sub = inputs.select([3, 0])
    assert sub.completions == ["oops", "1+1=2"]
    assert sub.columns["answer"] == ["3", "2"]
    assert sub.completion_ids() == [[11, 12, 13, 14], [4, 5, 2]]


# ----------------------------------------------------------------------------- reward model


@functools.lru_cache(maxsize=None)
def _reward_model(vocab_size=None):
    import jax

    from rlhf_jax.models import CausalLM
    from rlhf_jax.testing import tiny_config

    config = tiny_config() if vocab_size is None else tiny_config(vocab_size=vocab_size)
    model = CausalLM(config, head="scalar")
    return model, jax.jit(model.init)(jax.random.key(3))


def test_reward_model_scores_the_last_real_token_in_chunks():
    import jax

    from rlhf_jax.rewards import RewardModelReward

    model, params = _reward_model()
    inputs = _inputs()
    # Reference: each row's real prompt and completion tokens alone (right-padded to a common
    # width, which a causal model ignores), read at the row's last real token.
    rows = np.zeros((len(inputs), 8), np.int32)
    last = []
    for b in range(len(inputs)):
        n_p, n_c = inputs.prompt_lengths[b], inputs.completion_lengths[b]
        real = np.concatenate([inputs.prompt_tokens[b, :n_p], inputs.completion_tokens[b, :n_c]])
        rows[b, : len(real)] = real
        last.append(len(real) - 1)
    values = jax.jit(model.forward)(params, rows).values
    expected = np.asarray(values)[np.arange(len(inputs)), last]
    for batch_size in (3, 8):
        rm = RewardModelReward(model, params, policy_vocab_size=model.config.vocab_size, batch_size=batch_size)
        result = combine_rewards([rm, missing_eos_penalty(1.0)], inputs)
        np.testing.assert_allclose(result.per_source["reward_model"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.total, expected - [0, 1, 0, 1], rtol=1e-5, atol=1e-6)


def test_reward_model_with_another_vocabulary_is_refused():
    from rlhf_jax.rewards import RewardModelReward, check_same_vocabulary
    from rlhf_jax.testing.tokenizer import offline_tokenizer

    model, params = _reward_model(vocab_size=128)
    assert isinstance(model.config.vocab_size, int)
    with pytest.raises(ValueError, match=r"reward model vocabulary differs from the policy's: vocab_size 128 vs 256"):
        RewardModelReward(model, params, policy_vocab_size=256)
    tok = offline_tokenizer()

    class Shuffled:
        def get_vocab(self):
            vocab = dict(tok.get_vocab())
            vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
            return vocab

    with pytest.raises(ValueError, match=r"tokenizer differs from the policy's .*\('a', "):
        check_same_vocabulary(256, 256, policy_tokenizer=tok, reward_tokenizer=Shuffled())
    # The same tokenizer with a table padded to another size (Qwen2.5-7B's 152064 against 1.5B's 151936):
    # a larger reward-model table reads every id the policy samples; a smaller one does not.
    check_same_vocabulary(256, 384, policy_tokenizer=tok, reward_tokenizer=tok)
    with pytest.raises(ValueError, match=r"vocab_size 384 vs 256 \(a larger, padded table is accepted only when both"):
        check_same_vocabulary(256, 384)
    with pytest.raises(ValueError, match=r"vocab_size 128 vs 256 \(the policy could sample ids it has no embedding"):
        check_same_vocabulary(256, 128, policy_tokenizer=tok, reward_tokenizer=tok)
    with pytest.raises(ValueError, match=r"tokenizer differs from the policy's"):
        check_same_vocabulary(256, 384, policy_tokenizer=tok, reward_tokenizer=Shuffled())
    lm_model, lm_params = _reward_model()
    from rlhf_jax.models import CausalLM

    with pytest.raises(ValueError, match="needs head='scalar'"):
        RewardModelReward(CausalLM(lm_model.config), lm_params, policy_vocab_size=256)


def test_reward_values_are_numbers_not_strings_and_fit_float32():
    """Strings are refused (not parsed), None is named, float64 values that overflow float32 are caught,
    and jax / numpy arrays are read as the list they hold."""
    import jax.numpy as jnp

    inputs = _inputs()
    with pytest.raises(RewardFunctionError, match=r"'text' returned a non-numeric reward '1.5' for sample 0"):
        combine_rewards([PythonReward(lambda **kw: ["1.5", 1.0, 1.0, 1.0], name="text")], inputs)
    with pytest.raises(RewardFunctionError, match=r"'maybe' returned nan for sample 2 \(completion '<a>x</a>'\).*None is read as nan"):
        combine_rewards([PythonReward(lambda **kw: [1.0, 0.0, None, 1.0], name="maybe")], inputs)
    with pytest.raises(RewardFunctionError, match=r"'huge' returned 1e\+300 for sample 1 .* not finite float32"):
        combine_rewards([PythonReward(lambda **kw: [1.0, 1e300, 0.0, 0.0], name="huge")], inputs)
    result = combine_rewards([PythonReward(lambda **kw: [1.0, 1e300, 0.0, 0.0], name="huge")], inputs,
                             on_error="penalty", error_penalty=-2.0)
    np.testing.assert_array_equal(result.total, [1.0, -2.0, 0.0, 0.0])
    assert result.num_errors == {"huge": 1}
    result = combine_rewards([PythonReward(lambda **kw: jnp.array([0.5, 1.0, 2.0, 3.0]), name="jax"),
                              PythonReward(lambda **kw: [np.float32(1), np.int64(2), True, 0], name="numpy")],
                             inputs, weights=[2.0, -1.0])
    np.testing.assert_array_equal(result.total, [0.0, 0.0, 3.0, 6.0])


def test_weights_must_be_finite_numbers_and_the_sum_must_fit_float32():
    inputs, one = _inputs(), PythonReward(lambda **kw: [1.0, 2.0, 3.0, 1e30], name="one")
    for bad in (float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match=r"the weight of reward source 'one' must be a finite number"):
            combine_rewards([one], inputs, weights=[bad])
    with pytest.raises(RewardFunctionError, match=r"weighted reward of sample 3 overflows float32"):
        combine_rewards([one], inputs, weights=[1e10])
    from rlhf_jax.config import ConfigError
    from rlhf_jax.rewards.registry import RewardConfig

    with pytest.raises(ConfigError, match=r"rewards.weights\[1\] \(of 'missing_eos'\) must be a finite number, got nan"):
        RewardConfig(functions=("task", "missing_eos"), weights=(1.0, float("nan")))
    with pytest.raises(ConfigError, match=r"rewards.error_penalty must be a finite number"):
        RewardConfig(error_penalty=float("-inf"))
    assert RewardConfig(functions=("task", "missing_eos"), weights=(1.0, -0.5)).weights == (1.0, -0.5)


def test_penalty_mode_penalizes_a_failing_one_sample_batch():
    """A batch of one sample (e.g. the last eval batch) that raises gets the penalty, as larger ones do."""
    def crash(completions, **kwargs):
        raise ValueError("cannot parse")

    inputs = _inputs(completions=("oops",), answers=("3",))
    result = combine_rewards([PythonReward(crash), PythonReward(lambda **kw: [0.5], name="half")], inputs,
                             on_error="penalty", error_penalty=-1.0)
    np.testing.assert_array_equal(result.total, [-0.5])
    assert result.num_errors == {"crash": 1, "half": 0}
    with pytest.raises(RewardFunctionError, match=r"'crash' raised ValueError: cannot parse"):
        combine_rewards([PythonReward(crash)], inputs)


def test_rollouts_refuse_an_eos_the_sampler_cannot_draw():
    from rlhf_jax.config import ConfigError
    from rlhf_jax.train.rollouts import _checked_eos

    class Tok:
        def __init__(self, eos):
            self.eos_token_id = eos

    assert _checked_eos(Tok(2), 64) == 2
    with pytest.raises(ConfigError, match=r"eos_token_id 64 is outside the model's vocabulary \[0, model.vocab_size=64\)"):
        _checked_eos(Tok(64), 64)
    with pytest.raises(ConfigError, match=r"no eos_token_id.*rollout.ignore_eos=true"):
        _checked_eos(Tok(None), 64)


def test_rollouts_stop_at_every_eos_id_of_the_model_config():
    """Qwen2.5-Instruct's tokenizer ends a turn with <|im_end|> (151645), its generation config at
    151645 and <|endoftext|> (151643), as transformers' generate and vLLM stop; rollouts stopped at the
    tokenizer's EOS only, so a policy emitting <|endoftext|> ran on past it into the reward."""
    from types import SimpleNamespace

    from rlhf_jax.models import presets
    from rlhf_jax.train.rollouts import RolloutCollector, RolloutConfig, model_stop_ids

    qwen = dataclasses.replace(presets.get_config("qwen2.5-1.5b"), eos_token_id=(151645, 151643))
    assert model_stop_ids(qwen) == (151645, 151643)
    assert model_stop_ids(dataclasses.replace(qwen, eos_token_id=None)) == ()

    def collector(rollout):
        config = SimpleNamespace(rollout=rollout, rewards=SimpleNamespace(on_error="raise", error_penalty=0.0))
        return RolloutCollector.from_config(config, sampler=SimpleNamespace(model=SimpleNamespace(config=qwen)),
                                            tokenizer=SimpleNamespace(eos_token_id=151645), sources=[], weights=None,
                                            group=2, temperature=1.0)

    made = collector(RolloutConfig())
    assert made.train_sampling.all_stop_ids == made.eval_sampling.all_stop_ids == (151643, 151645)
    assert collector(RolloutConfig(ignore_eos=True)).train_sampling.all_stop_ids == ()


def test_a_reward_function_without_kwargs_is_refused_when_wrapped():
    """TRL's convention: every function takes **kwargs; one that cannot would fail (or, in penalty mode, give
    every sample the penalty) on every call."""
    def strict(completions, answer):
        return [1.0] * len(completions)

    with pytest.raises(TypeError, match=r"reward function 'strict' must accept \*\*kwargs.*takes no \['prompts', "
                                        r"'completion_ids', 'prompt_ids', 'truncated'\]"):
        PythonReward(strict)

    def explicit(prompts, completions, completion_ids, prompt_ids, truncated, answer):
        return [float(c.endswith(a)) for c, a in zip(completions, answer)]

    result = combine_rewards([PythonReward(explicit)], _inputs())  # every keyword named: accepted
    np.testing.assert_array_equal(result.per_source["explicit"], [1.0, 0.0, 0.0, 0.0])


def _random_reward_model(**overrides):
    """A tiny scalar-head model with random weights everywhere (its scores differ row to row)."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax.models import CausalLM
    from rlhf_jax.testing import tiny_config

    model = CausalLM(tiny_config(eos_token_id=2, pad_token_id=0, **overrides), head="scalar")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape).astype(s.dtype)), model.abstract_params())
    return model, params


# Prompts of different lengths (right-padded); completions ending with EOS (2), cut by max_new_tokens,
# EOS alone, and EOS after one token.
_RM_PROMPTS = np.array([[1, 10, 11, 12, 13, 14], [1, 20, 0, 0, 0, 0], [1, 30, 31, 0, 0, 0], [1, 40, 41, 42, 0, 0]],
                       np.int32)
_RM_PROMPT_LENGTHS = np.array([6, 2, 3, 4], np.int32)
_RM_COMPLETIONS = np.array([[50, 51, 2, 0, 0], [60, 61, 62, 63, 64], [2, 0, 0, 0, 0], [70, 2, 0, 0, 0]], np.int32)
_RM_MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], bool)


def test_reward_model_scores_match_transformers_sequence_classification(tmp_path):
    """The score of prompt + completion (its EOS included, as TRL's PPO shows the RM the EOS) equals
    transformers' AutoModelForSequenceClassification score of the same token ids, for any batch size."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.hf import load_hf, save_hf
    from rlhf_jax.rewards import RewardModelReward

    model, params = _random_reward_model()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        save_hf(tmp_path / "rm", model.config, params)).eval()
    expected = []
    for b in range(len(_RM_PROMPTS)):
        ids = np.concatenate([_RM_PROMPTS[b, :_RM_PROMPT_LENGTHS[b]], _RM_COMPLETIONS[b, :_RM_MASK[b].sum()]])
        with torch.no_grad():
            expected.append(float(hf(input_ids=torch.tensor(ids[None], dtype=torch.long)).logits[0, 0]))
    assert np.ptp(expected) > 0.1
    config, loaded = load_hf(tmp_path / "rm")
    for batch_size in (1, 3, 8):
        rm = RewardModelReward(CausalLM(config, head="scalar"), loaded, policy_vocab_size=256, batch_size=batch_size)
        scores = rm.score(_RM_PROMPTS, _RM_PROMPT_LENGTHS, _RM_COMPLETIONS, _RM_MASK)
        assert scores.dtype == np.float32
        np.testing.assert_allclose(scores, expected, atol=2e-5, rtol=0)


def test_reward_model_names_token_ids_outside_its_vocabulary_and_ignores_padding_ids():
    """An id the reward model cannot read was scored NaN (>= vocab) or as another token (negative);
    an out-of-vocabulary padding id after the completion turned the row's score into NaN."""
    from rlhf_jax.rewards import RewardModelReward

    model, params = _random_reward_model()
    rm = RewardModelReward(model, params, policy_vocab_size=256, batch_size=2)
    args = (_RM_PROMPTS, _RM_PROMPT_LENGTHS, _RM_COMPLETIONS, _RM_MASK)
    clean = rm.score(*args)
    assert np.isfinite(clean).all()
    for bad, message in ((256, r"completion_tokens\[3, 0\] = 256 is not a token id of the reward model's vocabulary "
                               r"\[0, 256\) \(1 such tokens\)"),
                         (-1, r"completion_tokens\[3, 0\] = -1 is not a token id")):
        completions = _RM_COMPLETIONS.copy()
        completions[3, 0] = bad
        with pytest.raises(ValueError, match=message):
            rm.score(_RM_PROMPTS, _RM_PROMPT_LENGTHS, completions, _RM_MASK)
    prompts = _RM_PROMPTS.copy()
    prompts[2, 1] = 300
    with pytest.raises(ValueError, match=r"prompt_tokens\[2, 1\] = 300 is not a token id"):
        rm.score(prompts, _RM_PROMPT_LENGTHS, _RM_COMPLETIONS, _RM_MASK)
    with pytest.raises(ValueError, match=r"RewardModelReward: prompt_lengths\[1\] = 7 is outside \[1, P=6\]"):
        rm.score(_RM_PROMPTS, np.array([6, 7, 3, 4], np.int32), _RM_COMPLETIONS, _RM_MASK)
    # Padding (after each row's scored token, prompt or completion) is not read: any id there is fine.
    prompts, completions = _RM_PROMPTS.copy(), _RM_COMPLETIONS.copy()
    prompts[prompts == 0] = 999
    completions[~_RM_MASK] = 256
    np.testing.assert_array_equal(rm.score(prompts, _RM_PROMPT_LENGTHS, completions, _RM_MASK), clean)
    # A mask with holes (an agentic trajectory's action mask: observation tokens masked out before later
    # actions) is read up to its last 1, holes included; it was read at prompt + sum(mask) - 1, mid-row.
    full = np.ones_like(_RM_MASK)
    holed = full.copy()
    holed[1, 1] = holed[1, -1] = False
    holed[0, :2] = False
    cut = full.copy()
    cut[1, -1] = False
    np.testing.assert_array_equal(rm.score(_RM_PROMPTS, _RM_PROMPT_LENGTHS, _RM_COMPLETIONS, holed),
                                  rm.score(_RM_PROMPTS, _RM_PROMPT_LENGTHS, _RM_COMPLETIONS, cut))
    assert rm.score(_RM_PROMPTS, _RM_PROMPT_LENGTHS, _RM_COMPLETIONS, holed)[1] != \
        rm.score(_RM_PROMPTS, _RM_PROMPT_LENGTHS, _RM_COMPLETIONS, full)[1]


def test_reward_model_warns_once_when_a_sequence_exceeds_its_context():
    """Nothing is truncated: a prompt + completion longer than max_position_embeddings is scored whole,
    with one warning naming the length and the limit."""
    import warnings

    from rlhf_jax.rewards import RewardModelReward

    model, params = _random_reward_model(max_position_embeddings=8)
    rm = RewardModelReward(model, params, policy_vocab_size=256, batch_size=4)
    short = np.ones(4, np.int32)  # 1 prompt token + at most 5 completion tokens: 6 <= 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rm.score(_RM_PROMPTS, short, _RM_COMPLETIONS, _RM_MASK)
    with pytest.warns(UserWarning, match=r"prompt \+ completion of 9 tokens is longer than the reward model's "
                                         r"max_position_embeddings=8; it is scored whole"):
        rm.score(*(_RM_PROMPTS, _RM_PROMPT_LENGTHS, _RM_COMPLETIONS, _RM_MASK))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rm.score(_RM_PROMPTS, _RM_PROMPT_LENGTHS, _RM_COMPLETIONS, _RM_MASK)  # once per reward source
