"""ReMax (Li et al. 2023) in the GRPO family: the estimator, the preset, the batch key, the driver's greedy baseline.

A = r(x, y) - r(x, y_greedy): the pure estimator against NumPy; the preset's gradient against the
authors' REINFORCE loss (github.com/liziniu/ReMax, remax_trainer.py: returns (r - b) - beta k1_t,
token mean); the collector's greedy rows carried through dynamic sampling (stub sampler); and the
driver end to end on the tiny model, where the baseline must be the reward of the model's own argmax
decoding (recomputed here by a full forward pass per token) and the advantages reward - baseline.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.advantages import remax
from rlhf_jax.config import CheckpointConfig, ConfigError, LoggingConfig, TrainConfig
from rlhf_jax.data.synthetic import ArithmeticTask
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.rewards import PythonReward
from rlhf_jax.sampling import Greedy, SamplingConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.state import RLState, init_train_state
from rlhf_jax.steps import GRPO_PRESETS, GRPOConfig, grpo_advantages, grpo_config, grpo_objective, make_grpo_step
from rlhf_jax.testing import tiny_config
from rlhf_jax.train import rl
from rlhf_jax.train.rollouts import RolloutCollector
from rlhf_jax.train.run_config import DataConfig
from step_fixtures import IdTokenizer, StubSampler

MODEL = tiny_config(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, head_dim=16)


# ------------------------------------------------------------------------------------ the estimator


def test_remax_is_the_reward_minus_the_greedy_reward():
    rewards = np.array([1.0, 0.25, -2.0, 0.5], np.float32)
    greedy = np.array([0.5, 0.5, -1.0, 0.5], np.float32)
    np.testing.assert_array_equal(remax(rewards, greedy), [0.5, -0.25, -1.0, 0.0])
    np.testing.assert_array_equal(remax([3, 1], [1, 1]), [2.0, 0.0])  # lists of ints: float32 out
    assert remax([3, 1], [1, 1]).dtype == jnp.float32
    with pytest.raises(ValueError, match=r"^remax: shapes must match, got rewards\[4\], baseline_rewards\[2\]"):
        remax(rewards, greedy[:2])
    with pytest.raises(ValueError, match=r"^remax: baseline_rewards must have rank 1, got shape \(4, 1\)"):
        remax(rewards, greedy[:, None])
    with pytest.raises(TypeError, match=r"^remax: baseline_rewards must be an array, got NoneType"):
        remax(rewards, None)


def _rollout(seed=0, n=6, c=5):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.1, 3.0, (n, c)).astype(np.float32)
    return dict(mask=np.arange(c)[None] < rng.integers(1, c + 1, n)[:, None], logps=logps,
                ref=(logps + 0.3 * rng.normal(size=(n, c))).astype(np.float32),
                scores=rng.normal(size=n).astype(np.float32), baseline=rng.normal(size=n).astype(np.float32))


def test_grpo_advantages_of_remax_subtract_the_baseline_after_a_reward_kl():
    """With the KL in the reward (kl_mode 'reward'), only the sampled score pays it (as verl's ReMax: the
    greedy baseline is the bare reward); float64 NumPy oracle, pinned at one row."""
    a = _rollout()
    config = grpo_config("remax", kl_mode="reward", kl_coef=0.1, kl_estimator="k1")
    ours = grpo_advantages(a["scores"], a["mask"], config=config, old_logps=a["logps"], ref_logps=a["ref"],
                           baseline_scores=a["baseline"])
    k1 = (np.float64(a["logps"]) - a["ref"]) * a["mask"]
    expected = a["scores"] - 0.1 * k1.sum(1) - a["baseline"]
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours[0], 1.717422, rtol=1e-6)  # pinned
    # The preset's KL is in the loss: the advantage is r - b itself, any group size.
    plain = grpo_advantages(a["scores"], a["mask"], config=grpo_config("remax", group_size=3),
                            baseline_scores=a["baseline"])
    np.testing.assert_array_equal(plain, a["scores"] - a["baseline"])


def test_remax_preset_gradient_is_the_authors_reinforce_gradient():
    """The authors' trainer: returns_t = (r - b) - beta (logp_t - ref_t) (the token's own k1, no grad),
    loss = sum(-returns * logp * m) / sum(m), one update per batch. Its gradient in logp is
    -returns * m / sum(m); the preset (ppo at ratio 1, beta k2 in a token-mean loss) must give it exactly."""
    a = _rollout(1)
    config = grpo_config("remax")
    advantages = grpo_advantages(a["scores"], a["mask"], config=config, baseline_scores=a["baseline"])

    def ours(logps):
        return grpo_objective(logps, jax.lax.stop_gradient(logps), advantages, a["mask"], config=config,
                              ref_logps=a["ref"])[0]

    m = a["mask"].astype(np.float64)
    returns = (np.float64(a["scores"]) - a["baseline"])[:, None] - 0.05 * (np.float64(a["logps"]) - a["ref"])
    authors = -returns * m / m.sum()
    np.testing.assert_allclose(jax.grad(ours)(a["logps"]), authors, rtol=1e-5, atol=1e-7)


def test_remax_preset_and_config():
    config = grpo_config("remax")
    assert (config.advantage, config.policy_loss, config.loss_aggregation, config.kl_mode, config.kl_estimator_used,
            config.kl_coef, config.group_size, config.num_updates) == (
        "remax", "ppo", "token_mean", "loss", "k2", 0.05, 1, 1)
    assert config.greedy_baseline and not config.kl_in_reward
    assert [p for p in GRPO_PRESETS if grpo_config(p).greedy_baseline] == ["remax"]
    assert grpo_config("remax", group_size=4).shuffle_group(8) == 4  # several samples per prompt: allowed
    GRPOConfig(advantage="remax", group_size=1)  # no group needed, unlike the group estimators:
    with pytest.raises(ConfigError, match=r"^algorithm.group_size must be >= 2 for advantage 'rloo'"):
        GRPOConfig(advantage="rloo", group_size=1)


# ---------------------------------------------------------------------------------- the batch key


def _abstract_step_inputs(config, with_baseline):
    model = CausalLM(MODEL)
    tx = optax.sgd(0.1)
    state = jax.eval_shape(lambda: RLState(init_train_state(model.init, tx, 0), model.init(jax.random.key(0)),
                                           None, None))
    n, p, c = 4, 3, 5
    shapes = {"prompt_tokens": ((n, p), jnp.int32), "prompt_lengths": ((n,), jnp.int32),
              "completion_tokens": ((n, c), jnp.int32), "completion_mask": ((n, c), jnp.bool_),
              "scores": ((n,), jnp.float32), "ref_logps": ((n, c), jnp.float32)}
    if with_baseline:
        shapes["baseline_scores"] = ((n,), jnp.float32)
    batch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
    return make_grpo_step(model, tx, config=config), state, batch


def test_the_baseline_key_is_required_by_remax_and_refused_elsewhere():
    """Traced only (no compile): the step refuses a ReMax batch without `baseline_scores`, and a batch
    with them for an estimator that would ignore them; a ReMax batch with them traces."""
    step, state, batch = _abstract_step_inputs(grpo_config("remax"), with_baseline=False)
    with pytest.raises(KeyError, match=r"grpo_step: advantage='remax' needs batch\['baseline_scores'\]"):
        jax.eval_shape(step, state, batch)
    step, state, batch = _abstract_step_inputs(grpo_config("grpo", group_size=2), with_baseline=True)
    with pytest.raises(KeyError, match=r"grpo_step: batch\['baseline_scores'\] .* is read only with advantage='remax'"):
        jax.eval_shape(step, state, batch)
    step, state, batch = _abstract_step_inputs(grpo_config("remax"), with_baseline=True)
    _, metrics = jax.eval_shape(step, state, batch)
    assert "advantages/mean" in metrics
    bad = {**batch, "baseline_scores": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(ValueError, match=r"batch\['baseline_scores'\] must have shape \[4\], got \[2\]"):
        jax.eval_shape(step, state, bad)
    a = _rollout()
    with pytest.raises(ValueError, match=r"^grpo_advantages: advantage='remax' needs baseline_scores"):
        grpo_advantages(a["scores"], a["mask"], config=grpo_config("remax"))
    with pytest.raises(ValueError, match=r"^grpo_advantages: advantage='rloo' takes no baseline_scores"):
        grpo_advantages(a["scores"], a["mask"], config=grpo_config("rloo", group_size=2, kl_mode="none", kl_coef=0.0),
                        baseline_scores=a["baseline"])


# ------------------------------------------------------------------- the collector's greedy rows


@pytest.mark.parametrize("rounds", [4, 1])
def test_the_greedy_score_travels_with_its_prompts_rows_through_dynamic_sampling(rounds):
    """Groups of 2; odd prompts score their sample index (signal), even ones a constant 1, and a greedy
    completion 0.5 (even) or 9 (odd) plus p / 100. Batches of prompts 0-3 (3 real), 4-7, 8-11: with four
    rounds allowed the batch is prompts 1, 5, 7 (round 2 taken from the second batch), with one the
    zero-signal prompts 0, 2 fill it; each row carries its own prompt's greedy score."""
    def reward(completion_ids, **kwargs):
        out = []
        for p, second, _ in completion_ids:
            if second == 9:
                out.append((9.0 if p % 2 else 0.5) + p / 100)
            else:
                out.append(float(second) if p % 2 else 1.0)
        return out

    def prompts(first, real=4):
        ids = np.arange(first, first + 4, dtype=np.int32)
        return {"prompt_tokens": np.stack([ids, ids], 1), "prompt_lengths": np.full(4, 2, np.int32),
                "example_mask": np.arange(4) < real}

    sampling = SamplingConfig(max_new_tokens=3, num_samples=2, eos_id=2)
    collector = RolloutCollector(sampler=StubSampler(), tokenizer=IdTokenizer(), sources=[PythonReward(reward)],
                                 weights=None, train_sampling=sampling, eval_sampling=sampling, dynamic_sampling=True,
                                 max_sampling_rounds=rounds, greedy_baseline=True)
    assert collector.baseline_sampling == dataclasses.replace(sampling, num_samples=1, method=Greedy())
    first = prompts(0, real=3)
    first["prompt_tokens"][3] = 2  # a padding row: never sampled, greedily or not
    merged, _, m = collector.collect(None, first, iter([prompts(4), prompts(8)]), rng=jax.random.key(0))
    ids = {4: [1, 5, 7], 1: [1, 0, 2]}[rounds]
    assert merged["prompt_tokens"][:, 0].tolist() == np.repeat(ids, 2).tolist()
    expected = {4: [9.01, 9.05, 9.07], 1: [9.01, 0.5, 0.52]}[rounds]
    np.testing.assert_allclose(merged["baseline_scores"], np.repeat(expected, 2), rtol=1e-6)
    assert merged["baseline_scores"].dtype == np.float32
    np.testing.assert_allclose(m["remax/baseline_reward_mean"], np.mean(expected), rtol=1e-6)
    # Sampled rows 6 (round 1) + 8 (round 2), greedy rows 3 + 4, 3 tokens each.
    assert m["completions/generated_tokens"] == {4: (6 + 8 + 3 + 4) * 3.0, 1: (6 + 3) * 3.0}[rounds]


