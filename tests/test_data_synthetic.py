"""Synthetic tasks: correct answers, gold-reward goldens, seeded generators, data in the safe region."""

import re

import numpy as np
import pytest

from rlhf_jax.data import ArithmeticTask, TokenizeConfig, VowelTask, load_dataset
from rlhf_jax.testing.tokenizer import offline_tokenizer


def test_arithmetic_answers_are_correct_and_seeded():
    task = ArithmeticTask(max_operand=50, ops=("+", "-", "*"))
    problems = task.problems(300, seed=0)
    assert problems == task.problems(300, seed=0) and problems != task.problems(300, seed=1)
    for prompt, answer in problems:
        a, op, b = re.fullmatch(r"(\d+)([+*-])(\d+)=", prompt).groups()
        assert int(a) <= 50 and int(b) <= 50
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] >= 0
    assert {re.search(r"[+*-]", p).group(0) for p, _ in problems} == {"+", "-", "*"}
    assert task.problems(7, seed=0) == problems[:7]  # prefix-stable
    assert task.sft_rows(2, seed=0) == [{"prompt": p, "completion": a} for p, a in problems[:2]]
    assert task.prompt_rows(2, seed=0) == [{"prompt": p, "answer": a} for p, a in problems[:2]]


def test_arithmetic_grader():
    rewards = ArithmeticTask.reward(
        completions=["19", " 19 ", "18", "19.0", ""], answer=["19"] * 5, prompts=["12+7="] * 5
    )
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        ArithmeticTask.reward(completions=["1", "2"], answer=["1"])


@pytest.mark.parametrize(
    "word, completion, gold",
    [
        ("mop", "mako nedu rila", 1.0 + 0.1),  # 6 of 12 letters vowels: tent 1; starts with "m"
        ("mop", "aaaaaaaaaaaaaaaa", 0.0 - 0.5 * 14),  # share 1: tent 0; a run of 16 = 14 beyond two
        ("mop", "bcd", 0.0 - 0.1 * 5),  # no vowels; 3 characters, 5 short of 8
        ("abc", "a", 0.0 + 0.1 - 0.1 * 7),
        ("mop", "kao xyz uvw batu ekai opx", 1.0 - abs(9 / 20 - 0.5) / 0.5 - 0.1 * 5),  # 25 chars: 5 too long
        ("mop", "   ", -1.0),
    ],
)
def test_vowel_gold_reward_goldens(word, completion, gold):
    task = VowelTask()
    assert task.gold(word, completion) == pytest.approx(gold)
    assert task.gold_reward(completions=[completion], word=[word], prompts=["ignored"]) == [
        pytest.approx(gold)
    ]


def test_vowel_generators_are_seeded_and_stay_in_the_safe_region():
    task = VowelTask()
    sft = task.sft_rows(400, seed=0)
    assert sft == task.sft_rows(400, seed=0) and sft != task.sft_rows(400, seed=1)
    assert (
        task.sft_rows(9, seed=0) == sft[:9]
        and task.preference_rows(9, seed=3) == task.preference_rows(20, seed=3)[:9]
    )
    shares, starts = [], []
    for row in sft:
        word, text = row["word"], row["completion"]
        assert row["prompt"] == word + ":" and 3 <= len(word) <= 5
        assert 10 <= len(text) <= 18 and text == text.strip() and "  " not in text
        assert re.search(r"(.)\1\1", text) is None
        letters = text.replace(" ", "")
        shares.append(sum(c in "aeiou" for c in letters) / len(letters))
        starts.append(text[0] == word[0])
    assert 0.15 < np.mean(shares) < 0.35 and 0.4 < np.mean(starts) < 0.6
    gold = task.gold_reward(completions=[r["completion"] for r in sft], word=[r["word"] for r in sft])
    assert 0.3 < np.mean(gold) < 0.8  # moderate: the best completions reach 1.1
    prompts = task.prompt_rows(5, seed=2)
    assert all(p["prompt"] == p["word"] + ":" for p in prompts)


def test_vowel_pairs_are_labelled_by_gold_with_the_requested_noise():
    task = VowelTask()
    clean = task.preference_rows(500, seed=0)
    for row in clean:
        assert row["gold_chosen"] == pytest.approx(task.gold(row["word"], row["chosen"]))
        assert row["gold_chosen"] - row["gold_rejected"] >= task.min_gap
    noisy = task.preference_rows(2000, seed=0, label_noise=0.2)
    flipped = np.mean([r["gold_chosen"] < r["gold_rejected"] for r in noisy])
    assert 0.17 < flipped < 0.23
    with pytest.raises(ValueError, match="label_noise must be in \\[0, 0.5\\]"):
        task.preference_rows(1, seed=0, label_noise=0.7)


