"""The shaping rewards of long chain-of-thought RL: "cosine_length", "repetition", "tag_count".

Golden values are worked out by hand from the formulas of Yeo et al. 2025 ("Demystifying Long
Chain-of-Thought Reasoning in LLMs") as open-r1 gives them (`get_cosine_scaled_reward`,
`get_repetition_penalty_reward`, `tag_count_reward` in huggingface/open-r1 `src/open_r1/rewards.py`).
No model, no jit.
"""

import math

import numpy as np
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.rewards import RewardInputs, combine_rewards, reward_metrics
from rlhf_jax.rewards import math_answers as ma
from rlhf_jax.rewards.registry import REWARD_FUNCTIONS, RewardConfig, RewardContext, build_rewards
from rlhf_jax.rewards.shaping import CosineLengthReward, cosine_scaled, ngram_repetition, repetition_penalty

COS_QUARTER = (1 + math.sqrt(0.5)) / 2  # (1 + cos(pi/4)) / 2
COS_3_QUARTERS = (1 - math.sqrt(0.5)) / 2  # (1 + cos(3 pi/4)) / 2


def _inputs(completions, lengths, width=8, **columns):
    n = len(completions)
    mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    return RewardInputs(prompt_tokens=np.ones((n, 2), np.int32), prompt_lengths=np.full(n, 2, np.int32),
                        completion_tokens=np.where(mask, 5, 0).astype(np.int32), completion_mask=mask,
                        truncated=np.asarray(lengths) >= width, completions=completions, columns=columns)


@pytest.mark.parametrize("length,correct,expected", [
    (0, True, 1.0), (2, True, 0.5 + 0.5 * COS_QUARTER), (4, True, 0.75), (6, True, 0.5 + 0.5 * COS_3_QUARTERS),
    (8, True, 0.5), (16, True, 0.5),  # past max_len: the end value (open-r1's cosine turned back up to 1.0)
    (0, False, -1.0), (2, False, -0.5 - 0.5 * COS_QUARTER), (4, False, -0.75), (8, False, -0.5), (16, False, -0.5),
])
def test_cosine_scaled_golden_values(length, correct, expected):
    assert cosine_scaled(length, 8, correct) == pytest.approx(expected, abs=1e-15)


def test_cosine_scaled_with_the_papers_values():
    # Yeo et al.'s values (eddycmu/demystify-long-cot, Sec. 4.2 cosine scripts: correct 2 -> 1, wrong
    # -10 -> 0) at half the budget: the midpoints.
    values = dict(min_value_wrong=-10.0, max_value_wrong=0.0, min_value_correct=1.0, max_value_correct=2.0)
    assert cosine_scaled(50, 100, True, **values) == pytest.approx(1.5)
    assert cosine_scaled(50, 100, False, **values) == pytest.approx(-5.0)
    assert cosine_scaled(0, 100, False, **values) == -10.0


def test_cosine_length_reward_by_name_counts_tokens_and_reads_the_math_verdict():
    completions = ["\\boxed{2}", "\\boxed{3}", "", "The answer is 2.", "\\boxed{2}", "so \\boxed{\\frac{",
                   "\\boxed{2}" + " and so on" * 100]
    lengths = [2, 4, 0, 8, 2, 6, 1]
    answers = ["2", "2", "2", "2", "", "2", "#### 2"]
    config = RewardConfig(functions=("cosine_length",))
    (source,), weights = build_rewards(RewardContext(config, 8))  # max_len: rollout.max_new_tokens
    assert source.name == "cosine_length" and weights is None and source.max_len == 8
    inputs = _inputs(completions, lengths, answer=answers)
    out = source(inputs)
    expected = [0.5 + 0.5 * COS_QUARTER,  # correct, 2 of 8 tokens
                -0.75,  # wrong, half the budget
                -1.0,  # empty: no answer, wrong at length 0
                0.5,  # correct at exactly max_len
                0.0,  # the reference has no parsable answer: 0, counted
                -0.5 - 0.5 * COS_3_QUARTERS,  # unparsable answer: wrong
                1.0 - 0.25 * (1 - math.cos(math.pi / 8))]  # 1009 characters but 1 token: near the top
    np.testing.assert_allclose(out.rewards, expected, rtol=0, atol=1e-12)
    assert out.counts["bad_references"] == 1
    # Correctness is exactly the "math" reward's verdict (rows with a parsable reference).
    math_rewards = ma.MathReward()(inputs).rewards
    assert [r > 0 for r in out.rewards] == [m == 1.0 for m in math_rewards]
    metrics = reward_metrics(combine_rewards([source], inputs))
    assert metrics["rewards/cosine_length/bad_references"] == 1.0
    # The TRL-style function gives the same rewards from completion_ids.
    trl = CosineLengthReward(max_len=8).function()
    ids = [[7] * n for n in lengths]
    np.testing.assert_allclose(trl(completions=completions, completion_ids=ids, answer=answers), expected, atol=1e-12)


