"""RLAIF and Constitutional AI drivers: judge labelling into a TRL preference file, sampling completions
from a policy, and the critique-and-revise loop (pinned prompts; a real sampler run)."""

import jax
import numpy as np
import pytest

from rlhf_jax.config import ConfigError, LoggingConfig
from rlhf_jax.data import load_dataset
from rlhf_jax.models import CausalLM
from rlhf_jax.rewards import PythonReward
from rlhf_jax.rewards.judges import JudgeModel, PairwiseJudge, PairwiseTemplate
from rlhf_jax.testing import offline_tokenizer, tiny_config
from rlhf_jax.train.dpo import DPOConfig
from rlhf_jax.train.rlaif import (
    CritiqueTemplates,
    TextGenerator,
    critique_and_revise,
    label_pairs,
    sample_completions,
    write_preferences,
    write_sft_rows,
)
from rlhf_jax.data import TokenizeConfig
from rlhf_jax.train.run_config import DataConfig


@pytest.fixture(scope="module")
def tiny():
    model = CausalLM(tiny_config())
    return model, model.init(jax.random.key(3)), offline_tokenizer()


def test_label_pairs_follows_the_judge_and_writes_a_trl_file(tiny, tmp_path):
    model, params, tokenizer = tiny
    judge = PairwiseJudge(JudgeModel(model, params, tokenizer, batch_size=8), PairwiseTemplate(text="{prompt}{response_a}|{response_b}>"))
    rows = [{"prompt": "ab:", "completions": ["mako", "zzzz"], "word": "ab"},
            {"prompt": "cd:", "chosen": "aeiou", "rejected": "kt", "word": "cd"},
            {"prompt": "ef:", "completions": ["ba", "xo", "unused"], "word": "ef"}]
    verdict = judge.prefer(["ab:", "cd:", "ef:"], ["mako", "aeiou", "ba"], ["zzzz", "kt", "xo"])
    gold = lambda row, completion: float(len(completion))  # noqa: E731 - "longer is better"
    labelled, metrics = label_pairs(judge, rows, batch_size=2, gold=gold)
    for row, out, p in zip(rows, labelled, verdict.prob_first):
        a, b = row.get("completions", [row.get("chosen"), row.get("rejected")])[:2]
        assert (out["chosen"], out["rejected"]) == ((a, b) if p >= 0.5 else (b, a))
        assert out["judge_prob"] == pytest.approx(max(p, 1 - p), abs=1e-6) and out["word"] == row["word"]
        assert set(out) == {"prompt", "chosen", "rejected", "word", "judge_prob", "judge_consistent"}
    expected = np.mean([(p >= 0.5) == (len(a) > len(b)) for p, (a, b) in
                        zip(verdict.prob_first, [("mako", "zzzz"), ("aeiou", "kt"), ("ba", "xo")]) if len(a) != len(b)])
    assert metrics["judge/gold_agreement"] == pytest.approx(expected)
    assert metrics["judge/position_consistency"] == pytest.approx(np.mean(verdict.consistent))
    path = write_preferences(str(tmp_path / "prefs.jsonl"), labelled)
    data = load_dataset(path, kind="preference", tokenizer=tokenizer, config=TokenizeConfig(max_len=32))
    assert len(data) == 3
    with pytest.raises(ValueError, match="row 0 has neither 'completions' nor 'chosen'/'rejected'"):
        label_pairs(judge, [{"prompt": "x"}])
    with pytest.raises(ValueError, match=r"write_preferences: row 0 lacks \['rejected'\]"):
        write_preferences(str(tmp_path / "bad.jsonl"), [{"prompt": "p", "chosen": "c"}])


def test_many_writers_of_one_jsonl_file_at_once_all_succeed(tmp_path):
    """Every process of a multi-process run writes the data file it reads next (rlaif_tiny's judge
    rows): concurrent writers each go through a temporary file of their own, and one whole file is
    left. With one shared temporary name a writer's rename found it gone (2-process rlaif_tiny)."""
    import concurrent.futures
    import json
    import threading

    path, rows = str(tmp_path / "rows.jsonl"), [{"prompt": f"p{i}", "completion": "c" * 200} for i in range(200)]
    start = threading.Barrier(8)

    def writer(_):
        start.wait()
        for _ in range(25):
            write_sft_rows(path, rows)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(writer, range(8)))
    assert [json.loads(line) for line in open(path)] == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_sample_completions_scores_with_the_sources(tiny):
    model, params, _ = tiny
    config = DPOConfig(name="s", model=tiny_config(), data=DataConfig(train="synthetic:vowel", max_len=16, batch_size=8),
                       logging=LoggingConfig(console=False))
    gold = DataConfig().vowel.gold_reward
    rows = sample_completions(config, params, num_samples=2, max_new_tokens=6, max_prompts=4,
                              sources=[PythonReward(gold, "gold")])
    assert len(rows) == 4 and all(len(r["completions"]) == 2 for r in rows)
    for r in rows:
        assert r["prompt"] == f"{r['word']}:"
        np.testing.assert_allclose(r["scores"], gold(r["completions"], [r["word"]] * 2), atol=1e-6)