def test_a_recipe_whose_rollouts_have_no_greedy_baseline_is_refused():
    """A recipe bringing its own collector (the agentic one, `TrajectoryCollector.from_config` without the
    flag) has no greedy call: ReMax stops naming it when the trainer is built, not at the first update."""
    from types import SimpleNamespace  # noqa: PLC0415

    from rlhf_jax.train.recipe import Context  # noqa: PLC0415

    sampling = SamplingConfig(max_new_tokens=3, num_samples=1, eos_id=2)
    collector = RolloutCollector(sampler=StubSampler(), tokenizer=IdTokenizer(), sources=[], weights=None,
                                 train_sampling=sampling, eval_sampling=sampling)
    algorithm = SimpleNamespace(sampling_model=None, group_size=1)
    ctx = Context(config=SimpleNamespace(algorithm=grpo_config("remax"), mesh=MeshConfig()), data=None, mesh=None,
                  run=None, extras={}, program=SimpleNamespace(parts={"algorithm": algorithm}),
                  hooks={"rollout_parts": lambda *args: (collector, None)})
    with pytest.raises(ConfigError, match=r"^algorithm.advantage 'remax' needs each prompt's greedy completion "
                                          r"scored .* this recipe's rollouts \(RolloutCollector\) do not decode one"):
        rl._trainer(ctx)


