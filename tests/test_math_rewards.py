"""The math checker (reward "math"), format rewards, GSM8K/MATH prompt rows, reward import paths.

The equivalence table pins what `math_equal` accepts and rejects: GSM8K "#### x" solutions, MATH
`\\boxed{}` solutions, fractions, decimals, LaTeX `\\frac`/`\\dfrac`, units and `\\text{}` stripped,
symbolic equality, and wrong answers (off by one, swapped fraction, wrong sign, no answer).
"""

import sys

import numpy as np
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.data import formats
from rlhf_jax.rewards import RewardInputs, ScoredRewards, combine_rewards, reward_metrics
from rlhf_jax.rewards import math_answers as ma
from rlhf_jax.rewards.registry import RewardConfig, RewardContext, build_rewards, resolve_import

# (reference column, completion, equal?)
EQUIVALENCE = [
    # final-answer extraction
    ("42", "The answer is 42.", True),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "She sold 72 clips in all. #### 72", True),
    ("#### 1,000", "1000", True),
    ("#### 1,000", "So the total is\n#### 1000", True),
    ("#### 72 clips", "72", True),  # a unit word after GSM8K's number (was: parsed as 72*c*l*i*p*s)
    ("#### 72 clips", "73", False),
    ("18", "#### 18\nCheck: 19", True),
    ("3", "the final answer is $3$", True),
    ("7", "2+5=7", True),
    ("12", "$12$ apples", True),
    ("The solution ... so it is \\boxed{\\frac{\\sqrt{2}}{2}}.", "\\boxed{\\frac{1}{\\sqrt{2}}}", True),
    ("6", "\\boxed{\\frac{12}{2}}", True),
    # fractions and decimals
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{1}{2}", "$\\frac12$", True),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", True),
    ("0.25", "\\boxed{1/4}", True),
    ("1/3", "\\boxed{\\frac{1}{3}}", True),
    ("3/4", "0.75", True),
    ("1.5", "\\boxed{\\frac{3}{2}}", True),
    ("10", "10.0", True),
    ("-2", "\\boxed{-2}", True),
    # units, currency, percent
    ("10", "10.00 dollars", True),
    ("5", "\\boxed{5 \\text{ cm}}", True),
    ("5", "\\boxed{5\\text{ meters}}", True),
    ("\\$18", "\\boxed{18}", True),
    ("50\\%", "\\boxed{50\\%}", True),
    # symbolic
    ("x+1", "\\boxed{1+x}", True),
    ("2x", "\\boxed{x\\cdot 2}", True),
    ("\\sqrt{8}", "\\boxed{2\\sqrt{2}}", True),
    ("\\pi", "\\boxed{\\pi}", True),
    ("(1,2)", "\\boxed{(1, 2)}", True),
    ("2^{10}", "\\boxed{1024}", True),
    # wrong answers rejected
    ("42", "The answer is 43.", False),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", False),
    ("0.5", "0.51", False),
    ("#### 72", "#### 27", False),
    ("x+1", "\\boxed{x-1}", False),
    ("5", "\\boxed{-5}", False),
    ("3/4", "\\boxed{4/3}", False),
    ("10", "I don't know", False),
    ("12", "", False),
    ("\\sqrt{2}", "\\boxed{2}", False),
    ("7", "\\boxed{7} but wait, \\boxed{8}", False),
    ("8", "\\boxed{7} but wait, \\boxed{8}", True),  # the last box counts (was: the set {7, 8})
    ("100", "10", False),
    # R1 answer tags: the tag's content is the answer, not a number in the reasoning
    ("10", "<answer>10</answer>", True),
    ("10", "<think>it is 9 or 10</think><answer>9</answer>", False),
    ("9", "<think>it is 9 or 10</think>\n<answer>\n9\n</answer>", True),
    ("4", "<answer></answer> 4", False),
    # scientific notation is the number it writes, not its mantissa
    ("1500", "The answer is 1.5e3", True),
    ("1.5", "The answer is 1.5e3", False),
    ("1", "1e3", False),
    ("0.025", "x = 2.5E-2", True),
    # \fbox is a box like \boxed; the unbraced "\boxed 5" reads one token
    ("2", "\\boxed{1} \\fbox{2}", True),
    ("2", "so \\fbox{2} then 3", True),
    ("so $\\boxed 5$. In the set {x}", "5", True),
]


