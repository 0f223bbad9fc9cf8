"""Reward models: Bradley-Terry goldens and a torch TRL oracle (margins, centering, ties), sharded == single
device, micro-batching, packed == unpacked, truncation-made ties, and a trained run exported to transformers."""

import numpy as np
import pytest

from step_fixtures import STRATEGY_MESHES, host_params, max_rel_diff, pair_batches, run_steps, tiny_lm
from rlhf_jax.steps import make_reward_model_step

BATCHES = pair_batches(3)


@pytest.fixture(scope="module")
def single_device():
    return run_steps(make_reward_model_step, head="scalar", shape=None, strategy="dp", batches=BATCHES)


def _numpy_rewards(params, tokens, mask):
    """The scalar head's value at each row's last target token."""
    values = np.asarray(tiny_lm("scalar").forward(params, tokens).values, np.float64)
    last = np.array([np.nonzero(row)[0].max() for row in mask])
    return values[np.arange(len(last)), last]


def _numpy_reward_stats(batch, present=None):
    """TRL's `min_reward`, `mean_reward`, `max_reward` over both sides' rewards of the present pairs, and
    `num_tokens` (`attention_mask.sum()`: the non-pad tokens of both sides, pad id 0 in `pair_batches`)."""
    keep = np.ones(len(batch["chosen_tokens"]), bool) if present is None else present
    c, r = (_numpy_rewards(host_params("scalar"), batch[k + "_tokens"][keep], batch[k + "_loss_mask"][keep])
            for k in ("chosen", "rejected"))
    both = np.concatenate([c, r])
    tokens = sum(int((batch[k + "_tokens"][keep] != 0).sum()) for k in ("chosen", "rejected"))
    return {"min_reward": both.min(), "mean_reward": both.mean(), "max_reward": both.max(), "num_tokens": tokens}