# ------------------------------------------------------------------------------- the driver, end to end


def _run_config(tmp_path):
    """Two ReMax steps on the tiny model: 4 prompts x 2 samples, 4 new tokens, no evaluation."""
    return rl.GRPORunConfig(
        name="remax", workdir=str(tmp_path / "remax"), model=MODEL, mesh=MeshConfig(data=-1, strategy="dp"),
        data=DataConfig(train="synthetic:arithmetic", eval=None, num_train=64, max_len=16, batch_size=4,
                        arithmetic=ArithmeticTask(max_operand=9)),
        algorithm=grpo_config("remax", group_size=2), rollout=rl.RolloutConfig(max_new_tokens=4),
        optim=OptimizerConfig(learning_rate=1e-2), train=TrainConfig(steps=2, eval_every=0),
        checkpoint=CheckpointConfig(every=0, async_save=False),
        logging=LoggingConfig(every=1, console=False, tensorboard=False))


def test_remax_run_baseline_is_the_reward_of_the_greedy_completion(tmp_path):
    """Two ReMax steps (groups of 2) of the driver: every call of the reward function is recorded. Each
    step scores 8 sampled rows, then its 4 prompts' greedy completions; the first step's are the argmax
    decoding of the initial policy (a full forward per token here); the step's `remax/baseline_reward_mean`,
    `reward` and advantage statistics are those of the recorded rewards with A = r - b."""
    calls = []

    def reward(prompt_ids, completion_ids, **kwargs):
        calls.append((prompt_ids, completion_ids))
        return [float(sum(c) % 7) / 7 for c in completion_ids]

    config = _run_config(tmp_path)
    summary = rl.train(config, reward_sources=[PythonReward(reward, "mod7")])
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    assert [len(c[1]) for c in calls] == [8, 4, 8, 4]  # sampled rows, then one greedy row per prompt
    for (prompts, sampled), (greedy_prompts, greedy), record in zip(calls[::2], calls[1::2], records):
        assert prompts[::2] == greedy_prompts and prompts[1::2] == greedy_prompts
        r = np.array(reward(prompts, sampled), np.float64)
        b = np.array(reward(greedy_prompts, greedy), np.float64)
        adv = r - np.repeat(b, 2)
        np.testing.assert_allclose(record["remax/baseline_reward_mean"], b.mean(), rtol=1e-6)
        np.testing.assert_allclose(record["reward"], r.mean(), rtol=1e-6)
        np.testing.assert_allclose(record["advantages/mean"], adv.mean(), atol=1e-6)
        np.testing.assert_allclose(record["advantages/abs_max"], np.abs(adv).max(), rtol=1e-6)
        np.testing.assert_allclose(record["advantages/std"], adv.std(), rtol=1e-4, atol=1e-6)

    # The first step's greedy completions: argmax of the initial policy's logits, token by token, up
    # to a stop id (the tokenizer's EOS or the model's own).
    model = CausalLM(MODEL)
    params = jax.jit(model.init)(jax.random.fold_in(jax.random.key(config.seed), 0))
    forward = jax.jit(lambda p, t: model.forward(p, t).logits)
    prompts, greedy = calls[1]
    tokens = np.zeros((len(prompts), 16 + 4), np.int32)
    for i, ids in enumerate(prompts):
        tokens[i, : len(ids)] = ids
    for t in range(4):
        logits = np.asarray(forward(params, tokens))
        for i, ids in enumerate(prompts):
            tokens[i, len(ids) + t] = int(np.argmax(logits[i, len(ids) + t - 1]))
    for i, ids in enumerate(prompts):
        argmax = tokens[i, len(ids): len(ids) + 4].tolist()
        assert argmax[: len(greedy[i])] == greedy[i], (i, argmax, greedy[i])


