"""Online and iterative DPO: the ranking and metric formulas against hand values, the pair batch layout,
and short runs (a judge ranking two samples per prompt; two rounds of iterative DPO)."""

import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.config import CheckpointConfig, ConfigError, LoggingConfig, TrainConfig
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.models import CausalLM
from rlhf_jax.rewards import PythonReward
from rlhf_jax.rewards.registry import RewardConfig
from rlhf_jax.rewards.judges import JudgeModel, PairwiseJudge, PairwiseTemplate, PairwiseVerdict
from rlhf_jax.steps import DPO, KTO
from rlhf_jax.testing import offline_tokenizer, tiny_config
from rlhf_jax.train import dpo, recipe_for
from rlhf_jax.train.online_dpo import (
    OnlineDPO,
    OnlineDPOConfig,
    best_and_worst,
    identical_pairs,
    iterative_dpo,
    online_dpo_metrics,
    pair_batch,
    rank_pairs,
    train,
)
from rlhf_jax.train.rlaif import JudgeConfig
from rlhf_jax.train.rollouts import RolloutConfig
from rlhf_jax.train.run_config import DataConfig


def test_rank_pairs_and_best_and_worst():
    chosen, rejected = rank_pairs(np.array([True, False, True]))
    assert chosen.tolist() == [0, 3, 4] and rejected.tolist() == [1, 2, 5]
    assert best_and_worst([0.1, 0.5, 0.5, -1.0]) == (1, 3)
    assert best_and_worst([0.2, 0.2]) is None
    with pytest.raises(ValueError, match=r"best_and_worst: scores must be finite numbers, got \[0.1, nan, 0.3\]"):
        best_and_worst([0.1, float("nan"), 0.3])  # was (1, 1): the NaN completion as both chosen and rejected


def test_online_dpo_metrics_golden():
    m = online_dpo_metrics(np.array([-2.0, -5.0]), np.array([-3.0, -3.0]), beta=0.5, scores=np.array([1.0, 0.0]),
                           chosen=np.array([0]), rejected=np.array([1]))
    # kl = [1, -2]: mean -0.5; entropy = mean(2, 5); rlhf = mean(1 - 0.5 * 1, 0 + 0.5 * 2) = 0.75.
    assert m == pytest.approx({"objective/kl": -0.5, "objective/entropy": 3.5, "objective/non_score_reward": 0.25,
                               "beta": 0.5, "objective/scores": 0.5, "objective/rlhf_reward": 0.75,
                               "objective/scores_margin": 1.0})


def test_online_dpo_metrics_of_a_reference_free_objective_have_no_kl():
    """SimPO / ORPO have no reference: the KL metrics were computed against zeros (objective/kl = mean log pi)."""
    m = online_dpo_metrics(np.array([-2.0, -5.0]), None, beta=2.0, scores=np.array([1.0, 0.0]),
                           chosen=np.array([0]), rejected=np.array([1]))
    assert m == pytest.approx({"objective/entropy": 3.5, "beta": 2.0, "objective/scores": 0.5,
                               "objective/scores_margin": 1.0})


