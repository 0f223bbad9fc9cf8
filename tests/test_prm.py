"""Process reward models: step-labelled data (one-line errors), the step-end loss and its aggregation
against hand-computed values, TRL's labelling positions, the recipe end to end at tiny size."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data.formats import DataError
from rlhf_jax.data.prm import StepExample, load_step_dataset, read_step_rows, step_batches, tokenize_steps
from rlhf_jax.losses.process_reward import aggregate_step_scores, process_reward_loss
from rlhf_jax.testing import offline_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loss_is_binary_cross_entropy_at_step_ends_only():
    s = jnp.array([[0.3, -1.2, 2.0, 5.0], [1.0, 0.0, -0.5, 4.0]])
    y = jnp.array([[1, 0, 0, 1], [0, 1, 1, 0]])
    m = jnp.array([[0, 1, 1, 0], [1, 0, 1, 0]])
    p = 1 / (1 + np.exp(-np.asarray(s)))
    want = -np.asarray(m) * (np.asarray(y) * np.log(p) + (1 - np.asarray(y)) * np.log(1 - p))
    np.testing.assert_allclose(process_reward_loss(s, y, m), want, rtol=1e-6, atol=1e-7)
    # Only the masked positions carry gradient.
    g = jax.grad(lambda s: process_reward_loss(s, y, m).sum())(s)
    assert np.all(np.asarray(g)[np.asarray(m) == 0] == 0)
    # Two-class softmax cross-entropy with logits (0, s) equals it (TRL's token classification).
    two = jnp.stack([jnp.zeros_like(s), s], -1)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(two), y[..., None], -1)[..., 0] * m
    np.testing.assert_allclose(process_reward_loss(s, y, m), ce, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="one shape"):
        process_reward_loss(s, y[:, :3], m)


def test_aggregations_against_hand_values():
    s = jnp.log(jnp.array([[0.9, 0.5, 0.8, 0.2], [0.6, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]) /
                (1 - jnp.array([[0.9, 0.5, 0.8, 0.2], [0.6, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])))
    m = jnp.array([[1, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    want = {"min": [0.2, 0.6, 0.0], "prod": [0.9 * 0.8 * 0.2, 0.6, 0.0], "last": [0.2, 0.6, 0.0],
            "mean": [(0.9 + 0.8 + 0.2) / 3, 0.6, 0.0]}
    for mode, values in want.items():
        np.testing.assert_allclose(aggregate_step_scores(s, m, mode=mode), values, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mode must be one of"):
        aggregate_step_scores(s, m, mode="max")


def test_tokenization_labels_the_last_separator_token_of_each_step():
    tok = offline_tokenizer()
    data = tokenize_steps([StepExample("1+2:", ("1+2=3", "3"), (1, 0))], tok, max_len=16)
    ids = [tok.bos_token_id] + tok.encode("1+2:1+2=3\n3\n", add_special_tokens=False)
    assert data.tokens[0, :len(ids)].tolist() == ids and data.lengths[0] == len(ids)
    ends = np.flatnonzero(data.step_mask[0]).tolist()
    assert ends == [len(ids) - 3, len(ids) - 1]  # the two "\n"
    assert data.step_labels[0, ends].tolist() == [1, 0] and data.step_labels[0].sum() == 1
    # A two-token separator: the label sits on its last token.
    data = tokenize_steps([StepExample("p", ("a", "b"), (1, 1))], tok, max_len=16, step_separator=" ;")
    assert np.flatnonzero(data.step_mask[0]).tolist() == [4, 7]
    # Steps that do not fit are dropped (counted); a first step that does not fit is an error.
    data = tokenize_steps([StepExample("p", ("aaaa", "bbbb"), (1, 0))], tok, max_len=9)
    assert data.num_truncated == 1 and data.step_mask[0].sum() == 1
    with pytest.raises(DataError, match=r"<rows> row 0: the prompt and first step"):
        tokenize_steps([StepExample("p", ("a" * 20,), (1,))], tok, max_len=9)


def test_bad_rows_are_one_line_errors_naming_file_and_line(tmp_path):
    path = tmp_path / "steps.jsonl"
    rows = [{"prompt": "1+1:", "completions": ["1+1=2"], "labels": [True]},
            {"prompt": "2+2:", "completions": ["2+2=4", "4"], "labels": [True]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as err:
        read_step_rows(str(path))
    assert str(err.value) == f"{path} line 2: 1 labels for 2 steps; 'labels' needs one label per step"
    cases = [({"prompt": "p", "completions": ["a"], "labels": ["maybe"]}, "labels[0] is 'maybe'"),
             ({"prompt": "p", "completions": "a", "labels": [1]}, "must be a non-empty list"),
             ({"prompt": "p", "labels": [1]}, "missing column 'completions'"),
             ({"prompt": "p", "completions": [3], "labels": [1]}, "completions[0] must be a string")]
    for row, message in cases:
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=f"line 1: .*{message[:20]}".replace("[", r"\[").replace("]", r"\]")):
            read_step_rows(str(path))
    # Math-Shepherd's '+'/'-' labels and a `steps` column are read too.
    path.write_text(json.dumps({"prompt": "p", "steps": ["a", "b"], "labels": ["+", "-"]}) + "\n")
    assert read_step_rows(str(path))[0].labels == (1, 0)


def test_step_batches_resume_by_position():
    tok = offline_tokenizer()
    data = tokenize_steps([StepExample("p", (str(i),), (i % 2,)) for i in range(10)], tok, max_len=8)
    full = step_batches(data, batch_size=4, seed=3)
    first = [next(full)["tokens"] for _ in range(5)]
    resumed = step_batches(data, batch_size=4, seed=3, start=3)
    np.testing.assert_array_equal(next(resumed)["tokens"], first[3])


def test_prm_recipe_learns_and_scores(tmp_path):
    """The PRM recipe end to end on a tiny model: the step loss falls in a few dozen steps (to the label
    prior at least; experiments/prm_tiny.py shows the checks learned); the scorer reproduces the
    training positions' step logits and ranks by aggregated score."""
    from rlhf_jax.cli import load_experiment
    from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
    from rlhf_jax.models import CausalLM
    from rlhf_jax.optim import OptimizerConfig
    from rlhf_jax.testing import tiny_config
    from rlhf_jax.train import prm
    from rlhf_jax.train.run_config import DataConfig
    from rlhf_jax.train.weights import initial_params

    module, _ = load_experiment(os.path.join(ROOT, "experiments", "prm_tiny.py"))
    chain_rows = module.chain_rows
    for name, n, seed in (("train", 1024, 0), ("eval", 128, 1)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chain_rows(n, seed=seed,
                                                                                                error_rate=0.2)))
    model_config = tiny_config(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
                               head_dim=16)
    config = prm.PRMConfig(name="prm", workdir=str(tmp_path / "run"), model=model_config,
                           data=DataConfig(train=str(tmp_path / "train.jsonl"), eval=str(tmp_path / "eval.jsonl"),
                                           max_len=32, batch_size=32),
                           optim=OptimizerConfig(learning_rate=3e-3),
                           train=TrainConfig(steps=60, eval_every=60, eval_batches=2),
                           checkpoint=CheckpointConfig(every=0, keep=1), logging=LoggingConfig(every=60, tensorboard=False))
    summary = prm.train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/loss" in r]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.1, evals
    assert summary["eval"]["eval/accuracy"] >= 0.75, summary["eval"]  # 80% of the steps are correct
    model = CausalLM(model_config, head="scalar")
    params = initial_params(model, str(tmp_path / "run" / "checkpoints"), rng=jax.random.key(0))
    scorer = prm.PRMScorer(model, params, offline_tokenizer(), max_len=32, batch_size=8)
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()[:10]]
    data = load_step_dataset(str(tmp_path / "eval.jsonl"), offline_tokenizer(), max_len=32)
    logits, mask = scorer.step_logits([r["prompt"] for r in rows], [r["completions"] for r in rows])
    np.testing.assert_array_equal(mask, data.step_mask[:10])
    direct = np.asarray(model.forward(params, jnp.asarray(data.tokens[:10])).values)
    np.testing.assert_allclose(logits, direct, atol=1e-5)
    scores = scorer.score([r["prompt"] for r in rows], [r["completions"] for r in rows], mode="prod")
    np.testing.assert_allclose(scores, aggregate_step_scores(direct, data.step_mask[:10], mode="prod"), atol=1e-5)
    assert prm.best_of_n(scores, 5).tolist() == [int(np.argmax(scores[:5])), int(np.argmax(scores[5:]))]
    # As a reward source for RL: completions split at the separator into steps, min-aggregated.
    from rlhf_jax.rewards import RewardInputs, combine_rewards

    n = len(rows)
    inputs = RewardInputs(prompt_tokens=np.ones((n, 2), np.int32), prompt_lengths=np.full(n, 2, np.int32),
                          completion_tokens=np.ones((n, 3), np.int32), completion_mask=np.ones((n, 3), bool),
                          truncated=np.zeros(n, bool), prompts=[r["prompt"] for r in rows],
                          completions=["\n".join(r["completions"]) + "\n" for r in rows])
    result = combine_rewards([scorer.reward(mode="min")], inputs)
    np.testing.assert_allclose(result.per_source["prm"], aggregate_step_scores(direct, data.step_mask[:10], mode="min"),
                               atol=1e-5)
    # By name from a config: rewards.functions=["prm"] loads the checkpoint (architecture saved with it).
    from rlhf_jax.config import ConfigError
    from rlhf_jax.rewards.registry import RewardConfig, RewardContext, build_rewards

    by_name = RewardConfig(functions=("prm",), process_reward_model=str(tmp_path / "run" / "checkpoints"),
                           prm_aggregation="prod", prm_max_len=32, reward_model_batch_size=8)
    sources, _ = build_rewards(RewardContext(by_name, max_new_tokens=8))
    np.testing.assert_allclose(combine_rewards(sources, inputs).per_source["prm"],
                               aggregate_step_scores(direct, data.step_mask[:10], mode="prod"), atol=1e-5)
    with pytest.raises(ConfigError, match="'prm' but rewards.process_reward_model is not set"):
        build_rewards(RewardContext(RewardConfig(functions=("prm",)), max_new_tokens=8))
    with pytest.raises(ConfigError, match="rewards.prm_aggregation"):
        RewardConfig(functions=("prm",), prm_aggregation="max")
    # The run's config.json beside the checkpoints: its separator is enforced, its aggregation the default.
    ckpt = str(tmp_path / "run" / "checkpoints")
    with pytest.raises(ConfigError, match=r"trained with algorithm.step_separator='\\n', but it would score with "
                                          r"step_separator='\\n\\n'"):
        prm.load_prm_scorer(ckpt, max_len=32, step_separator="\n\n", tokenizer="offline")
    assert prm.load_prm_scorer(ckpt, max_len=32, tokenizer="offline").mode == "min"
    config_file = tmp_path / "run" / "config.json"
    recorded = json.loads(config_file.read_text())
    recorded["algorithm"]["aggregation"] = "prod"
    config_file.write_text(json.dumps(recorded))
    loaded = prm.load_prm_scorer(ckpt, max_len=32, tokenizer="offline", batch_size=8)
    assert loaded.mode == "prod"
    np.testing.assert_allclose(loaded.score([r["prompt"] for r in rows], [r["completions"] for r in rows]),
                               aggregate_step_scores(direct, data.step_mask[:10], mode="prod"), atol=1e-5)