def test_first_step_matches_numpy_bradley_terry(single_device):
    _, history = single_device
    b = BATCHES[0]
    c = _numpy_rewards(host_params("scalar"), b["chosen_tokens"], b["chosen_loss_mask"])
    r = _numpy_rewards(host_params("scalar"), b["rejected_tokens"], b["rejected_loss_mask"])
    assert history[0]["loss"] == pytest.approx(np.mean(np.log1p(np.exp(-(c - r)))), rel=1e-5)
    assert history[0]["accuracy"] == pytest.approx(np.mean(c > r))
    assert history[0]["margin"] == pytest.approx(np.mean(c - r), rel=1e-4, abs=1e-7)
    assert history[0]["rewards/chosen"] == pytest.approx(np.mean(c), rel=1e-4, abs=1e-7)
    for key, value in _numpy_reward_stats(b).items():
        assert history[0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("strategy", list(STRATEGY_MESHES))
def test_sharded_equals_single_device(single_device, strategy):
    params, history = run_steps(make_reward_model_step, head="scalar", shape=STRATEGY_MESHES[strategy],
                                strategy=strategy, batches=BATCHES)
    ref_params, ref_history = single_device
    assert max_rel_diff(params, ref_params) <= 1e-5
    for got, want in zip(history, ref_history):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["accuracy"] == want["accuracy"]
        for key in ("min_reward", "mean_reward", "max_reward", "num_tokens"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_gradient_accumulation_4x2_equals_batch_of_8(single_device):
    params, history = run_steps(make_reward_model_step, head="scalar", shape=None, strategy="dp",
                                batches=BATCHES, micro_batches=4)
    assert max_rel_diff(params, single_device[0]) <= 1e-5
    for got, want in zip(history, single_device[1]):
        for key in ("loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


def test_reward_extremes_are_the_whole_batch_s_over_micro_batches_and_devices():
    """TRL's `min_reward` / `max_reward` (`RewardTrainer.compute_loss`: over the gathered chosen and rejected
    rewards) are the batch's extremes with 2 micro-batches on 4 devices, not the mean of the micro-batches'
    (as every other step metric is combined); a padding pair (no target on either side) is in no statistic
    and reads no token; `num_tokens` sums the micro-batches."""
    b = {k: v.copy() for k, v in BATCHES[0].items()}
    b["chosen_loss_mask"][5] = b["rejected_loss_mask"][5] = 0
    present = np.arange(8) != 5
    want = _numpy_reward_stats(b, present)
    _, (got,) = run_steps(make_reward_model_step, head="scalar", shape={"data": 2, "fsdp": 2}, strategy="fsdp",
                          batches=[b], micro_batches=2)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    pieces = [_numpy_reward_stats(b, present & (np.arange(8) % 2 == k)) for k in range(2)]  # the interleaved split
    assert np.mean([p["min_reward"] for p in pieces]) > want["min_reward"] + 1e-3  # what averaging them gave


def test_margin_shifts_the_loss():
    batch = dict(BATCHES[0], margin=np.full(8, 0.5, np.float32))
    _, with_margin = run_steps(make_reward_model_step, head="scalar", shape=None, strategy="dp", batches=[batch])
    b = BATCHES[0]
    c = _numpy_rewards(host_params("scalar"), b["chosen_tokens"], b["chosen_loss_mask"])
    r = _numpy_rewards(host_params("scalar"), b["rejected_tokens"], b["rejected_loss_mask"])
    assert with_margin[0]["loss"] == pytest.approx(np.mean(np.log1p(np.exp(-(c - r - 0.5)))), rel=1e-5)


def _trl_reward_loss(c, r, margin=None, center_rewards_coefficient=None):
    """TRL's `RewardTrainer.compute_loss` re-implemented in torch (float64): the oracle of the tests below."""
    torch = pytest.importorskip("torch")
    c, r = torch.tensor(c, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
    diff = c - r if margin is None else c - r - torch.tensor(margin, dtype=torch.float64)
    loss = -torch.nn.functional.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((c + r) ** 2)
    return float(loss), float((c > r).double().mean()), float((c - r).mean())


def _tie_batch():
    """BATCHES[0] with per-pair margins and pair 0 a tie (its rejected sequence is its chosen one)."""
    b = {k: v.copy() for k, v in BATCHES[0].items()}
    b["rejected_tokens"][0], b["rejected_loss_mask"][0] = b["chosen_tokens"][0], b["chosen_loss_mask"][0]
    b["margin"] = np.linspace(-1.0, 1.0, 8).astype(np.float32)
    return b


def test_loss_and_metrics_match_trl_with_margins_centering_and_a_tie():
    """TRL: `-logsigmoid(r_c - r_r - margin).mean() + eta * mean((r_c + r_r)^2)`; accuracy counts
    `r_c > r_r` only, so the tied pair is a miss."""
    batch = _tie_batch()
    _, history = run_steps(make_reward_model_step, head="scalar", shape=None, strategy="dp", batches=[batch],
                           center_rewards_coefficient=0.05)
    c = _numpy_rewards(host_params("scalar"), batch["chosen_tokens"], batch["chosen_loss_mask"])
    r = _numpy_rewards(host_params("scalar"), batch["rejected_tokens"], batch["rejected_loss_mask"])
    assert c[0] == r[0] and (c[1:] > r[1:]).any() and (c[1:] < r[1:]).any()
    loss, accuracy, margin = _trl_reward_loss(c, r, batch["margin"], 0.05)
    assert history[0]["loss"] == pytest.approx(loss, rel=1e-5)
    assert history[0]["accuracy"] == pytest.approx(accuracy) and accuracy == np.mean(c[1:] > r[1:]) * 7 / 8
    assert history[0]["margin"] == pytest.approx(margin, rel=1e-4, abs=1e-7)
    assert history[0]["rewards/rejected"] == pytest.approx(np.mean(r), rel=1e-4, abs=1e-7)


def test_eval_loss_is_the_training_objective_with_margins_and_centering():
    """`eval/loss` is TRL's `eval_loss`: the training loss, centering term included (it was left out)."""
    from step_fixtures import single_device_mesh
    from rlhf_jax.train.reward_model import make_reward_model_eval

    batch = dict(_tie_batch(), example_mask=np.ones((8, 1), bool))
    batch["margin"] = batch["margin"][:, None]
    c = _numpy_rewards(host_params("scalar"), batch["chosen_tokens"], batch["chosen_loss_mask"])
    r = _numpy_rewards(host_params("scalar"), batch["rejected_tokens"], batch["rejected_loss_mask"])
    loss, accuracy, margin = _trl_reward_loss(c, r, batch["margin"][:, 0], 0.5)
    got = make_reward_model_eval(tiny_lm("scalar"), [batch], mesh=single_device_mesh(), strategy="dp",
                                 center_rewards_coefficient=0.5)(host_params("scalar"))
    assert got["eval/loss"] == pytest.approx(loss, rel=1e-5)
    assert got["eval/accuracy"] == pytest.approx(accuracy) and got["eval/margin"] == pytest.approx(margin, rel=1e-4)
    assert got["eval/mean_reward"] == pytest.approx(np.mean(np.concatenate([c, r])), rel=1e-4, abs=1e-6)
    # a pair-weighted mean of per-batch extremes or token counts is no held-out statistic: not reported
    assert set(got) == {"eval/loss", "eval/accuracy", "eval/margin", "eval/mean_reward", "eval/rewards/chosen",
                        "eval/rewards/rejected"}
    plain = make_reward_model_eval(tiny_lm("scalar"), [batch], mesh=single_device_mesh(), strategy="dp")
    assert plain(host_params("scalar"))["eval/loss"] == pytest.approx(_trl_reward_loss(c, r, batch["margin"][:, 0])[0],
                                                                      rel=1e-5)


def _preference_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt": "q" + "".join(rng.choice(list("abc"), int(rng.integers(1, 6)))),
             "chosen": "a" * int(rng.integers(1, 6)) + "e", "rejected": "k" * int(rng.integers(1, 6)),
             "margin": float(rng.random())} for _ in range(n)]


def test_packed_pairs_train_like_unpacked_pairs_with_margins_and_centering():
    """Several pairs per row (data.pack): each pair's reward is read at its own segment's last token and
    its margin from its slot; loss and gradients equal the same pairs one per row."""
    import jax
    import optax

    from rlhf_jax.data import BatchConfig, BatchIterator, TokenizeConfig, collate, load_dataset
    from rlhf_jax.state import TrainState
    from rlhf_jax.testing.tokenizer import offline_tokenizer

    ds = load_dataset(_preference_rows(12), kind="preference", tokenizer=offline_tokenizer(),
                      config=TokenizeConfig(max_len=16))
    it = BatchIterator(ds, BatchConfig(batch_size=3, seq_len=40, pack=True, max_segments=4, seed=1),
                       process_index=0, process_count=1)
    packed, rows = next(it), it.last_rows
    assert max(map(len, rows)) >= 3
    single = collate(ds, [[i] for row in rows for i in row], seq_len=16)
    params, sgd = host_params("scalar"), optax.sgd(1.0)

    def loss_and_grads(batch, max_segments):
        update = jax.jit(make_reward_model_step(tiny_lm("scalar"), sgd, max_segments=max_segments, nonfinite="off",
                                                center_rewards_coefficient=0.1))
        state = TrainState(np.zeros((), np.int32), params, sgd.init(params), jax.random.PRNGKey(0))
        new, metrics = update(state, {k: v for k, v in batch.items() if k != "example_mask"})
        grads = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), params, new.params)
        return metrics, grads

    got, got_grads = loss_and_grads(packed, 4)
    want, want_grads = loss_and_grads(single, 1)
    for key in ("loss", "accuracy", "margin", "rewards/chosen", "min_reward", "mean_reward", "max_reward",
                "num_tokens"):
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6), key
    assert float(got["num_tokens"]) == sum(int(np.sum(single[k + "_segment_ids"] > 0)) for k in ("chosen", "rejected"))
    for x, y in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    assert max(np.abs(x).max() for x in jax.tree.leaves(want_grads)) > 1e-3