def test_pair_batch_layout():
    arrays = {"prompt_tokens": np.array([[1, 7, 0], [1, 7, 0], [1, 8, 9], [1, 8, 9]], np.int32),
              "prompt_lengths": np.array([2, 2, 3, 3], np.int32),
              "completion_tokens": np.array([[20, 2], [21, 22], [23, 2], [24, 25]], np.int32),
              "completion_mask": np.array([[1, 1], [1, 1], [1, 1], [1, 0]], bool)}
    out = pair_batch(arrays, np.array([1, 2]), np.array([0, 3]), ref_logps=np.array([-1.0, -2.0, -3.0, -4.0]),
                     pad_id=0, width=6, rows=3)
    assert out["chosen_tokens"].tolist() == [[1, 7, 21, 22, 0, 0], [1, 8, 9, 23, 2, 0], [0] * 6]
    assert out["chosen_loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0] * 6]
    assert out["rejected_tokens"].tolist() == [[1, 7, 20, 2, 0, 0], [1, 8, 9, 24, 0, 0], [0] * 6]
    assert out["rejected_loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0], [0] * 6]
    assert out["ref_chosen_logps"].tolist() == [-2.0, -3.0, 0.0] and out["ref_rejected_logps"].tolist() == [-1.0, -4.0, 0.0]


def test_config_errors():
    with pytest.raises(ConfigError, match="algorithm.objective must be DPO, SimPO or ORPO"):
        OnlineDPO(objective=KTO())
    for bad in (0.0, float("inf"), True):  # inf sampled uniformly; True read as 1
        with pytest.raises(ConfigError, match=r"^algorithm.temperature must be a finite number > 0"):
            OnlineDPO(temperature=bad)
    with pytest.raises(ConfigError, match=r"^rollout.dynamic_sampling does not apply to online DPO"):
        OnlineDPOConfig(name="odpo", rollout=RolloutConfig(dynamic_sampling=True))
    with pytest.raises(ConfigError, match=r"^rollout.eval_greedy does not apply to online DPO"):  # was ignored
        OnlineDPOConfig(name="odpo", rollout=RolloutConfig(eval_greedy=True))
    for held_out in ("held_out.jsonl", "synthetic:arithmetic"):  # no gold reward: no evaluation ran, silently
        with pytest.raises(ConfigError, match=f"^data.eval '{held_out}': online DPO evaluates only by sampling"):
            OnlineDPOConfig(name="odpo", data=DataConfig(eval=held_out))
    # A judge and a reward model both set: the judge silently replaced the reward model (and any
    # missing_eos penalty in rewards.functions).
    with pytest.raises(ConfigError, match=r"^online DPO ranks with either judge or rewards, not both"):
        OnlineDPOConfig(name="odpo", judge=JudgeConfig(model="runs/judge"),
                        rewards=RewardConfig(functions=("reward_model",), reward_model="runs/rm"))
    OnlineDPOConfig(name="odpo", judge=JudgeConfig(model="runs/judge"))  # the default rewards: fine


def test_identical_pairs_compare_the_masked_completion_tokens():
    arrays = {"completion_tokens": np.array([[5, 2, 9], [5, 2, 7], [5, 6, 0], [5, 2, 0]], np.int32),
              "completion_mask": np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]], bool)}
    assert identical_pairs(arrays).tolist() == [True, False]  # pair 0 differs only past EOS (masked)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A random tiny policy saved as the SFT checkpoint both runs start from."""
    path = tmp_path_factory.mktemp("odpo") / "sft"
    config = tiny_config()
    with Checkpointer(path, config=CheckpointConfig(async_save=False), model_config=config) as ck:
        ck.save(0, {"params": jax.jit(CausalLM(config).init)(jax.random.key(0))})
    return str(path)


def _config(start, workdir, **changes):
    return OnlineDPOConfig(**{
        "name": "odpo", "workdir": str(workdir), "model": tiny_config(),
        "data": DataConfig(train="synthetic:vowel", eval=None, num_train=32, max_len=16, batch_size=8),
        "algorithm": OnlineDPO(objective=DPO(beta=0.1)), "train": TrainConfig(steps=2, eval_every=0),
        "sampling": dpo.SampleEvalConfig(num_prompts=0),
        "checkpoint": CheckpointConfig(init_from=start, every=0, keep=1),
        "logging": LoggingConfig(every=1, tensorboard=False, console=False), **changes})