def test_cosine_length_settings():
    config = RewardConfig(functions=("cosine_length",), cosine_max_len=4, cosine_min_value_wrong=-2.0,
                          cosine_max_value_wrong=0.0, cosine_min_value_correct=1.0, cosine_max_value_correct=3.0)
    (source,), _ = build_rewards(RewardContext(config, 8, prompt_columns={"data.train p.jsonl": ("solution",)}))
    out = source(_inputs(["\\boxed{5}", "\\boxed{5}", "4", "4"], [2, 6, 2, 8], solution=["$\\boxed{5}$"] * 4))
    assert out.rewards == pytest.approx([2.0, 1.0, -1.0, 0.0])  # 2 of 4 tokens: midpoints; past 4 tokens: the end
    assert source.timeout_s == 5
    with pytest.raises(ConfigError, match=r"^rewards.functions 'cosine_length' needs a reference answer column, "
                                          r"one of \['answer', 'solution'\], in the prompts: data.eval e.jsonl"):
        build_rewards(RewardContext(RewardConfig(functions=("cosine_length",)), 8,
                                    prompt_columns={"data.eval e.jsonl": ("id",)}))


@pytest.mark.parametrize("text,n,expected", [
    ("", 3, 0.0),
    ("a b", 3, 0.0),  # shorter than n words
    ("a b c", 3, 0.0),  # exactly n words: one n-gram
    ("a b c a b c", 3, 0.25),  # abc bca cab abc: 3 unique of 4
    ("a\nb\tc  a b c", 3, 0.25),  # any whitespace splits words
    ("The cat the CAT the cat", 3, 0.5),  # lowercased: 2 unique of 4
    ("x x x x x", 3, 2 / 3),
    ("a a b", 1, 1 / 3),
])
def test_ngram_repetition_golden_values(text, n, expected):
    assert ngram_repetition(text, n) == pytest.approx(expected, abs=1e-15)


def test_repetition_by_name_and_settings():
    config = RewardConfig(functions=("repetition",), repetition_n_grams=1, repetition_max_penalty=2.0)
    (source,), _ = build_rewards(RewardContext(config, 8))
    assert source.name == "repetition"
    out = source(_inputs(["a a b", "a b", ""], [3, 2, 0]))
    assert out == pytest.approx([-2 / 3, 0.0, 0.0])
    assert math.copysign(1.0, out[1]) == 1.0  # +0.0, not -0.0
    (default,), _ = build_rewards(RewardContext(RewardConfig(functions=("repetition",)), 8))
    assert default(_inputs(["a b c a b c", "a b"], [6, 2])) == pytest.approx([-0.25, 0.0])  # n=3, amount 1


@pytest.mark.parametrize("text,expected", [
    ("<think>\nx\n</think>\n<answer>\n1\n</answer>", 1.0),
    ("<think>\nx\n</think>\n<answer>\n1\n</answer>\ntrailing", 1.0),  # substrings: text after counts nothing
    ("<think>x</think><answer>1</answer>", 0.0),
    ("<think>\nx</think>\n<answer>\n1</answer>", 0.5),  # "<think>\n" and "\n<answer>\n" only
    ("<think>\na\n</think>\n<think>\nb\n</think>\n<answer>\n1\n</answer>", 0.5),  # think tags twice: no credit
    ("", 0.0),
    ("\n</answer>", 0.25),
])
def test_tag_count_golden_values(text, expected):
    (source,), _ = build_rewards(RewardContext(RewardConfig(functions=("tag_count",)), 8))
    assert source.name == "tag_count"
    assert source(_inputs([text], [1])) == [expected]


def test_think_format_against_open_r1_format_reward():
    """Ours is DeepSeek-R1's template, whitespace-insensitive and whole-text; open-r1's `format_reward`
    (since its PR #418) demands the four newlines and, by its MULTILINE `$`, accepts text after a line
    end; tag_count gives those newline-exact tags partial credit."""
    texts = ["<think>\na\n</think>\n<answer>\n1\n</answer>",  # both 1
             "<think>a</think> <answer>1</answer>",  # open-r1 0 (no newlines)
             "<think>\na\n</think>\n<answer>\n1\n</answer>\njunk",  # open-r1 1 (MULTILINE $)
             "<think>\na\n</think>\n<answer>\n1\n</answer>\n<answer>\n2\n</answer>"]  # open-r1 1
    assert ma.think_answer_format(texts) == [1.0, 1.0, 0.0, 0.0]
    assert ma.tag_count(texts) == [1.0, 0.0, 1.0, 0.5]  # the answer tags twice: no credit for them


