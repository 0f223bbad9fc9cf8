"""LLM judges: the scoring formulas against hand values, templates' one-line errors, and the judge model's
logits against a plain forward of the same prompt (tiny random model, offline tokenizer)."""

import jax
import numpy as np
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.models import CausalLM
from rlhf_jax.rewards import RewardInputs, combine_rewards
from rlhf_jax.rewards.judges import (
    JudgeModel,
    PairwiseJudge,
    PairwiseJudgeReward,
    PairwiseTemplate,
    PointwiseJudge,
    PointwiseTemplate,
    choice_probability,
    debiased_preference,
    expected_rating,
    round_robin_win_rate,
)
from rlhf_jax.testing import offline_tokenizer, tiny_config


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_choice_probability_and_debiased_preference_golden():
    assert float(choice_probability(2.0, 0.0)) == pytest.approx(0.8807970779778823, abs=1e-7)
    p, consistent = debiased_preference(np.array([[2.0, 0.0], [3.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 2.0]]))
    # Row 0: first in A -> sigmoid(2) = 0.8808; first in B -> sigmoid(0 - 1) = 0.2689: they disagree.
    # Row 1: sigmoid(2) = 0.8808 and sigmoid(2 - 0) = 0.8808: both prefer the first response.
    np.testing.assert_allclose(np.asarray(p), [(_sigmoid(2) + _sigmoid(-1)) / 2, _sigmoid(2)], atol=1e-6)
    assert np.asarray(consistent).tolist() == [False, True]


@pytest.mark.parametrize("bias", [-3.0, 0.0, 1.5])
def test_debiased_preference_cancels_a_constant_position_bias(bias):
    s = np.array([-1.0, 0.0, 0.7])  # the judge's unbiased log-odds that the first response is better
    ab = np.stack([s + bias, np.zeros(3)], axis=1)   # first shown as A: l_A - l_B = s + c
    ba = np.stack([-s + bias, np.zeros(3)], axis=1)  # first shown as B: l_A - l_B = -s + c
    p, _ = debiased_preference(ab, ba)
    expected = (_sigmoid(s + bias) + _sigmoid(s - bias)) / 2
    np.testing.assert_allclose(np.asarray(p), expected, atol=1e-6)
    assert float(p[1]) == pytest.approx(0.5, abs=1e-7)  # equal responses: exactly 1/2 whatever the bias


