"""The online RL driver end to end on the tiny model: metrics, dynamic sampling, bad input. (Resuming a
GRPO run bit for bit, through the CLI and past kills: tests/test_fault_resume.py.)"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax.config import CheckpointConfig, ConfigError, LoggingConfig, TrainConfig
from rlhf_jax.data.synthetic import ArithmeticTask, VowelTask
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.rewards import PythonReward, RewardFunctionError
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.steps import PPOConfig, grpo_config
from rlhf_jax.testing import tiny_config
from rlhf_jax.train import rl, rollouts
from rlhf_jax.train.rollouts import RolloutCollector
from rlhf_jax.train.run_config import DataConfig
from step_fixtures import IdTokenizer, StubSampler

MODEL = tiny_config(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, head_dim=16)
QUIET = LoggingConfig(every=1, console=False, tensorboard=False)


def _grpo(tmp_path, name="grpo", **changes) -> rl.GRPORunConfig:
    config = rl.GRPORunConfig(
        name=name, workdir=str(tmp_path / name), model=MODEL, mesh=MeshConfig(data=-1, strategy="dp"),
        data=DataConfig(train="synthetic:arithmetic", eval="synthetic:arithmetic", num_train=64, num_eval=8,
                        max_len=16, batch_size=4, arithmetic=ArithmeticTask(max_operand=9)),
        algorithm=grpo_config("grpo", group_size=4), rollout=rl.RolloutConfig(max_new_tokens=4),
        optim=OptimizerConfig(learning_rate=1e-2), train=TrainConfig(steps=2, eval_every=2, eval_batches=1),
        checkpoint=CheckpointConfig(every=1, async_save=False), logging=QUIET,
    )
    return dataclasses.replace(config, **changes)


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl")
    config = _grpo(tmp)
    return config, rl.train(config)


def test_grpo_run_logs_the_rl_metrics(grpo_run):
    config, summary = grpo_run
    assert summary["step"] == 2 and summary["stopped_by"] is None
    train = summary["train"]
    for key in ("reward", "reward_std", "rewards/task/mean", "frac_reward_zero_std", "kl", "entropy",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "approx_kl",
                "completions/mean_length", "completions/clipped_ratio", "sampler_logprob_diff/mean",
                "sampler_logprob_diff/max", "time/generate", "time/reward", "time/reference", "time/update",
                "time/weight_handoff", "tokens_per_second", "loss", "grad_norm", "learning_rate"):
        assert key in train, key
    assert train["sampler_logprob_diff/max"] <= 1e-5  # the sampler's log-probs are the trainer's
    assert 0 <= train["completions/clipped_ratio"] <= 1
    evals = [r for r in _records(summary["run_dir"]) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert abs(evals[0]["eval/kl"]) < 1e-5  # the policy is the reference at step 0


def test_ppo_run_with_a_value_model_from_the_policy(tmp_path):
    config = rl.PPORunConfig(
        name="ppo", workdir=str(tmp_path / "ppo"), model=MODEL, mesh=MeshConfig(data=-1, strategy="dp"),
        data=DataConfig(train="synthetic:vowel", eval="synthetic:vowel", num_train=64, num_eval=8, max_len=16,
                        batch_size=8, vowel=VowelTask()),
        algorithm=PPOConfig(num_epochs=2, num_minibatches=2, kl_coef=0.1, kl_target=1.0, ptx_coef=0.5),
        ptx_data="synthetic:vowel",
        rollout=rl.RolloutConfig(max_new_tokens=6),
        rewards=rl.RewardConfig(functions=("task", "missing_eos"), weights=(1.0, 0.5)),
        value=rl.ValueConfig(init="policy"),
        train=TrainConfig(steps=2, eval_every=2, eval_batches=1),
        checkpoint=CheckpointConfig(every=0, async_save=False), logging=QUIET,
    )
    summary = rl.train(config)
    train = summary["train"]
    for key in ("value_loss", "explained_variance", "kl_coef", "rewards/task/mean", "rewards/missing_eos/mean",
                "value/grad_norm", "kl/rollout_sequence", "loss/ptx"):
        assert key in train, key
    assert train["kl_coef"] != 0.1  # the adaptive controller moved
    assert "eval/gold_reward" in summary["eval"]


def test_dynamic_sampling_refills_the_batch_with_informative_groups(tmp_path):
    def half_constant(completions, answer, **kwargs):
        # Prompts with an even answer get a constant reward: their groups carry no signal.
        return [1.0 if int(a) % 2 == 0 else float(sum(map(ord, c)) % 2) for a, c in zip(answer, completions)]

    config = _grpo(tmp_path, name="dapo", algorithm=grpo_config("dapo", group_size=4),
                   rollout=rl.RolloutConfig(max_new_tokens=4, dynamic_sampling=True, max_sampling_rounds=6),
                   train=TrainConfig(steps=2, eval_every=0), checkpoint=CheckpointConfig(every=0, async_save=False))
    summary = rl.train(config, reward_sources=[PythonReward(half_constant)])
    records = [r for r in _records(summary["run_dir"]) if "dynamic_sampling/rounds" in r]
    assert len(records) == 2
    assert any(r["dynamic_sampling/rounds"] > 1 for r in records)
    assert sum(r["frac_reward_zero_std"] for r in records) > 0  # constant groups were generated ...
    for r in records:  # ... and left out of the training batch unless the rounds ran out
        assert r["dynamic_sampling/filled_with_zero_std"] > 0 or r["reward_std"] > 0


@pytest.mark.parametrize("rounds", [4, 1])
def test_dynamic_sampling_keeps_the_first_informative_groups_exactly(rounds):
    """Groups of 2; odd prompts score their sample index (signal), even ones a constant 1. Prompts 0-3,
    then 4-7: the batch is prompts 1, 3, 5, 7 after two rounds; with one round allowed, the zero-signal
    groups 0 and 2 fill it (in order)."""
    def reward(completion_ids, **kwargs):
        return [float(c[1]) if c[0] % 2 else 1.0 for c in completion_ids]

    def prompts(first):
        ids = np.arange(first, first + 4, dtype=np.int32)
        return {"prompt_tokens": np.stack([ids, ids], 1), "prompt_lengths": np.full(4, 2, np.int32),
                "example_mask": np.ones(4, bool)}

    sampling = SamplingConfig(max_new_tokens=3, num_samples=2, eos_id=2)
    collector = RolloutCollector(sampler=StubSampler(), tokenizer=IdTokenizer(), sources=[PythonReward(reward)],
                                 weights=None, train_sampling=sampling, eval_sampling=sampling, dynamic_sampling=True,
                                 max_sampling_rounds=rounds)
    merged, _, m = collector.collect(None, prompts(0), iter([prompts(4), prompts(8)]), rng=jax.random.key(0))
    ids = {4: [1, 3, 5, 7], 1: [1, 3, 0, 2]}[rounds]
    assert merged["prompt_tokens"][:, 0].tolist() == np.repeat(ids, 2).tolist()
    assert merged["scores"].tolist() == [0.0, 1.0, 0.0, 1.0] + ([0.0, 1.0, 0.0, 1.0] if rounds == 4 else [1.0] * 4)
    assert m["dynamic_sampling/rounds"] == {4: 2.0, 1: 1.0}[rounds]
    assert m["dynamic_sampling/filled_with_zero_std"] == {4: 0.0, 1: 2.0}[rounds]
    assert m["frac_reward_zero_std"] == 0.5  # of every generated group
    assert m["completions/generated_tokens"] == {4: 48.0, 1: 24.0}[rounds]


@pytest.mark.parametrize("metric", ["reward", "acc"])
def test_dynamic_sampling_filters_on_the_chosen_reward_source(metric):
    """verl's filter_groups.metric: "acc" is the accuracy (odd prompts right on sample 1 only, even
    prompts always right), "length" a format-like reward that differs within every group. The combined
    reward varies in every group, so the default filter keeps prompts 0-3; filtering on "acc" drops the
    all-right groups 0 and 2 and fills the batch with prompts 1, 3, 5, 7 in a second round."""
    def acc(completion_ids, **kwargs):
        return [float(c[1]) if c[0] % 2 else 1.0 for c in completion_ids]

    def length(completion_ids, **kwargs):
        return [0.25 * c[1] for c in completion_ids]

    def prompts(first):
        ids = np.arange(first, first + 4, dtype=np.int32)
        return {"prompt_tokens": np.stack([ids, ids], 1), "prompt_lengths": np.full(4, 2, np.int32),
                "example_mask": np.ones(4, bool)}

    sampling = SamplingConfig(max_new_tokens=3, num_samples=2, eos_id=2)
    sources = [PythonReward(acc), PythonReward(length)]
    chosen = rollouts.dynamic_sampling_source(metric, ("m:acc", "m:length"), sources)
    assert chosen == {"reward": None, "acc": "acc"}[metric]
    collector = RolloutCollector(sampler=StubSampler(), tokenizer=IdTokenizer(), sources=sources, weights=None,
                                 train_sampling=sampling, eval_sampling=sampling, dynamic_sampling=True,
                                 max_sampling_rounds=4, filter_source=chosen)
    merged, result, m = collector.collect(None, prompts(0), iter([prompts(4)]), rng=jax.random.key(0))
    ids = {"reward": [0, 1, 2, 3], "acc": [1, 3, 5, 7]}[metric]
    assert merged["prompt_tokens"][:, 0].tolist() == np.repeat(ids, 2).tolist()
    assert result.per_source["acc"].tolist() == {"reward": [1.0, 1.0, 0.0, 1.0] * 2, "acc": [0.0, 1.0] * 4}[metric]
    assert merged["scores"].tolist() == {"reward": [1.0, 1.25, 0.0, 1.25, 1.0, 1.25, 0.0, 1.25],
                                         "acc": [0.0, 1.25] * 4}[metric]
    assert m["dynamic_sampling/rounds"] == {"reward": 1.0, "acc": 2.0}[metric]
    assert m["dynamic_sampling/filled_with_zero_std"] == 0.0
    assert m["frac_reward_zero_std"] == 0.0  # the combined reward's: every generated group varies in it


def test_dynamic_sampling_metric_must_name_a_reward_source(tmp_path):
    with pytest.raises(ConfigError, match=r"^rollout.dynamic_sampling_metric='task' has no effect unless "
                                          r"rollout.dynamic_sampling is true"):
        rl.RolloutConfig(dynamic_sampling_metric="task")
    with pytest.raises(ConfigError, match=r"^rollout.dynamic_sampling_metric must be \"reward\" or the name"):
        rl.RolloutConfig(dynamic_sampling=True, dynamic_sampling_metric="")
    dynamic = dict(max_new_tokens=4, dynamic_sampling=True)
    with pytest.raises(ConfigError, match=r"^rollout.dynamic_sampling_metric='acc' must be \"reward\" \(the combined "
                                          r"reward\) or one of the run's reward functions \['task'\]$"):
        rl.train(_grpo(tmp_path, rollout=rl.RolloutConfig(**dynamic, dynamic_sampling_metric="acc")))
    with pytest.raises(ConfigError, match=r"reward functions \['acc'\] \(the given reward_sources"):
        rl.train(_grpo(tmp_path, rollout=rl.RolloutConfig(**dynamic, dynamic_sampling_metric="task")),
                 reward_sources=[PythonReward(lambda **k: [], "acc")])
    # An entry whose source is named otherwise resolves to that source.
    sources = [PythonReward(lambda **k: [], "even_fraction_reward"), PythonReward(lambda **k: [], "fmt")]
    assert rollouts.dynamic_sampling_source("even_fraction", ("even_fraction", "m:fmt"), sources) == \
        "even_fraction_reward"
    assert rollouts.dynamic_sampling_source("fmt", ("even_fraction", "m:fmt"), sources) == "fmt"
    assert rollouts.dynamic_sampling_source("m:fmt", ("even_fraction", "m:fmt"), sources) == "fmt"


def test_a_failing_reward_function_is_named(tmp_path):
    """The driver surfaces the error naming the function (penalty mode: `tests/test_rewards.py`)."""

    def flaky(completions, **kwargs):
        raise ZeroDivisionError("grader crashed")

    config = _grpo(tmp_path, name="flaky", train=TrainConfig(steps=1, eval_every=0),
                   checkpoint=CheckpointConfig(every=0, async_save=False))
    with pytest.raises(RewardFunctionError, match=r"reward source 'flaky' raised ZeroDivisionError: grader crashed"):
        rl.train(config, reward_sources=[PythonReward(flaky)])


def test_bad_configurations_fail_before_compiling(tmp_path):
    with pytest.raises(ConfigError, match=r"rewards.functions: unknown \['gold'\]"):
        rl.RewardConfig(functions=("gold",))
    with pytest.raises(ConfigError, match="rewards.reward_model is not set"):
        rl.train(rl.PPORunConfig(name="p", workdir=str(tmp_path / "p"), model=MODEL))
    with pytest.raises(ConfigError, match="PPO-ptx needs both ptx_data and algorithm.ptx_coef"):
        rl.train(rl.PPORunConfig(name="p", workdir=str(tmp_path / "p"), model=MODEL, ptx_data="synthetic:vowel",
                                 rewards=rl.RewardConfig(functions=("task",)), value=rl.ValueConfig(init="policy")))
    with pytest.raises(ConfigError, match="set algorithm.micro_batches"):
        rl.train(_grpo(tmp_path, train=TrainConfig(micro_batches=2)))
    with pytest.raises(ValueError, match="group_size must be >= 2 for advantage 'grpo'"):
        grpo_config("grpo", group_size=1)
    with pytest.raises(FileNotFoundError, match="rewards.reward_model: /nonexistent does not exist"):
        rl.train(rl.GRPORunConfig(name="g", workdir=str(tmp_path / "g"), model=MODEL,
                                  rewards=rl.RewardConfig(functions=("reward_model",), reward_model="/nonexistent")))


def test_no_reward_function_and_an_uneven_minibatch_split_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="^rewards.functions is empty: give at least one reward function"):
        rl.RewardConfig(functions=())
    with pytest.raises(ConfigError, match=r"^data.batch_size 4 x algorithm.group_size 4 = 16 completions per step do "
                                          r"not split into algorithm.num_minibatches 3 x algorithm.micro_batches 1"):
        _grpo(tmp_path, algorithm=grpo_config("grpo", group_size=4, num_minibatches=3))
    with pytest.raises(ConfigError, match=r"^data.batch_size 6 completions per step do not split into "
                                          r"algorithm.num_minibatches 2 x algorithm.micro_batches 2"):
        rl.PPORunConfig(name="p", model=MODEL, data=DataConfig(batch_size=6),
                        algorithm=PPOConfig(num_minibatches=2, micro_batches=2))
    _grpo(tmp_path, algorithm=grpo_config("grpo", group_size=4, num_minibatches=8, micro_batches=2))  # 16 = 8 x 2


def test_dynamic_sampling_without_groups_is_a_config_error(tmp_path):
    """One completion per prompt: every 'group' has a single reward, so dynamic sampling would never drop
    one (it was accepted and did nothing)."""
    dynamic = rl.RolloutConfig(max_new_tokens=4, dynamic_sampling=True)
    with pytest.raises(ConfigError, match=r"^rollout.dynamic_sampling drops groups whose rewards are all equal, "
                                          r"and this run samples 1 completion per prompt"):
        rl.PPORunConfig(name="p", model=MODEL, rollout=dynamic)
    with pytest.raises(ConfigError, match=r"^rollout.dynamic_sampling drops groups"):
        _grpo(tmp_path, algorithm=grpo_config("reinforce_pp", group_size=1), rollout=dynamic)
    _grpo(tmp_path, rollout=dynamic)  # groups of 4: fine

def test_continuous_slots_fewer_than_the_group_is_a_config_error(tmp_path):
    """Continuous batching admits a prompt's group at once: slots < group_size was accepted by the config
    and failed after the model was built and compiled, in `generate_requests` ("request 0: num_samples=4
    exceeds num_slots=2"), naming neither key."""
    with pytest.raises(ConfigError, match=r"^rollout.continuous_slots=2 is fewer than algorithm.group_size=4: .* "
                                          r"set rollout.continuous_slots >= 4 \(or 0\)"):
        _grpo(tmp_path, rollout=rl.RolloutConfig(max_new_tokens=4, continuous_slots=2))
    _grpo(tmp_path, rollout=rl.RolloutConfig(max_new_tokens=4, continuous_slots=4))  # a group fits: fine
    _grpo(tmp_path, algorithm=grpo_config("remax"), rollout=rl.RolloutConfig(max_new_tokens=4, continuous_slots=1))



def test_overlong_buffer_longer_than_the_completions_is_a_config_error(tmp_path):
    """DAPO's overlong reward with a buffer beyond rollout.max_new_tokens was accepted by the config and
    failed only when the trainer built its rewards, with overlong_penalty's ValueError naming no key."""
    from rlhf_jax.rewards.registry import RewardConfig  # noqa: PLC0415

    overlong = RewardConfig(functions=("task", "overlong"), overlong_buffer=8)
    with pytest.raises(ConfigError, match=r"^rewards.overlong_buffer 8 must be in \[1, rollout.max_new_tokens=4\]"):
        _grpo(tmp_path, rewards=overlong)
    _grpo(tmp_path, rewards=dataclasses.replace(overlong, overlong_buffer=4))
    _grpo(tmp_path, rewards=RewardConfig(functions=("task",), overlong_buffer=8))  # no overlong reward: unused


def test_evaluate_scores_any_policy_on_held_out_prompts(tmp_path):
    metrics = rl.evaluate(_grpo(tmp_path), policies=[None, None])
    assert metrics[0] == metrics[1]  # same policy, same prompts, same key
    assert set(metrics[0]) == {"eval/reward", "eval/accuracy", "eval/completions/mean_length"}
    assert np.isclose(metrics[0]["eval/reward"], metrics[0]["eval/accuracy"])


def test_a_policy_lm_or_an_empty_directory_is_not_a_reward_model(grpo_run, tmp_path):
    """A policy checkpoint would get a random scalar head (rewards that are noise): refused, naming the key."""
    from rlhf_jax.train.weights import load_reward_model

    policy_checkpoints = os.path.join(grpo_run[1]["run_dir"], "checkpoints")
    with pytest.raises(ConfigError, match=r"^rewards.reward_model: .*checkpoints has no scalar 'score' head \(a "
                                          r"language model, or a bare backbone\), not a reward model"):
        load_reward_model(policy_checkpoints, MODEL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^rewards.reward_model: .*empty is neither a Hugging Face model "
                                                r"directory \(config.json\) nor an rlhf-jax checkpoint directory"):
        load_reward_model(str(tmp_path / "empty"), MODEL)


def test_reward_weights_must_match_the_given_reward_sources(tmp_path):
    one = PythonReward(lambda completions, **kwargs: [1.0] * len(completions), "one")
    with pytest.raises(ConfigError, match=r"^reward_weights has 2 entries for 1 reward_sources \['one'\]"):
        rl.train(_grpo(tmp_path, name="w2"), reward_sources=[one], reward_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match=r"^reward_weights weighs the given reward_sources, and none are given"):
        rl.train(_grpo(tmp_path, name="w0"), reward_weights=[2.0])


def test_a_reward_model_whose_tokenizer_maps_tokens_to_other_ids_is_refused(tmp_path):
    """Same vocabulary size, other token -> id map: the reward model would score other text than the
    policy wrote. A tokenizer saved with the reward model is compared with the policy's."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from rlhf_jax.data.offline_tokenizer import offline_tokenizer
    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.hf import save_hf

    policy_tok = offline_tokenizer()
    spec = json.loads(policy_tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    a, b = "1", "2"
    vocab[a], vocab[b] = vocab[b], vocab[a]                      # two ids swapped, the same size
    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                      **{k: getattr(policy_tok, k) for k in ("bos_token", "eos_token", "pad_token")})
    rm_dir = tmp_path / "rm"
    rm = CausalLM(MODEL, head="scalar")
    save_hf(rm_dir, MODEL, jax.device_get(rm.init(jax.random.key(0))))   # a scalar head: a classifier
    swapped.save_pretrained(rm_dir)
    config = _grpo(tmp_path, rewards=rl.RewardConfig(functions=("reward_model",), reward_model=str(rm_dir)))
    with pytest.raises(ValueError, match=r"reward model tokenizer differs from the policy's \(104 vs 104 entries"):
        rl.evaluate(config, policies=[None])
    policy_tok.save_pretrained(rm_dir)                         # the policy's own tokenizer: scored
    assert "eval/reward" in rl.evaluate(config, policies=[None])[0]