def test_registry_names_and_combination():
    assert {"cosine_length", "repetition", "tag_count"} <= set(REWARD_FUNCTIONS)
    config = RewardConfig(functions=("cosine_length", "repetition", "tag_count", "think_format"),
                          weights=(1.0, 1.0, 0.5, 0.5))
    sources, weights = build_rewards(RewardContext(config, 8))
    assert [s.name for s in sources] == ["cosine_length", "repetition", "tag_count", "think_format"]
    text = "<think>\na b c a b c\n</think>\n<answer>\n4\n</answer>"
    result = combine_rewards(sources, _inputs([text], [4], answer=["4"]), weights=weights)
    # 4 tokens of 8, correct: 0.75; "<think> a b c a b c </think> <answer> 4 </answer>": 11 words, 9
    # trigrams, (a b c) twice: -1/9; tags 1 and format 1, each weighed 0.5.
    np.testing.assert_allclose([result.per_source[s.name][0] for s in sources], [0.75, -1 / 9, 1.0, 1.0])
    assert result.total[0] == pytest.approx(0.75 - 1 / 9 + 0.5 + 0.5, abs=1e-6)


@pytest.mark.parametrize("settings,message", [
    ({"cosine_max_len": 16}, 'rewards.cosine_max_len=16 has no effect unless rewards.functions holds "cosine_length"'),
    ({"cosine_min_value_wrong": -2.0}, "rewards.cosine_min_value_wrong=-2.0 has no effect unless"),
    ({"cosine_max_value_correct": 2.0}, "rewards.cosine_max_value_correct=2.0 has no effect unless"),
    ({"repetition_n_grams": 4}, 'rewards.repetition_n_grams=4 has no effect unless rewards.functions holds '
                                '"repetition"'),
    ({"repetition_max_penalty": 0.5}, "rewards.repetition_max_penalty=0.5 has no effect unless"),
])
def test_a_setting_without_its_function_is_refused(settings, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        RewardConfig(functions=("task",), **settings)


@pytest.mark.parametrize("function,settings,message", [
    ("cosine_length", {"cosine_max_value_correct": math.nan},
     "rewards.cosine_max_value_correct must be a finite number, got nan"),
    ("cosine_length", {"cosine_min_value_wrong": -math.inf},
     "rewards.cosine_min_value_wrong must be a finite number, got -inf"),
    # open-r1's GRPOScriptArguments default (0.0 with max -0.5): long wrong answers would lose more.
    ("cosine_length", {"cosine_min_value_wrong": 0.0},
     "rewards.cosine_min_value_wrong 0.0 > rewards.cosine_max_value_wrong -0.5: min_value_wrong must be <= "
     "max_value_wrong (the reward of a wrong answer at length 0 is its minimum)"),
    ("cosine_length", {"cosine_min_value_correct": 1.5},
     "rewards.cosine_min_value_correct 1.5 > rewards.cosine_max_value_correct 1.0: min_value_correct must be <= "
     "max_value_correct (the reward of a correct answer at max_len is its minimum)"),
    ("cosine_length", {"cosine_max_len": 0}, "rewards.cosine_max_len must be a positive int, got 0"),
    ("cosine_length", {"cosine_max_len": 2.5}, "rewards.cosine_max_len must be a positive int, got 2.5"),
    ("repetition", {"repetition_n_grams": 0},
     "rewards.repetition_n_grams must be a positive int (words per n-gram), got 0"),
    ("repetition", {"repetition_n_grams": True},
     "rewards.repetition_n_grams must be a positive int (words per n-gram), got True"),
    ("repetition", {"repetition_max_penalty": math.inf},
     "rewards.repetition_max_penalty must be a finite number >= 0, got inf"),
    ("repetition", {"repetition_max_penalty": -1.0},
     "rewards.repetition_max_penalty must be >= 0 (the amount subtracted, as missing_eos_penalty), got -1.0: "
     "open-r1's repetition_max_penalty=-1.0 is 1.0 here"),
])
def test_bad_values_are_refused_naming_the_key(function, settings, message):
    with pytest.raises(ConfigError) as e:
        RewardConfig(functions=(function,), **settings)
    assert str(e.value) == message


def test_bad_arguments_of_the_functions_are_refused():
    with pytest.raises(ValueError, match=r"^repetition_penalty: n_grams must be a positive int"):
        repetition_penalty(n_grams=0)
    with pytest.raises(ValueError, match=r"^repetition_penalty: max_penalty must be >= 0"):
        repetition_penalty(max_penalty=-1.0)
    with pytest.raises(ValueError, match=r"^CosineLengthReward.max_len must be a positive int \(tokens\), got 0"):
        CosineLengthReward(max_len=0)
    with pytest.raises(ValueError, match=r"^CosineLengthReward.min_value_correct 2.0 > CosineLengthReward."
                                         r"max_value_correct 1.0"):
        CosineLengthReward(max_len=8, min_value_correct=2.0)
    with pytest.raises(TypeError, match=r"^repetition: completion 0 is a NoneType"):
        repetition_penalty().fn([None])
    with pytest.raises(TypeError, match=r"^tag_count: completion 0 is a list"):
        ma.tag_count([[{"role": "assistant", "content": "x"}]])
    with pytest.raises(TypeError, match=r"^cosine_length: completion 0 is a NoneType"):
        CosineLengthReward(max_len=8).rewards([None], [1], ["1"])