def test_the_table_has_forty_cases_both_ways():
    assert len(EQUIVALENCE) >= 40
    assert sum(not want for *_, want in EQUIVALENCE) >= 10


@pytest.mark.parametrize("gold,completion,want", EQUIVALENCE, ids=[f"{i}" for i in range(len(EQUIVALENCE))])
def test_math_equal_table(gold, completion, want):
    assert ma.math_equal(gold, completion) is want


def test_gold_and_final_answer_extraction():
    assert ma.gold_answer("Janet ... 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 1,234") == "1234"
    assert ma.gold_answer("so $x = \\boxed{\\frac{a}{\\sqrt{b}}}$.") == "\\frac{a}{\\sqrt{b}}"
    assert ma.gold_answer("  7 ") == "7"
    assert ma.last_boxed("\\boxed{1} and \\fbox{{2}}") == "{2}"
    assert ma.last_boxed("\\boxed{unclosed") is None
    assert ma.gold_answer("so $\\boxed 5$. In the set {x}") == "5"  # was "x"
    assert ma.last_boxed("\\boxed 18.") == "18" and ma.last_boxed("\\boxedx") is None
    assert ma.final_answer("<think>7</think><answer>#### 8\nok</answer> 9") == "8"
    assert ma.extract_answer("<answer> 5 </answer>") == "5" and ma.extract_answer("<answer> </answer>") is None
    assert ma.final_answer("work #### 5\nmore") == "5"
    assert ma.extract_answer("so the answer is 12.") == "12"
    assert ma.extract_answer("Answer: $3/4$") == "3/4"
    assert ma.extract_answer("#### 8") == "8"
    assert ma.extract_answer("I think 5 maybe") is None


def test_format_rewards():
    texts = ["<think>2+2</think> <answer>4</answer>", "<answer>4</answer>", "<think>a</think><answer>4</answer> extra",
             "\\boxed{4}", "#### 4", "the answer is 4", "four"]
    assert ma.think_answer_format(texts) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert ma.answer_format(texts) == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # Multiline contents match; a repeated or nested block does not (nothing else but one of each).
    assert ma.think_answer_format([
        "<think>\na\nb\n</think>\n\n<answer>\n3\n</answer>\n",
        "<think>a</think><answer>1</answer><think>b</think><answer>2</answer>",
        "<think>a</think><answer>1</answer> junk <answer>2</answer>",
        "<think><think>x</think></think><answer>1</answer>",
    ]) == [1.0, 0.0, 0.0, 0.0]


def _inputs(completions, **columns):
    n = len(completions)
    return RewardInputs(prompt_tokens=np.ones((n, 2), np.int32), prompt_lengths=np.full(n, 2, np.int32),
                        completion_tokens=np.ones((n, 3), np.int32), completion_mask=np.ones((n, 3), bool),
                        truncated=np.zeros(n, bool), completions=completions, columns=columns)


def test_failing_and_timed_out_samples_score_zero_and_are_counted(monkeypatch):
    import math_verify

    real = ma._Checker.equal

    def flaky(self, gold, prediction):
        if "slow" in prediction:
            raise math_verify.errors.TimeoutException("Operation timed out!")
        if "boom" in prediction:
            raise RecursionError("sympy blew up")
        return real(self, gold, prediction)

    monkeypatch.setattr(ma._Checker, "equal", flaky)
    inputs = _inputs(["#### 4", "slow 4", "boom 4", "#### 5"], answer=["4", "4", "4", "4"])
    out = ma.MathReward()(inputs)
    assert isinstance(out, ScoredRewards)
    assert out.rewards == [1.0, 0.0, 0.0, 0.0] and out.counts == {"failures": 1, "timeouts": 1, "bad_references": 0}
    # Through the combination, in the default on_error="raise" mode: the run goes on, counts logged.
    result = combine_rewards([ma.MathReward()], inputs)
    np.testing.assert_array_equal(result.total, [1, 0, 0, 0])
    metrics = reward_metrics(result)
    assert metrics["rewards/math/failures"] == 1 and metrics["rewards/math/timeouts"] == 1
    assert metrics["rewards/math/num_errors"] == 0 and metrics["rewards/math/mean"] == 0.25


def test_math_verify_timeout_is_a_counted_timeout(monkeypatch):
    import time

    import math_verify.parser

    real = math_verify.parser.extract_target_from_pred

    def hang(pred, *args, **kwargs):
        if "hang" in pred:
            time.sleep(3)
        return real(pred, *args, **kwargs)

    monkeypatch.setattr(math_verify.parser, "extract_target_from_pred", hang)
    out = ma.MathReward(timeout_s=1)(_inputs(["hang"], answer=["4"]))
    assert out.rewards == [0.0] and out.counts == {"failures": 0, "timeouts": 1, "bad_references": 0}


