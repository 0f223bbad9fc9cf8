"""Driver pieces against independent NumPy references: evaluations, initial weights, data config checks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.checkpoint import Checkpointer, CheckpointMismatchError
from rlhf_jax.config import CheckpointConfig, ConfigError
from rlhf_jax.models import CausalLM
from rlhf_jax.sharding import make_mesh
from rlhf_jax.steps import DPO
from rlhf_jax.testing import tiny_config
from rlhf_jax.testing.tokenizer import offline_tokenizer
from rlhf_jax.train import data as train_data
from rlhf_jax.train.run_config import DataConfig
from rlhf_jax.train.weights import initial_params
from rlhf_jax.train.dpo import DPOConfig, make_preference_eval
from rlhf_jax.train.reward_model import make_reward_model_eval
from rlhf_jax.train.sft import make_sft_eval

CONFIG = tiny_config(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, vocab_size=128)
DATA = DataConfig(max_len=32, batch_size=8, num_train=16, num_eval=16)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"data": -1})


def _batches(kind, n_batches=2):
    dataset = train_data.load_split(DATA, kind=kind, which="eval", tokenizer=offline_tokenizer())
    return train_data.eval_batches(dataset, DATA, max_batches=n_batches)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _forward(model, params, tokens):
    return jax.jit(model.forward)(params, jnp.asarray(tokens))


def _token_logps(model, params, tokens):
    logits = np.asarray(_forward(model, params, tokens).logits, np.float64)
    return np.take_along_axis(_log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]


def test_sft_eval_is_the_token_weighted_nll(mesh):
    model = CausalLM(CONFIG)
    params = model.init(jax.random.key(0))
    batches = _batches("sft")
    got = make_sft_eval(model, batches, mesh=mesh, strategy="dp")(params)
    nll = total = correct = 0.0
    for b in batches:
        mask = b["loss_mask"][:, 1:]
        lp = _token_logps(model, params, b["tokens"])
        logits = np.asarray(_forward(model, params, b["tokens"]).logits)[:, :-1]
        nll += -(lp * mask).sum()
        correct += ((logits.argmax(-1) == b["tokens"][:, 1:]) * mask).sum()
        total += mask.sum()
    assert got["eval/loss"] == pytest.approx(nll / total, rel=1e-5)
    assert got["eval/mean_token_accuracy"] == pytest.approx(correct / total, rel=1e-5)


def _last(values, mask):
    idx = np.array([np.nonzero(m)[0].max() for m in mask])
    return values[np.arange(len(idx)), idx]


def test_reward_model_eval_accuracy_against_direct_scores(mesh):
    model = CausalLM(CONFIG, head="scalar")
    params = model.init(jax.random.key(1))
    batches = _batches("preference")
    got = make_reward_model_eval(model, batches, mesh=mesh, strategy="dp")(params)
    wins, margins, losses, n = [], [], [], 0
    for b in batches:
        keep = b["example_mask"][:, 0]
        rc = _last(np.asarray(_forward(model, params, b["chosen_tokens"]).values), b["chosen_loss_mask"])
        rr = _last(np.asarray(_forward(model, params, b["rejected_tokens"]).values), b["rejected_loss_mask"])
        wins += list((rc > rr)[keep])
        margins += list((rc - rr)[keep])
        losses += list(np.logaddexp(0.0, -(rc - rr))[keep])
        n += keep.sum()
    assert n == DATA.num_eval
    assert got["eval/accuracy"] == pytest.approx(np.mean(wins), abs=1e-6)
    assert got["eval/margin"] == pytest.approx(np.mean(margins), rel=1e-4, abs=1e-6)
    assert got["eval/loss"] == pytest.approx(np.mean(losses), rel=1e-5)


def test_preference_eval_implicit_rewards(mesh):
    model = CausalLM(CONFIG)
    policy = model.init(jax.random.key(2))
    reference = model.init(jax.random.key(3))
    batches = _batches("preference", n_batches=1)
    objective = DPOConfig(name="dpo", algorithm=DPO(beta=0.5)).algorithm
    got = make_preference_eval(model, objective, batches, reference, mesh=mesh, strategy="dp")(policy)
    b = batches[0]

    def seq(params, side):
        return (_token_logps(model, params, b[f"{side}_tokens"]) * b[f"{side}_loss_mask"][:, 1:]).sum(-1)

    rc = 0.5 * (seq(policy, "chosen") - seq(reference, "chosen"))
    rr = 0.5 * (seq(policy, "rejected") - seq(reference, "rejected"))
    keep = b["example_mask"][:, 0]
    assert got["eval/rewards/chosen"] == pytest.approx(rc[keep].mean(), rel=1e-4, abs=1e-5)
    assert got["eval/rewards/margins"] == pytest.approx((rc - rr)[keep].mean(), rel=1e-4, abs=1e-5)
    assert got["eval/rewards/accuracies"] == pytest.approx((rc > rr)[keep].mean(), abs=1e-6)
    assert got["eval/loss"] == pytest.approx(np.logaddexp(0.0, -(rc - rr))[keep].mean(), rel=1e-4)
    # Against itself the policy has zero implicit rewards and loss log 2.
    same = make_preference_eval(model, objective, batches, policy, mesh=mesh, strategy="dp")(policy)
    assert same["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert same["eval/loss"] == pytest.approx(np.log(2.0), rel=1e-5)


def test_reward_model_starts_from_a_policy_checkpoint(tmp_path):
    lm = CausalLM(CONFIG)
    params = jax.jit(lm.init)(jax.random.key(4))
    with Checkpointer(tmp_path, config=CheckpointConfig(async_save=False), model_config=CONFIG) as ckpt:
        ckpt.save(7, {"params": params})
    rm = CausalLM(CONFIG, head="scalar")
    loaded = initial_params(rm, str(tmp_path), rng=jax.random.key(5))
    assert set(loaded) == set(rm.abstract_params()) and "lm_head" not in loaded
    np.testing.assert_array_equal(loaded["embed"], params["embed"])
    for a, b in zip(jax.tree.leaves(loaded["layers"]), jax.tree.leaves(params["layers"])):
        np.testing.assert_array_equal(a, b)
    assert loaded["score"].shape == (CONFIG.hidden_size,) and 0 < float(jnp.std(loaded["score"])) < 0.05
    # Read straight into FSDP shardings on the 8-device mesh, from our checkpoint and from an HF directory.
    mesh8 = make_mesh({"fsdp": -1})
    sharded = initial_params(lm, str(tmp_path), rng=jax.random.key(5), mesh=mesh8, strategy="fsdp")
    assert sharded["embed"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    np.testing.assert_array_equal(sharded["embed"], params["embed"])
    from rlhf_jax.models.hf import save_hf

    save_hf(tmp_path / "hf", CONFIG, params)
    from_hf = initial_params(rm, str(tmp_path / "hf"), rng=jax.random.key(5), mesh=mesh8, strategy="fsdp")
    assert "lm_head" not in from_hf and from_hf["score"].shape == (CONFIG.hidden_size,)
    assert from_hf["embed"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    np.testing.assert_array_equal(from_hf["embed"], params["embed"])
    with pytest.raises(CheckpointMismatchError, match="model.num_layers: .* has 2, this run 3"):
        initial_params(CausalLM(CONFIG.replace(num_layers=3)), str(tmp_path), rng=jax.random.key(0))
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face model directory"):
        initial_params(lm, str(tmp_path / "7"), rng=jax.random.key(0))


def test_data_config_checks_and_vocab():
    with pytest.raises(ConfigError, match="unknown synthetic task 'synthetic:chess'"):
        DataConfig(train="synthetic:chess")
    with pytest.raises(ConfigError, match=r"data.seq_len \(16\) must be >= data.max_len \(32\)"):
        DataConfig(max_len=32, seq_len=16)
    with pytest.raises(ConfigError, match="data.label_noise must be in"):
        DataConfig(label_noise=0.7)
    with pytest.raises(ConfigError, match="data.max_len must be an int >= 2, got 0"):  # at config time, not mid-run
        DataConfig(max_len=0)
    with pytest.raises(ConfigError, match=r"data.max_prompt_len must be None or an int in \[1, max_len=32\), got 60"):
        DataConfig(max_len=32, max_prompt_len=60)
    with pytest.raises(ConfigError, match="has no 'preference' data"):
        train_data.load_split(DataConfig(train="synthetic:arithmetic"), kind="preference", which="train",
                          tokenizer=offline_tokenizer())
    with pytest.raises(ConfigError, match="the tokenizer has 104 ids but model.vocab_size is 64"):
        train_data.check_vocab(offline_tokenizer(), CONFIG.replace(vocab_size=64))


def test_synthetic_eval_split_differs_from_train():
    tok = offline_tokenizer()
    train = train_data.load_split(DATA, kind="sft", which="train", tokenizer=tok)
    held_out = train_data.load_split(DATA, kind="sft", which="eval", tokenizer=tok)
    rows = lambda d: {tuple(d.arrays["tokens"][i]) for i in range(len(d))}  # noqa: E731
    assert len(train) == DATA.num_train and len(held_out) == DATA.num_eval
    assert not rows(train) & rows(held_out)


def test_nonfinite_update_halts_the_run_naming_the_step(tmp_path, capsys):
    from rlhf_jax.cli import main
    from rlhf_jax.metrics import read_jsonl

    sft = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "sft_tiny.py")
    # A learning rate of 1e30 without clipping blows the weights up in step 1; step 2's loss is not finite.
    code = main(["run", sft, "--set", f"workdir={tmp_path}", "--set", "train.nonfinite=halt",
                 "--set", "train.steps=5", "--set", "train.eval_every=0", "--set", "optim.learning_rate=1e30",
                 "--set", "optim.schedule=constant", "--set", "optim.decay_steps=none",
                 "--set", "optim.end_learning_rate_ratio=0", "--set", "optim.warmup_steps=0",
                 "--set", "optim.max_grad_norm=none", "--set", "data.num_train=64", "--set", "data.batch_size=8",
                 "--set", "data.eval=none", "--set", "logging.console=false", "--set", "logging.tensorboard=false"])
    assert code == 1
    err = capsys.readouterr().err
    assert "step 2: non-finite loss or gradient" in err and "train.nonfinite='halt'" in err
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[1]["nonfinite"] == 1.0
    assert not (tmp_path / "results.json").exists()


def test_a_critic_from_the_reward_model_refuses_a_language_model(tmp_path):
    """PPO's critic (`value.init="reward_model"`) reads `rewards.reward_model` with `reward_model=True`:
    a policy checkpoint there got a random score head silently; errors name the setting."""
    from rlhf_jax.models.hf import save_hf
    from rlhf_jax.train.weights import starting_params

    key = "rewards.reward_model (value.init='reward_model')"
    lm, rm = CausalLM(CONFIG), CausalLM(CONFIG, head="scalar")
    params = jax.jit(lm.init)(jax.random.key(4))
    with Checkpointer(tmp_path / "policy", config=CheckpointConfig(async_save=False), model_config=CONFIG) as ckpt:
        ckpt.save(3, {"params": params})
    save_hf(tmp_path / "hf", CONFIG, params)
    for source in ("policy", "hf"):
        with pytest.raises(ConfigError, match=rf"^rewards.reward_model \(value.init='reward_model'\): .*{source} has "
                                              r"no scalar 'score' head \(a language model, or a bare backbone\)"):
            starting_params(rm, str(tmp_path / source), rng=jax.random.key(0), key=key, reward_model=True)
    # A reward model is read as it is, score head included.
    rm_params = jax.jit(rm.init)(jax.random.key(6))
    with Checkpointer(tmp_path / "rm", config=CheckpointConfig(async_save=False), model_config=CONFIG) as ckpt:
        ckpt.save(2, {"params": rm_params})
    got = starting_params(rm, str(tmp_path / "rm"), rng=jax.random.key(0), key=key, reward_model=True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(rm_params), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointMismatchError, match=r"^rewards.reward_model \(value.init='reward_model'\)=.*rm "
                                                      r"does not match the run's model:\n  model.num_layers: .* has 2"):
        starting_params(CausalLM(CONFIG.replace(num_layers=3), head="scalar"), str(tmp_path / "rm"),
                        rng=jax.random.key(0), key=key, reward_model=True)


def test_a_checkpoint_trained_with_other_rope_norm_or_window_settings_is_refused(tmp_path):
    """Fields that change the math but no shape (RoPE theta and scaling, RMSNorm eps, the sliding
    window) loaded silently into a run configured otherwise: a Mistral-v0.2 checkpoint in a v0.1
    config computed logits 0.34 away from its own. They are compared like the shapes now."""
    from rlhf_jax.models.hf import save_hf
    from rlhf_jax.train.weights import starting_params

    params = jax.jit(CausalLM(CONFIG).init)(jax.random.key(1))
    save_hf(tmp_path / "hf", CONFIG.replace(rope_theta=1e6, rms_norm_eps=1e-5), params)
    with pytest.raises(CheckpointMismatchError, match=r"does not match the run's model:\n  model.rope_theta: .*hf has "
                                                      r"1000000.0, this run 10000.0\n  model.rms_norm_eps: .* has 1e-05, "
                                                      r"this run 1e-06$"):
        starting_params(CausalLM(CONFIG), str(tmp_path / "hf"), rng=jax.random.key(0))
    got = starting_params(CausalLM(CONFIG.replace(rope_theta=1e6, rms_norm_eps=1e-5)), str(tmp_path / "hf"),
                          rng=jax.random.key(0))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