def test_a_pair_made_identical_by_truncation_is_a_bad_row():
    """keep_start cuts both completions' ends: a pair sharing a long prefix became the same tokens and
    was trained as a tie (zero gradient, an accuracy miss), reported only as "sequences truncated"."""
    from rlhf_jax.data import DataError, TokenizeConfig, load_dataset
    from rlhf_jax.testing.tokenizer import offline_tokenizer

    rows = [{"prompt": "q", "chosen": "ab", "rejected": "cd"},
            {"prompt": "p", "chosen": "aaaaaaaaaaX", "rejected": "aaaaaaaaaaY"}]
    config = TokenizeConfig(max_len=8, truncation="keep_start")
    with pytest.raises(DataError, match=r"^<rows> row 1: 'chosen' and 'rejected' are identical after truncation to "
                                        r"max_len=8 \(truncation='keep_start'\)$"):
        load_dataset(rows, kind="preference", tokenizer=offline_tokenizer(), config=config)
    ds = load_dataset(rows, kind="preference", tokenizer=offline_tokenizer(), config=config, on_error="skip")
    assert len(ds) == 1 and len(ds.skipped) == 1
    # keep_end keeps both completions' ends: the pair stays a preference.
    kept = load_dataset(rows, kind="preference", tokenizer=offline_tokenizer(),
                        config=TokenizeConfig(max_len=8, truncation="keep_end"))
    assert len(kept) == 2 and list(kept.arrays["chosen_tokens"][1]) != list(kept.arrays["rejected_tokens"][1])