def test_vowel_pairs_are_learnable_from_simple_features():
    """A logistic regression on the two completions' vowel shares separates held-out pairs (>= 90%),
    and the learned proxy prefers all-vowel gibberish that gold punishes (over-optimization)."""
    task = VowelTask()

    def share(text):
        letters = text.replace(" ", "")
        return sum(c in "aeiou" for c in letters) / len(letters)

    def features(rows):
        x = np.array([[share(r["chosen"]) - share(r["rejected"])] for r in rows])
        signs = np.random.default_rng(0).choice([-1.0, 1.0], size=len(rows))
        return x * signs[:, None], (signs > 0).astype(float)

    x, y = features(task.preference_rows(2000, seed=0, label_noise=0.1))
    w = np.zeros(1)
    for _ in range(500):  # gradient descent on the logistic loss
        p = 1 / (1 + np.exp(-x @ w))
        w -= 5.0 * x.T @ (p - y) / len(y)
    xt, yt = features(task.preference_rows(1000, seed=1))
    assert np.mean((xt @ w > 0) == (yt > 0)) >= 0.9
    proxy = lambda text: w[0] * share(text)  # noqa: E731
    assert proxy("aeiou aeiou aeiou") > proxy("mako nedu rila")
    assert task.gold("mop", "aeiou aeiou aeiou") < task.gold("mop", "mako nedu rila")


def test_synthetic_rows_load_and_stay_short():
    tok = offline_tokenizer()
    config = TokenizeConfig(max_len=48, string_format="chat")
    vowel = VowelTask()
    for rows, kind in [
        (vowel.sft_rows(200, seed=0), "sft"),
        (vowel.preference_rows(200, seed=0), "preference"),
        (vowel.prompt_rows(200, seed=0), "prompt"),
        (ArithmeticTask().sft_rows(200, seed=0), "sft"),
        (ArithmeticTask().prompt_rows(200, seed=0), "prompt"),
    ]:
        dataset = load_dataset(rows, kind=kind, tokenizer=tok, config=config)
        assert len(dataset) == 200 and not dataset.skipped and dataset.num_truncated == 0
        assert dataset.lengths().max() <= 32
    prompts = load_dataset(vowel.prompt_rows(3, seed=0), kind="prompt", tokenizer=tok, config=config)
    assert set(prompts.columns) == {"word"}


def test_task_config_validation_names_the_field():
    with pytest.raises(ValueError, match="ArithmeticTask.ops"):
        ArithmeticTask(ops=("/",))
    with pytest.raises(ValueError, match="VowelTask.pair_vowel_share"):
        VowelTask(pair_vowel_share=(0.6, 0.2))
    with pytest.raises(ValueError, match="VowelTask.target_vowel_share"):
        VowelTask(target_vowel_share=1.0)
    for field in ("relevance_bonus", "length_penalty", "run_penalty", "min_gap"):  # nan and inf were accepted
        for bad in (float("nan"), float("inf"), -1.0):
            with pytest.raises(ValueError, match=rf"VowelTask.{field} must be a finite number >= 0, got"):
                VowelTask(**{field: bad})


def test_an_unreachable_min_gap_is_an_error_not_a_hang(monkeypatch):
    """Gold differences of generated pairs stay below ~1.1: min_gap=1.5 used to loop forever."""
    import rlhf_jax.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "_MAX_MISSES", 50)
    with pytest.raises(ValueError, match="51 draws in a row missed min_gap=1.5; lower min_gap"):
        VowelTask(min_gap=1.5).preference_rows(1, seed=0)
    rows = VowelTask().preference_rows(50, seed=0)  # the default gap is reached between misses
    assert min(abs(r["gold_chosen"] - r["gold_rejected"]) for r in rows) >= 0.2


@pytest.mark.parametrize("n", [-1, 2.5, True, "3"])
def test_a_bad_row_count_is_refused_naming_n(n):
    """`problems(-1)` used to raise NumPy's "negative dimensions are not allowed"; VowelTask returned []."""
    for call, where in [(lambda: ArithmeticTask().problems(n, seed=0), "ArithmeticTask.problems"),
                        (lambda: ArithmeticTask().sft_rows(n, seed=0), "ArithmeticTask.problems"),
                        (lambda: VowelTask().sft_rows(n, seed=0), "VowelTask.sft_rows"),
                        (lambda: VowelTask().prompt_rows(n, seed=0), "VowelTask.prompt_rows"),
                        (lambda: VowelTask().preference_rows(n, seed=0), "VowelTask.preference_rows")]:
        with pytest.raises(ValueError, match=rf"{where}: n must be an int >= 0 \(the number of rows to draw\), got"):
            call()
    assert ArithmeticTask().problems(0, seed=0) == [] and VowelTask().preference_rows(0, seed=0) == []


def test_arithmetic_prefix_is_stable_and_operands_are_uniform():
    task = ArithmeticTask(max_operand=3, ops=("+", "-", "*"))
    problems = task.problems(3000, seed=5)
    assert problems[:7] == task.problems(7, seed=5)
    parsed = [re.fullmatch(r"(\d+)([-+*])(\d+)=", p).groups() for p, _ in problems]
    assert all(str(eval(f"{x}{op}{y}")) == a and int(a) >= 0 for (x, op, y), (_, a) in zip(parsed, problems))
    ops = np.array([op for _, op, _ in parsed])
    np.testing.assert_allclose([np.mean(ops == op) for op in "+-*"], 1 / 3, atol=0.03)
    plus = np.array([[int(x), int(y)] for x, op, y in parsed if op == "+"])
    np.testing.assert_allclose(np.bincount(plus.ravel(), minlength=4) / plus.size, 0.25, atol=0.03)