# ---------------------------------------------------------------------------------------- the plan


def test_the_plan_compiles_the_greedy_call_and_the_batch_key(tmp_path):
    """`rlhf-jax compile` plans what a ReMax run executes: the greedy call of one completion per prompt is
    another decode program on the sampler's devices (its prefill is the sampled one's at the preset's one
    sample per prompt; with groups it is planned too, `aot_online._sampler_programs`), and the update's
    batch holds `baseline_scores`."""
    from rlhf_jax.train.aot import plan_run  # noqa: PLC0415

    base = _run_config(tmp_path)
    config = dataclasses.replace(base, algorithm=grpo_config("remax", kl_mode="none", kl_coef=0.0),  # no reference
                                 data=dataclasses.replace(base.data, batch_size=8))
    plan = plan_run(config)
    assert [p.name for p in plan.programs] == [
        "update step", "weight hand-off (trainer -> sampler layout)", "sampler prefill", "sampler decode loop",
        "sampler decode loop (greedy baseline)"]
    assert all(p.ok for p in plan.programs), [p.error for p in plan.programs if not p.ok]
    assert plan.program_peaks["sampler decode loop (greedy baseline)"] > 0
    batch = rl.GRPO_RECIPE.build(config, rl._trainer_mesh(config)).batch
    assert batch["baseline_scores"].shape == (8,) and batch["scores"].shape == (8,)


def test_agentic_runs_refuse_remax_when_configured():
    from rlhf_jax.train.agentic import AgenticGRPORunConfig

    with pytest.raises(ConfigError, match=r"algorithm.advantage='remax' needs each prompt's greedy completion scored"):
        AgenticGRPORunConfig(name="a", algorithm=grpo_config("remax"))