def test_bad_references_are_counted_apart_and_bad_completions_raise():
    # A None or unparsable reference is a data problem: 0, counted as bad_references (was: None
    # scored 0 uncounted, an unparsable one counted among the model's failures).
    out = ma.MathReward()(_inputs(["4", "4", "4", "1e1001"], answer=[None, "", "4", "1"]))
    assert out.rewards == [0.0, 0.0, 1.0, 0.0]
    assert out.counts == {"failures": 1, "timeouts": 0, "bad_references": 2}
    with pytest.raises(ma.BadReference, match="cannot parse the reference answer ''"):
        ma.math_equal("", "4")
    # A completion that is not a string is the caller's error, named (was: 0, counted as a failure).
    with pytest.raises(TypeError, match=r"^math: completion 1 is a NoneType, not a string"):
        ma.MathReward()(_inputs(["4", None], answer=["4", "4"]))
    with pytest.raises(TypeError, match=r"^math_reward: completion 0 is a list, not a string"):
        ma.math_reward([[{"role": "assistant", "content": "4"}]], answer=["4"])
    with pytest.raises(TypeError, match=r"^think_format: completion 0 is a NoneType"):
        ma.think_answer_format([None])
    with pytest.raises(ValueError, match="^math_reward: 2 completions but 1 reference answers"):
        ma.math_reward(["4", "5"], answer=["4"])


def test_reference_columns_and_missing_column():
    reward = ma.MathReward()
    assert reward(_inputs(["\\boxed{2}"], solution=["$1+1=\\boxed{2}$"])).rewards == [1.0]
    assert ma.math_reward(["#### 3"], answer=["#### 3"]) == [1.0]
    with pytest.raises(KeyError, match=r"math: the prompts have none of the answer columns \['answer', 'solution'\]"):
        reward(_inputs(["1"], gold=["1"]))
    with pytest.raises(KeyError, match="no column 'gold'"):
        ma.MathReward(column="gold")(_inputs(["1"], answer=["1"]))
    with pytest.raises(ValueError, match="timeout_s"):
        ma.MathReward(timeout_s=0.5)


def test_missing_math_verify_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ImportError, match="needs the math-verify package: pip install math-verify"):
        ma.math_equal("1", "1")


def test_rewards_by_name_and_by_import_path():
    config = RewardConfig(functions=("math", "think_format", "answer_format", "rlhf_jax.rewards.math_answers:math_reward"))
    sources, weights = build_rewards(RewardContext(config, 16))
    assert [s.name for s in sources] == ["math", "think_format", "answer_format", "math_reward"]
    result = combine_rewards(sources, _inputs(["<think>1+1</think><answer>\\boxed{2}</answer>", "3"], answer=["2", "2"]))
    np.testing.assert_array_equal(result.per_source["math"], [1, 0])
    np.testing.assert_array_equal(result.per_source["think_format"], [1, 0])
    np.testing.assert_array_equal(result.per_source["answer_format"], [1, 0])
    np.testing.assert_array_equal(result.per_source["math_reward"], [1, 0])
    with pytest.raises(ConfigError, match="math_timeout_s"):
        RewardConfig(functions=("math",), math_timeout_s=0)


@pytest.mark.parametrize("path,message", [
    ("no_such_module_xyz:fn", "rewards.functions: cannot import module 'no_such_module_xyz' of 'no_such_module_xyz:fn'"),
    ("rlhf_jax.rewards.math_answers:nope", "rewards.functions: 'rlhf_jax.rewards.math_answers' has no function 'nope'"),
    ("rlhf_jax.rewards:", "rewards.functions: 'rlhf_jax.rewards:' is not an import path"),
])
def test_bad_import_path_is_one_line_naming_the_key(path, message):
    with pytest.raises(ConfigError) as err:
        resolve_import(path)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_import_path_stops_an_rl_run_before_any_model():
    from rlhf_jax.train import rl
    from rlhf_jax.train.run_config import DataConfig as RunData

    config = rl.GRPORunConfig(name="x", rewards=RewardConfig(functions=("math", "nowhere_xyz:score")),
                              data=RunData(train="synthetic:arithmetic", eval=None))
    with pytest.raises(ConfigError, match="^rewards.functions: cannot import module 'nowhere_xyz'"):
        rl.check_rewards(config, {})