def test_online_dpo_with_a_pairwise_judge_runs_and_logs_trl_metrics(start, tmp_path):
    model = CausalLM(tiny_config())
    judge = PairwiseJudge(JudgeModel(model, model.init(jax.random.key(1)), offline_tokenizer(), batch_size=16),
                          PairwiseTemplate(text="{prompt}{response_a}|{response_b}>"))
    config = _config(start, tmp_path / "run")
    assert recipe_for(config).name == "online_dpo"
    summary = train(config, judge=judge)
    assert summary["step"] == 2
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    first = records[0]
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "val/contain_eos_token",
                "beta", "judge/position_consistency", "judge/position_bias"):
        assert key in first, key
    # Step 1: the policy is the reference, so the precomputed reference log-probs (one forward of the
    # sampled completions) equal the step's own (implicit rewards 0), and the samples' KL is 0.
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert abs(first["objective/kl"]) < 1e-3 and first["loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert first["beta"] == 0.1 and first["objective/entropy"] > 0


def test_judge_and_reward_sources_both_given_is_a_config_error(start, tmp_path):
    with pytest.raises(ConfigError, match=r"pass judge or reward_sources \(and reward_weights\), not both"):
        train(_config(start, tmp_path / "run"), judge=object(), reward_sources=[PythonReward(lambda **k: [], "r")])
    with pytest.raises(ConfigError, match=r"pass judge or reward_sources \(and reward_weights\), not both"):
        train(_config(start, tmp_path / "run"), judge=object(), reward_weights=[2.0])  # the weights were ignored


def test_online_dpo_leaves_tied_pairs_out_and_skips_an_all_tied_step(start, tmp_path):
    """A tie (equal scores or identical completions) was ranked chosen = first and trained on as a
    preference (a chosen == rejected pair for identical completions); now it is left out and counted."""
    seen = []

    def parity(completions, completion_ids, **kwargs):  # many exact ties, some untied pairs
        scores = [float(int(ids[0]) % 2) for ids in completion_ids]
        seen.append((scores, [tuple(ids) for ids in completion_ids]))
        return scores

    config = _config(start, tmp_path / "run", train=TrainConfig(steps=1, eval_every=0))
    train(config, reward_sources=[PythonReward(parity, "parity")])
    (scores, ids), = seen
    s, pairs = np.array(scores), list(zip(ids[0::2], ids[1::2]))
    tie = np.array([s[2 * i] == s[2 * i + 1] or a == b for i, (a, b) in enumerate(pairs)])
    assert 0 < tie.sum() < len(tie), "the seed should give both tied and untied pairs"
    record, = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "objective/ties" in r]
    assert record["objective/ties"] == tie.sum()
    assert record["objective/scores"] == pytest.approx(s.mean())
    assert record["objective/scores_margin"] == pytest.approx(np.abs(s[0::2] - s[1::2])[~tie].mean())  # was 0-diluted
    assert record["loss"] == pytest.approx(np.log(2), abs=1e-4)

    # Every pair tied (a constant reward): no update, no loss, all pairs counted.
    config = _config(start, tmp_path / "flat", train=TrainConfig(steps=1, eval_every=0))
    summary = train(config, reward_sources=[PythonReward(lambda completions, **k: [0.0] * len(completions), "flat")])
    assert summary["step"] == 1
    record, = [r for r in read_jsonl(tmp_path / "flat" / "metrics.jsonl") if "objective/ties" in r]
    assert record["objective/ties"] == 8 and "loss" not in record and "rewards/accuracies" not in record
    assert "objective/scores_margin" not in record and record["objective/scores"] == 0.0


def test_a_judge_verdict_of_the_wrong_shape_or_nan_is_a_clear_error(start, tmp_path):
    class Broken:
        def prefer(self, prompts, first, second):
            return PairwiseVerdict(np.full(len(prompts), np.nan), np.ones(len(prompts), bool),
                                   np.zeros(len(prompts)), np.zeros(len(prompts)))

    with pytest.raises(ValueError, match=r"the judge's prob_first must be 8 probabilities in \[0, 1\]"):
        train(_config(start, tmp_path / "run", train=TrainConfig(steps=1, eval_every=0)), judge=Broken())


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RLHF_JAX_FULL_EXPERIMENTS") != "1",
                    reason="two rounds compile two samplers and two DPO steps (~20 s CPU): opt-in with "
                           "RLHF_JAX_FULL_EXPERIMENTS=1")