def test_critique_and_revise_prompts_and_rows(tmp_path):
    calls = []

    def generate(texts):
        calls.append(list(texts))
        return [f"out{len(calls)}:{i}" for i in range(len(texts))]

    templates = CritiqueTemplates(critique="C[{prompt}|{response}|{principle}]",
                                  revision="R[{prompt}|{response}|{critique}|{principle}]")
    rows = critique_and_revise(generate, ["p0", "p1"], ["kind", "brief"], rounds=2, templates=templates)
    assert calls[0] == ["p0", "p1"]                                          # initial responses
    assert calls[1] == ["C[p0|out1:0|kind]", "C[p1|out1:1|brief]"]           # round 0: principle (i + r) % 2
    assert calls[2] == ["R[p0|out1:0|out2:0|kind]", "R[p1|out1:1|out2:1|brief]"]
    assert calls[3] == ["C[p0|out3:0|brief]", "C[p1|out3:1|kind]"]           # round 1 revises the revision
    assert rows[0] == {"prompt": "p0", "initial": "out1:0", "critiques": ["out2:0", "out4:0"],
                       "revisions": ["out3:0", "out5:0"], "principles": ["kind", "brief"], "completion": "out5:0"}
    write_sft_rows(str(tmp_path / "sft.jsonl"), rows)
    with pytest.raises(ConfigError, match=r"cai.templates.revision: the template lacks the placeholder \{critique\}"):
        CritiqueTemplates(revision="{prompt}{response}{principle}")


def test_critique_and_revise_with_our_sampler(tiny):
    model, params, tokenizer = tiny
    generate = TextGenerator(model, params, tokenizer, max_new_tokens=4, max_prompt_len=96, temperature=1.0)
    rows = critique_and_revise(generate, ["ab:", "cd:"], ["be kind"], rounds=1)
    assert [len(r["revisions"]) for r in rows] == [1, 1]
    assert all(isinstance(r["completion"], str) and len(r["completion"]) <= 4 for r in rows)


# --- audit: ties, garbage verdicts, rows without a prompt ---

def test_label_pairs_leaves_ties_out_and_counts_them(tiny):
    model, params, tokenizer = tiny
    judge = PairwiseJudge(JudgeModel(model, params, tokenizer, batch_size=8), PairwiseTemplate(text="{prompt}{response_a}|{response_b}>"))
    rows = [{"prompt": "ab:", "completions": ["same", "same"]}, {"prompt": "cd:", "completions": ["mako", "zzzz"]},
            {"prompt": "ef:", "chosen": "xo", "rejected": "xo"}]
    p = judge.prefer(["cd:"], ["mako"], ["zzzz"]).prob_first[0]
    labelled, metrics = label_pairs(judge, rows, gold=lambda row, completion: float(len(set(completion))))
    # Identical texts have no winner: not a preference pair (it was written as chosen == rejected).
    assert [r["prompt"] for r in labelled] == ["cd:"] and metrics["judge/ties"] == 2.0
    assert (labelled[0]["chosen"], labelled[0]["rejected"]) == (("mako", "zzzz") if p > 0.5 else ("zzzz", "mako"))
    assert metrics["judge/gold_agreement"] == float(p > 0.5)  # only the judged pair counts


def test_label_pairs_refuses_a_judge_that_returns_garbage():
    from rlhf_jax.rewards.judges import PairwiseVerdict

    class Fixed:
        def __init__(self, prob):
            self.prob = np.asarray(prob, np.float32)

        def prefer(self, prompts, first, second):
            return PairwiseVerdict(self.prob, self.prob > 0.5, self.prob, self.prob)

    rows = [{"prompt": "q", "completions": ["good", "bad"]}, {"prompt": "r", "completions": ["c", "d"]}]
    # A NaN probability read as "p >= 1/2 is false" made the second response the winner.
    with pytest.raises(ValueError, match=r"label_pairs: row 1: the judge's probability is nan, not a number in \[0, 1\]"):
        label_pairs(Fixed([0.9, np.nan]), rows)
    with pytest.raises(ValueError, match=r"row 0: the judge's probability is 1.5"):
        label_pairs(Fixed([1.5, 0.2]), rows)
    # A verdict with fewer probabilities than pairs silently dropped the rest (zip).
    with pytest.raises(ValueError, match=r"the judge returned prob_first of shape \(1,\) for rows 0..1; need one "
                                         r"probability per pair \(2\)"):
        label_pairs(Fixed([0.9]), rows)
    with pytest.raises(ValueError, match=r"label_pairs: row 1 has no 'prompt' \(keys \['completions'\]\)"):
        label_pairs(Fixed([0.9, 0.1]), [rows[0], {"completions": ["a", "b"]}])
    with pytest.raises(ValueError, match=r"^label_pairs: batch_size must be a positive int, got 0$"):
        label_pairs(Fixed([0.9, 0.1]), rows, batch_size=0)  # was "range() arg 3 must not be zero"


@pytest.mark.parametrize("bad", [-1, 0, 2.0, True])
def test_sample_completions_refuses_a_max_prompts_that_is_not_a_positive_int(bad):
    """max_prompts=-1 returned all but the last row of the first batch (rows[:-1]), silently."""
    config = DPOConfig(name="x", model=tiny_config(), data=DataConfig(train="synthetic:vowel", num_train=8))
    with pytest.raises(ConfigError, match=r"^sample_completions: max_prompts must be a positive int or None"):
        sample_completions(config, {}, num_samples=2, max_prompts=bad)