# --- input validation (API audit) ---

def test_aggregate_step_scores_checks_the_mask_shape():
    with pytest.raises(ValueError, match="aggregate_step_scores: shapes must match"):
        aggregate_step_scores(jnp.zeros((2, 3)), jnp.ones((2, 1)))
    with pytest.raises(ValueError, match="step_mask must have rank 2"):
        aggregate_step_scores(jnp.zeros((2, 3)), jnp.ones(2))


def test_process_reward_loss_checks_concrete_labels_at_step_ends():
    with pytest.raises(ValueError, match="labels must be 0 or 1 where step_mask is set"):
        process_reward_loss(jnp.zeros((1, 2)), jnp.array([[2, -1]]), jnp.ones((1, 2)))
    # labels off step ends (TRL's -100) are not read
    loss = process_reward_loss(jnp.zeros((1, 2)), jnp.array([[1, -100]]), jnp.array([[1, 0]]))
    np.testing.assert_allclose(loss, [[np.log(2.0), 0.0]], rtol=1e-6)


# --- audit: truncation, empty steps and solutions, bad n ---

def test_outcome_label_counts_a_wrong_step_cut_by_max_len():
    from rlhf_jax.train.prm import outcome_labels

    tok = offline_tokenizer()
    data = tokenize_steps([StepExample("p", ("aaaa", "bbbb"), (1, 0)), StepExample("p", ("aaaa", "bbbb"), (1, 1))],
                          tok, max_len=9)
    assert data.num_truncated == 2 and data.solution_labels.tolist() == [0, 1]
    orm = outcome_labels(data)
    # One label per row at its last kept step end: the first solution is wrong (its cut step was).
    assert orm.step_mask.sum(axis=1).tolist() == [1, 1]
    assert orm.step_labels[orm.step_mask].tolist() == [0, 1]