def test_iterative_dpo_two_rounds(start, tmp_path):
    task_gold = DataConfig().vowel.gold_reward
    base = dpo.DPOConfig(
        name="it", model=tiny_config(),
        data=DataConfig(train="synthetic:vowel", eval=None, num_train=16, max_len=32, batch_size=8),
        train=TrainConfig(steps=1, eval_every=0), sampling=dpo.SampleEvalConfig(num_prompts=0),
        checkpoint=CheckpointConfig(init_from=start, every=0, keep=1),
        logging=LoggingConfig(every=1, tensorboard=False, console=False))
    out = iterative_dpo(str(tmp_path), base, rounds=2, samples_per_prompt=3, prompts="synthetic:vowel",
                        reward_sources=[PythonReward(task_gold, "gold")], max_new_tokens=8, max_prompts=8)
    assert [r["round"] for r in out["rounds"]] == [0, 1]
    assert out["final_checkpoint"] == str(tmp_path / "round_1" / "checkpoints")
    rows = [json.loads(line) for line in (tmp_path / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert rows and all(r["score_chosen"] > r["score_rejected"] for r in rows)
    for r in rows:  # the labels are the gold reward's: best over worst of the round's samples
        assert task_gold([r["chosen"], r["rejected"]], [r["word"]] * 2) == pytest.approx(
            [r["score_chosen"], r["score_rejected"]])
    assert out["rounds"][1]["summary"]["step"] == 1


def test_a_batch_size_the_mesh_cannot_split_is_a_config_error_before_any_model_is_built(start, tmp_path):
    """6 pairs on 8 data shards: the run built the models, sampled and ranked, then failed in the update's
    device_batch with a ShardingError about batch['chosen_tokens']."""
    config = _config(start, tmp_path / "run", data=DataConfig(train="synthetic:vowel", eval=None, num_train=32,
                                                              max_len=16, batch_size=6))
    with pytest.raises(ConfigError, match=r"^data.batch_size: batch size 6 is not divisible by 8 = 8 data-parallel "
                                          r"shards .* x train.micro_batches 1"):
        train(config, reward_sources=[PythonReward(lambda completions, **k: [0.0] * len(completions), "flat")])
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_kl_metrics_of_a_bfloat16_sampler_use_the_policys_own_log_probs(start, tmp_path):
    """With rollout.sampler_dtype bfloat16 (a float32 policy) the sampler's log-probs stood for the policy's:
    at step 1 (policy = reference) objective/kl was -6e-4 (the dtype gap), not 0."""
    config = _config(start, tmp_path / "run", train=TrainConfig(steps=1, eval_every=0),
                     rollout=RolloutConfig(max_new_tokens=24, sampler_dtype="bfloat16"))
    summary = train(config, reward_sources=[PythonReward(lambda completions, **k: [float(len(c)) for c in completions],
                                                         "length")])
    m = summary["train"]
    assert m["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["objective/rlhf_reward"] == pytest.approx(m["objective/scores"], abs=1e-6)


def test_a_judge_model_that_does_not_exist_is_a_config_error_before_any_model_is_built(start, tmp_path):
    """judge.model naming no directory failed with FileNotFoundError once the policy was built and the run
    directory made (an empty judge.model likewise, with its ConfigError)."""
    missing = str(tmp_path / "no_judge")
    with pytest.raises(ConfigError, match=f"^judge.model: {missing} does not exist$"):
        train(_config(start, tmp_path / "run", judge=JudgeConfig(model=missing)))
    with pytest.raises(ConfigError, match=r"^judge.model must name a checkpoint"):
        train(_config(start, tmp_path / "run", judge=JudgeConfig(model="")))
    assert not (tmp_path / "run").exists()