def test_a_trained_reward_model_exports_and_scores_alike_in_transformers_and_as_a_reward(tmp_path):
    """A `reward_model.train` run (margins, centering, held-out eval) -> `rlhf-jax export` -> transformers'
    `LlamaForSequenceClassification` scores the held-out pairs (right-padded, with an attention mask) as
    the run's checkpoint and the export do as `rlhf_jax.rewards` reward models, within 1e-4; the run's
    final `eval/loss` is TRL's loss of those scores, centering term included."""
    import json

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rlhf_jax.cli import main as cli_main
    from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
    from rlhf_jax.data import TokenizeConfig, load_dataset
    from rlhf_jax.optim import OptimizerConfig
    from rlhf_jax.rewards import RewardModelReward
    from rlhf_jax.sharding import MeshConfig
    from rlhf_jax.testing import tiny_config
    from rlhf_jax.testing.tokenizer import offline_tokenizer
    from rlhf_jax.train import reward_model
    from rlhf_jax.train.run_config import DataConfig
    from rlhf_jax.train.weights import load_reward_model

    rows = _preference_rows(16, seed=3)
    for name, part in (("train", rows), ("eval", rows[:6])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    config = reward_model.RewardModelConfig(
        name="rm", workdir=str(tmp_path / "run"), model=tiny_config(),
        data=DataConfig(train=str(tmp_path / "train.jsonl"), eval=str(tmp_path / "eval.jsonl"), max_len=16,
                        batch_size=8),
        optim=OptimizerConfig(learning_rate=3e-3), mesh=MeshConfig(strategy="dp"),
        train=TrainConfig(steps=2, eval_every=2), checkpoint=CheckpointConfig(every=2, async_save=False),
        logging=LoggingConfig(console=False, tensorboard=False),
        algorithm=reward_model.RewardModelAlgorithm(center_rewards_coefficient=0.5))
    summary = reward_model.train(config)
    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.pad_token_id == 0

    pairs = load_dataset(rows[:6], kind="preference", tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=16))
    scores = {}
    for side in ("chosen", "rejected"):
        seqs = [np.asarray(pairs.arrays[f"{side}_tokens"][i]) for i in range(6)]
        masks = [np.asarray(pairs.arrays[f"{side}_loss_mask"][i]) for i in range(6)]
        width = max(map(len, seqs))
        ids = np.stack([np.pad(s, (0, width - len(s))) for s in seqs])
        attention = (np.arange(width)[None] < np.array([len(s) for s in seqs])[:, None]).astype(np.int64)
        with torch.no_grad():
            scores[side] = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                              attention_mask=torch.tensor(attention)).logits[:, 0].numpy()
        starts = np.array([int(np.argmax(m)) for m in masks], np.int32)  # the first trained token
        prompts = np.where(np.arange(width)[None] < starts[:, None], ids, 0).astype(np.int32)
        completions = np.zeros_like(ids, np.int32)
        for i, (s, start) in enumerate(zip(seqs, starts)):
            completions[i, :len(s) - start] = s[start:]
        for path in (tmp_path / "run" / "checkpoints", tmp_path / "hf"):
            model, params = load_reward_model(str(path), None)
            completion_mask = np.arange(width)[None] < (attention.sum(1) - starts)[:, None]
            ours = RewardModelReward(model, params, policy_vocab_size=256, batch_size=4).score(
                prompts, starts, completions, completion_mask)
            np.testing.assert_allclose(ours, scores[side], atol=1e-4, rtol=0)
    assert np.ptp(scores["chosen"]) > 0.01
    loss, accuracy, margin = _trl_reward_loss(scores["chosen"], scores["rejected"],
                                              [r["margin"] for r in rows[:6]], 0.5)
    assert summary["step"] == 2
    assert summary["eval"]["eval/loss"] == pytest.approx(loss, rel=1e-4)
    assert summary["eval"]["eval/accuracy"] == pytest.approx(accuracy)
    assert summary["eval"]["eval/margin"] == pytest.approx(margin, rel=1e-3, abs=1e-4)