def test_empty_steps_are_data_errors_naming_the_row(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completions": ["a", " ", "b"], "labels": [1, 0, 1]}) + "\n")
    with pytest.raises(DataError) as err:
        read_step_rows(str(path))
    assert str(err.value) == (f"{path} line 1: completions[1] is an empty step ' '; every step needs text before "
                              "its separator")


def test_scorer_scores_every_step_or_refuses_and_scores_no_steps_as_zero():
    from rlhf_jax.models import CausalLM
    from rlhf_jax.testing import tiny_config
    from rlhf_jax.train import prm

    model = CausalLM(tiny_config(), head="scalar")
    scorer = prm.PRMScorer(model, model.init(jax.random.key(0)), offline_tokenizer(), max_len=12, batch_size=4)
    # A solution with no steps (an empty completion as an RL reward) scores 0, not its separator's score.
    scores = scorer.score(["p", "p"], [[], ["ab"]])
    assert scores[0] == 0.0 and 0.0 < scores[1] < 1.0
    logits, mask = scorer.step_logits(["p"], [["ab"]])
    assert scores[1] == pytest.approx(1 / (1 + np.exp(-logits[0][mask[0]][0])), abs=1e-6)
    # A solution whose last steps do not fit would be scored on its first steps only: refused.
    with pytest.raises(ValueError, match=r"PRMScorer: solution 1 has 3 steps but only its first 2 fit in "
                                         r"max_len=12 tokens"):
        scorer.score(["p", "p"], [["ab"], ["aaaa", "bbbb", "cccc"]])
    with pytest.raises(ValueError, match="best_of_n: n must be a positive int, got 0"):
        prm.best_of_n(np.zeros(4), 0)


def test_a_step_holding_the_separator_warns():
    """Training labels such a step once; scoring splits completions at every separator: say so."""
    rows = [StepExample("p", ("a", "b"), (1, 1)), StepExample("p", ("a\nb", "c"), (1, 0))]
    with pytest.warns(UserWarning, match=r"^tokenize_steps: 1 rows of <rows> have a step containing the step "
                                         r"separator '\\n' \(the first: row 1\)"):
        data = tokenize_steps(rows, offline_tokenizer(), max_len=32)
    assert data.step_mask.sum(axis=1).tolist() == [2, 2]