def test_expected_rating_and_round_robin_golden():
    logits = np.log(np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(np.asarray(expected_rating(logits, np.array([1.0, 2.0, 3.0]))), [14 / 6, 2.0], atol=1e-6)
    pref = np.zeros((1, 3, 3))
    pref[0, 0, 1], pref[0, 0, 2], pref[0, 1, 2] = 0.9, 0.6, 0.3
    np.testing.assert_allclose(round_robin_win_rate(pref, 3), [0.75, 0.2, 0.55], atol=1e-6)


def test_templates_name_the_missing_placeholder():
    with pytest.raises(ConfigError, match=r"judge.template.text: the template lacks the placeholder \{response_b\}"):
        PairwiseTemplate(text="{prompt} {response_a}?")
    with pytest.raises(ConfigError, match=r"judge.template.text: the template lacks the placeholder \{response\}"):
        PointwiseTemplate(text="rate {prompt}")
    with pytest.raises(ConfigError, match=r"unknown placeholder \{answer\}"):
        PointwiseTemplate(text="{prompt}{response}{answer}")
    with pytest.raises(ConfigError, match=r"principles are set but the template has no \{principle\}"):
        PairwiseTemplate(text="{prompt}{response_a}{response_b}", principles=("be brief",))
    for bad in ("be brief", ("be brief", ""), ("be brief", 3)):   # a string was read letter by letter
        with pytest.raises(ConfigError, match=r"principles must be a list of non-empty principle texts, got"):
            PairwiseTemplate(text="{prompt}{response_a}{response_b}{principle}", principles=bad)
    with pytest.raises(ConfigError, match="judge.template.values"):
        PointwiseTemplate(ratings=("good", "bad"))
    assert PairwiseTemplate(text="{prompt}|{response_a}|{response_b}|{principle}").render("p", "x", "y", "kind") == \
        "p|x|y|kind"


@pytest.fixture(scope="module")
def judge_model():
    model = CausalLM(tiny_config())
    return JudgeModel(model, model.init(jax.random.key(0)), offline_tokenizer(), batch_size=4, pad_to=16)


def test_judge_logits_equal_a_plain_forward(judge_model):
    texts = ["ab:", "a much longer judge prompt:"]
    ids = [judge_model.token_id("A", key="k"), judge_model.token_id("B", key="k")]
    got = judge_model.choice_logits(texts, ids)
    for text, row in zip(texts, got):
        tokens = judge_model.encode([text])[0]
        assert tokens[0] == judge_model.tokenizer.bos_token_id  # prompts encode like the SFT data's
        logits = judge_model.model.forward(judge_model.params, np.asarray([tokens])).logits[0, -1]
        np.testing.assert_allclose(row, np.asarray(logits)[ids], atol=1e-4)
    with pytest.raises(ConfigError, match=r"judge.template.choices\[0\]: 'AB' is 2 tokens"):
        PairwiseJudge(judge_model, PairwiseTemplate(choices=("AB", "B")))


def test_pairwise_judge_is_antisymmetric_and_a_group_reward(judge_model):
    template = PairwiseTemplate(text="{prompt}{response_a}/{response_b}{principle}=", principles=("!", "?"))
    judge = PairwiseJudge(judge_model, template)
    prompts, x, y = ["ab:", "cd:", "ef:"], ["mako", "zz", "q"], ["nedu", "ae", "q"]
    forward, backward = judge.prefer(prompts, x, y), judge.prefer(prompts, y, x)
    np.testing.assert_allclose(forward.prob_first, 1 - backward.prob_first, atol=1e-6)
    assert forward.prob_first[2] == pytest.approx(0.5, abs=1e-6)  # a response against itself
    assert set(forward.metrics()) == {"judge/position_consistency", "judge/prob_first_mean", "judge/position_bias"}
    # As a GRPO reward: the win rates of a group of G sum to G / 2.
    completions = ["mako", "zz", "q", "ae", "ba", "xo"]
    inputs = RewardInputs(prompt_tokens=np.zeros((6, 2), np.int32), prompt_lengths=np.ones(6, np.int32),
                          completion_tokens=np.zeros((6, 2), np.int32), completion_mask=np.ones((6, 2), bool),
                          truncated=np.zeros(6, bool), prompts=["ab:"] * 3 + ["cd:"] * 3, completions=completions)
    rewards = combine_rewards([PairwiseJudgeReward(judge, 3)], inputs).total
    np.testing.assert_allclose(rewards.reshape(2, 3).sum(axis=1), [1.5, 1.5], atol=1e-5)


def test_pointwise_judge_expected_rating_and_reward_source(judge_model):
    judge = PointwiseJudge(judge_model, PointwiseTemplate(text="{prompt}{response}#", ratings=("1", "2", "3")))
    scores = judge.score(["ab:", "cd:"], ["mako", "zz"])
    ids = [judge_model.token_id(r, key="k") for r in ("1", "2", "3")]
    logits = judge_model.choice_logits(["ab:mako#", "cd:zz#"], ids)
    np.testing.assert_allclose(scores, np.asarray(expected_rating(logits, np.array([1.0, 2.0, 3.0]))), atol=1e-6)
    assert np.all((scores > 1) & (scores < 3))
    inputs = RewardInputs(prompt_tokens=np.zeros((2, 2), np.int32), prompt_lengths=np.ones(2, np.int32),
                          completion_tokens=np.zeros((2, 2), np.int32), completion_mask=np.ones((2, 2), bool),
                          truncated=np.zeros(2, bool), prompts=["ab:", "cd:"], completions=["mako", "zz"])
    result = combine_rewards([judge], inputs)
    np.testing.assert_allclose(result.per_source["judge"], scores, atol=1e-6)


def test_judge_is_a_builtin_reward_by_name(judge_model, tmp_path):
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.config import CheckpointConfig
    from rlhf_jax.rewards.registry import RewardConfig, RewardContext, build_rewards

    with Checkpointer(tmp_path / "judge", config=CheckpointConfig(async_save=False),
                      model_config=judge_model.model.config) as ck:
        ck.save(0, {"params": judge_model.params})
    template = PointwiseTemplate(text="{prompt}{response}#", ratings=("1", "2", "3"))
    config = RewardConfig(functions=("judge",), judge=str(tmp_path / "judge"), judge_tokenizer="offline",
                          judge_template=template, reward_model_batch_size=4)
    (source,), _ = build_rewards(RewardContext(config, 8))
    assert isinstance(source, PointwiseJudge) and source.name == "judge"
    expected = PointwiseJudge(judge_model, template).score(["ab:", "cd:"], ["mako", "zz"])
    np.testing.assert_allclose(source.score(["ab:", "cd:"], ["mako", "zz"]), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="rewards.functions includes 'judge' but rewards.judge is not set"):
        build_rewards(RewardContext(RewardConfig(functions=("judge",)), 8))


# --- audit: a broken judge, prompts longer than max_len ---

def test_pairwise_judge_refuses_non_finite_logits_and_warns_on_cut_prompts(judge_model):
    broken = jax.tree.map(lambda x: x * np.nan, judge_model.params)
    judge = PairwiseJudge(JudgeModel(judge_model.model, broken, judge_model.tokenizer, batch_size=4, pad_to=16),
                          PairwiseTemplate(text="{prompt}{response_a}|{response_b}>"))
    # NaN logits gave prob_first NaN, which every caller read as "the second response is better".
    with pytest.raises(ValueError, match=r"PairwiseJudge.prefer: the judge's answer logits are not finite for 2 of 2 "
                                         r"pairs \(the first is pair 0\)"):
        judge.prefer(["ab:", "cd:"], ["x", "y"], ["z", "w"])
    short = JudgeModel(judge_model.model, judge_model.params, judge_model.tokenizer, batch_size=4, pad_to=16, max_len=8)
    with pytest.warns(UserWarning, match=r"1 of 2 judge prompts are longer than max_len=8 tokens and lose their "
                                         r"beginning \(the first is prompt 1\)"):
        rows = short.encode(["ab:", "a much longer judge prompt:"])
    assert [len(r) for r in rows] == [4, 8]