def test_math_without_an_answer_column_stops_an_rl_run_naming_the_file(tmp_path):
    import json

    from rlhf_jax.config import CheckpointConfig, TrainConfig
    from rlhf_jax.steps import grpo_config
    from rlhf_jax.testing import tiny_config
    from rlhf_jax.train import rl
    from rlhf_jax.train.rollouts import RolloutConfig
    from rlhf_jax.train.run_config import DataConfig as RunData

    with pytest.raises(ConfigError, match=r"^rewards.functions 'math' needs a reference answer column, one of "
                                          r"\['answer', 'solution'\], in the prompts: data.eval e.jsonl has none"):
        build_rewards(RewardContext(RewardConfig(functions=("math",)), 8,
                                    prompt_columns={"data.train t.jsonl": ("answer",), "data.eval e.jsonl": ("id",)}))
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+2="}) + "\n" for a in range(8)))
    config = rl.GRPORunConfig(
        name="nomath", workdir=str(tmp_path / "run"),
        model=tiny_config(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, head_dim=16),
        data=RunData(train=str(path), eval=str(path), max_len=16, batch_size=4),
        algorithm=grpo_config("grpo", group_size=2), rollout=RolloutConfig(max_new_tokens=4),
        rewards=RewardConfig(functions=("math",)), train=TrainConfig(steps=1, eval_every=1, eval_batches=1),
        checkpoint=CheckpointConfig(every=0))
    with pytest.raises(ConfigError, match=f"in the prompts: data.train {path} has none \\(columns besides the "
                                          "prompt: \\[\\]\\)"):
        rl.train(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step ran


def test_gsm8k_and_math_rows_are_prompt_rows():
    ref = formats.RowRef("data.jsonl", 3, "line")
    gsm = formats.parse_row({"question": "Tom has 2 apples...", "answer": "2+1=3\n#### 3"}, "prompt", ref)
    assert gsm.prompt.prompt == "Tom has 2 apples..." and gsm.columns == {"answer": "2+1=3\n#### 3"}
    math_row = formats.parse_row({"problem": "Compute $1+1$.", "solution": "$\\boxed{2}$", "level": "Level 1"},
                                 "prompt", ref)
    assert math_row.prompt.prompt == "Compute $1+1$." and set(math_row.columns) == {"solution", "level"}
    with pytest.raises(formats.DataError, match="data.jsonl.*line 3.*missing column 'prompt'"):
        formats.parse_row({"answer": "3"}, "prompt", ref)


def test_grpo_reads_a_gsm8k_file_and_logs_the_math_checker_counts(tmp_path):
    """The driver path: a GSM8K-format JSONL as RL prompts, reward "math" by name, two GRPO steps;
    the checker's counters are logged every step and held-out accuracy is `eval/reward`.
    (Learning on such a file: experiments/grpo_gsm8k_tiny.py, tests/test_experiments_full.py.)"""
    import json

    from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
    from rlhf_jax.steps import grpo_config
    from rlhf_jax.testing import tiny_config
    from rlhf_jax.train import rl
    from rlhf_jax.train.rollouts import RolloutConfig
    from rlhf_jax.train.run_config import DataConfig as RunData

    rows = [{"question": f"Ann has {a} pens and gets {b} more. How many pens?",
             "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b} pens.\n#### {a + b}"} for a in range(4) for b in range(4)]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = rl.GRPORunConfig(
        name="gsm", workdir=str(tmp_path / "run"),
        model=tiny_config(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, head_dim=16),
        data=RunData(train=str(path), eval=str(path), max_len=56, max_prompt_len=48, batch_size=8),
        algorithm=grpo_config("grpo", group_size=2), rollout=RolloutConfig(max_new_tokens=4),
        rewards=RewardConfig(functions=("math", "answer_format")),
        train=TrainConfig(steps=2, eval_every=2, eval_batches=1), checkpoint=CheckpointConfig(every=0, keep=1),
        logging=LoggingConfig(every=1, tensorboard=False))
    summary = rl.train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rewards/math/mean" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["rewards/math/failures"] == 0 and r["rewards/math/timeouts"] == 0
        assert 0 <= r["rewards/math/mean"] <= 1 and "rewards/answer_format/mean" in r
    assert 0 <= summary["eval"]["eval/reward"] <= 2
