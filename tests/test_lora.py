"""LoRA adapters: PEFT's initialisation, the invariants of adapted training, sharding, bad configs.

- zero-initialised adapters leave the model unchanged: the first LoRA loss equals the full model's
  loss exactly (==);
- only adapters train: the base is bit-identical after steps and the optimizer holds state for
  the adapters alone;
- after training, merged weights (W + s·A·B) give the unmerged forward's logits within 1e-5;
- the reference (base with adapters off) gives the base model's log-probs bit for bit;
- a step on every sharding strategy equals the single-device step.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from step_fixtures import FAST_COMPILE, OPTIMIZER, STRATEGY_MESHES, host_params, mesh_for, pair_batches, \
    sft_batches, single_device_mesh

from rlhf_jax.config import ConfigError
from rlhf_jax.logprobs import logprobs_and_entropy, token_logprobs
from rlhf_jax.models import CausalLM
from rlhf_jax.models.lora import TARGETS, LoraConfig, LoraLM, base_params, init_adapters
from rlhf_jax.optim import make_optimizer
from rlhf_jax.rollout import (completion_hidden, completion_index, completion_logprobs, completion_logprobs_and_hidden,
                             join_sequences, shared_prompt_forward)
from rlhf_jax.sharding_lint import lint
from rlhf_jax.state import Frozen, train_state_from_params, trainable_view
from rlhf_jax.steps import SFT_KEYS, jit_model_step, make_sft_loss, make_sft_step
from rlhf_jax.steps.preference import DPO, make_dpo_loss
from rlhf_jax.steps.sequences import forward_token_logps
from rlhf_jax.testing import tiny_config
from rlhf_jax.train.sft import make_sft_eval

ALL = LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
BATCHES = sft_batches(3)


def _lora_lm(lora=ALL):
    return LoraLM(CausalLM(tiny_config()), lora)


def _run(lm, params, *, shape=None, strategy="dp", batches=BATCHES):
    """Steps of `make_sft_step` from `params`; returns (final TrainState, metrics per step)."""
    mesh = single_device_mesh() if shape is None else mesh_for(shape)
    state = train_state_from_params(params, make_optimizer(OPTIMIZER), rng=0, logical_axes=lm.logical_axes,
                                    mesh=mesh, strategy=strategy)
    step = jit_model_step(make_sft_step(lm, OPTIMIZER), lm, OPTIMIZER, mesh=mesh, strategy=strategy,
                          batch_keys=SFT_KEYS)
    compiled = step.lower(state, batches[0]).compile(compiler_options=FAST_COMPILE)
    history = []
    for batch in batches:
        state, metrics = compiled(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


@pytest.fixture(scope="module")
def trained():
    """Three LoRA SFT steps (all targets) from the shared tiny base, and the full model's first step."""
    lm = _lora_lm()
    start = jax.tree.map(np.asarray, lm.init_from_base(host_params(), jax.random.key(1)))  # host: never donated
    state, history = _run(lm, start)
    _, full_history = _run(CausalLM(tiny_config()), host_params(), batches=BATCHES[:1])
    return lm, start, state, history, full_history


# ------------------------------------------------------------------------------------- config


def test_config_validation_names_the_field_and_the_choices():
    with pytest.raises(ConfigError, match=r"lora.rank must be a positive int, got 0"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match=r"lora.rank"):
        LoraConfig(rank=-2)
    with pytest.raises(ConfigError, match=r"\['q_proj', 'mlp'\] match no projection.*q, k, v, o, gate, up, down, "
                                          r"embed, lm_head"):
        LoraConfig(targets=("q_proj", "v", "mlp"))
    with pytest.raises(ConfigError, match=r"lora.dropout must be in \[0, 1\)"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ConfigError, match=r"lora.alpha"):
        LoraConfig(alpha=0)
    with pytest.raises(ConfigError, match=r"lm_head.*scalar head"):
        LoraLM(CausalLM(tiny_config(), head="scalar"), LoraConfig(targets=("q", "lm_head")))
    assert LoraConfig(targets=("v", "q")).targets == ("q", "v")  # canonical order
    assert LoraConfig(rank=16, alpha=32).scale == 2.0  # alpha / r (Hu et al. 2021)
    assert LoraConfig(rank=16, alpha=32, use_rslora=True).scale == 8.0  # alpha / sqrt(r) (rsLoRA)


def test_init_is_peft_kaiming_uniform_and_zero_b():
    torch = pytest.importorskip("torch")
    config = tiny_config(hidden_size=256, intermediate_size=512)
    adapters = init_adapters(config, LoraConfig(rank=64, targets=("q", "down", "embed")), jax.random.key(0))
    for name, fan_in in (("q", 256), ("down", 512)):
        a = np.asarray(adapters["layers"][name]["a"])
        # PEFT: nn.init.kaiming_uniform_(lora_A.weight [r, fan_in], a=sqrt(5)), drawn here by torch.
        ref = torch.empty(64, fan_in)
        torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
        bound = float(ref.abs().max())
        assert abs(a).max() <= 1 / math.sqrt(fan_in) and abs(a).max() == pytest.approx(bound, rel=2e-3)
        assert a.std() == pytest.approx(float(ref.std()), rel=0.02)  # U(-b, b): std = b / sqrt(3)
        assert not np.any(np.asarray(adapters["layers"][name]["b"]))
        assert not np.array_equal(a[0], a[1])  # every layer draws its own A
    assert not np.any(np.asarray(adapters["embed"]["a"]))  # PEFT's embedding: A = 0, B ~ N(0, 1)
    assert np.asarray(adapters["embed"]["b"]).std() == pytest.approx(1.0, rel=0.05)


# ----------------------------------------------------------------------------------- invariants


def test_first_lora_loss_equals_full_model_loss_exactly(trained):
    lm, start, _, history, full_history = trained
    assert history[0]["loss"] == full_history[0]["loss"]
    tokens = BATCHES[0]["tokens"]
    base_logits = CausalLM(tiny_config()).forward(host_params(), tokens).logits
    np.testing.assert_array_equal(np.asarray(lm.forward(start, tokens).logits), np.asarray(base_logits))


def test_only_adapters_get_gradients_and_optimizer_state(trained):
    lm, start, state, history, _ = trained
    # The base is carried bit for bit; every adapter moved.
    for got, want in zip(jax.tree.leaves(base_params(state.params)), jax.tree.leaves(host_params())):
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    moved = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), state.params["lora"],
                         start["lora"])
    assert min(jax.tree.leaves(moved)) > 0
    # Adam's two moments for the adapters, nothing for the base.
    adapter_size = sum(x.size for x in jax.tree.leaves(start["lora"]))
    opt_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert opt_size == 2 * adapter_size == 2 * lm.num_trainable_params()
    assert jax.tree.leaves(trainable_view(state.params)["base"]) == []
    assert history[-1]["loss"] < history[0]["loss"] or history[-1]["grad_norm"] > 0


def test_merged_equals_unmerged_after_training(trained):
    lm, _, state, _, _ = trained
    tokens = BATCHES[1]["tokens"]
    unmerged = np.asarray(lm.forward(state.params, tokens).logits)
    merged = np.asarray(CausalLM(tiny_config()).forward(lm.merge_params(state.params), tokens).logits)
    base = np.asarray(CausalLM(tiny_config()).forward(host_params(), tokens).logits)
    assert np.abs(unmerged - base).max() > 1e-3  # the adapters changed the model
    assert np.abs(merged - unmerged).max() <= 1e-5
    w = lm.lm_head_weight(state.params)  # the chunked log-prob path's merged head
    np.testing.assert_allclose(np.asarray(w), np.asarray(lm.merge_params(state.params)["lm_head"]), atol=1e-6)


def test_reference_logprobs_equal_the_base_model_bit_for_bit(trained):
    _, _, state, _, _ = trained
    base = CausalLM(tiny_config())
    tokens = BATCHES[2]["tokens"]

    def logps(params):
        return token_logprobs(base.forward(params, tokens[:, :-1]).logits, tokens[:, 1:])

    ref = jax.jit(logps)(base_params(state.params))
    want = jax.jit(logps)(host_params())
    assert np.asarray(ref).tobytes() == np.asarray(want).tobytes()


def test_dropout_only_in_training_passes_with_their_key():
    """The training losses hand their key to the model: LoRA's dropout then draws masks from it
    (reproducible per key); without a key (evaluation, reference, old log-probs) it is off."""
    lm = _lora_lm(LoraConfig(rank=4, targets=("q", "up"), dropout=0.5))
    params = lm.init_from_base(host_params(), jax.random.key(1))
    params["lora"] = jax.tree.map(lambda x: x + 0.1, params["lora"])  # B != 0: dropout shows
    batch = {k: jnp.asarray(v) for k, v in BATCHES[0].items()}
    loss = jax.jit(lambda p, rng: make_sft_loss(lm)(p, batch, {"num_tokens": jnp.float32(100)}, rng)[0])
    plain = jax.jit(lambda p: make_sft_loss(_lora_lm(LoraConfig(rank=4, targets=("q", "up"))))(
        p, batch, {"num_tokens": jnp.float32(100)}, None)[0])
    key_a, key_b = jax.random.key(3), jax.random.key(4)
    assert float(loss(params, None)) == float(plain(params))
    assert float(loss(params, key_a)) == float(loss(params, key_a))
    assert abs(float(loss(params, key_a)) - float(plain(params))) > 1e-4
    assert float(loss(params, key_a)) != float(loss(params, key_b))
    # The held-out evaluation (`make_weighted_eval`) passes no key: the adapters' dropout is off.
    evals = [make_sft_eval(model, [BATCHES[0]], mesh=mesh_for({"data": 1}), strategy="dp")(params)
             for model in (lm, _lora_lm(LoraConfig(rank=4, targets=("q", "up"))))]
    assert evals[0] == evals[1] and 0 < evals[0]["eval/loss"] < 10


def test_lm_head_dropout_is_applied_on_every_head_path():
    """The merged head weight (`lm_head_weight`) cannot drop the head adapter's input, so the chunked
    SFT/DPO log-probs and the RL completion log-probs of a training pass read the forward's logits:
    with a key they equal the full-logits pass of that key, without one the deterministic values."""
    lm = _lora_lm(LoraConfig(rank=4, targets=("q", "lm_head"), dropout=0.5))
    params = lm.init_from_base(host_params(), jax.random.key(1))
    noise = lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape)  # noqa: E731
    params["lora"] = jax.tree.map(noise, params["lora"])  # B != 0 and not constant over the vocabulary
    key = jax.random.key(3)
    tokens = jnp.asarray(BATCHES[0]["tokens"])
    labels = tokens[:, 1:]

    def logps(chunk_size, rng):
        return np.asarray(forward_token_logps(lm, params, tokens, labels, chunk_size=chunk_size, rng=rng)[0])

    full, deterministic = logps(None, key), logps(None, None)
    assert np.abs(full - deterministic).max() > 1.0  # the head adapter's dropout shows
    np.testing.assert_array_equal(logps(4, key), full)
    # float32 rounding of sums of up to -34 differs between the chunked and full paths by CPU class (AVX2: 1.5e-5)
    np.testing.assert_allclose(logps(4, None), deterministic, rtol=1e-6, atol=1e-5)
    sft = {chunk: make_sft_loss(lm, logits_chunk_size=chunk)(params, {k: jnp.asarray(v) for k, v in
                                                                       BATCHES[0].items()},
                                                             {"num_tokens": jnp.float32(100)}, key)[0]
           for chunk in (None, 4)}
    np.testing.assert_allclose(float(sft[4]), float(sft[None]), rtol=1e-6)
    pair = {k: jnp.asarray(v) for k, v in pair_batches(1)[0].items()}
    pair["ref_chosen_logps"] = pair["ref_rejected_logps"] = jnp.zeros(pair["chosen_tokens"].shape[0])
    context = {"num_pairs": jnp.float32(pair["chosen_tokens"].shape[0])}
    dpo = {chunk: make_dpo_loss(lm, DPO(), logits_chunk_size=chunk)(params, pair, context, key)[0]
           for chunk in (None, 4)}
    np.testing.assert_allclose(float(dpo[4]), float(dpo[None]), rtol=1e-5)

    # Rollouts: rows 0-1 share a prompt of 5 tokens, rows 2-3 one of 3.
    prompts = jnp.stack([tokens[0, :5]] * 2 + [tokens[1, :5]] * 2)
    lengths = jnp.array([5, 5, 3, 3])
    completions = tokens[:4, 6:13]
    index = completion_index(lengths, completions.shape[1])[:, :, None]
    for group_size in (1, 2):
        def reference(rng):
            """The full-logits pass of `completion_logprobs`' forward, log-probs and entropies at T = 0.7."""
            if group_size == 1:
                joined = join_sequences(prompts, lengths, completions)
                logits = jnp.take_along_axis(lm.forward(params, joined[:, :-1], rng=rng).logits, index, axis=1)
            else:
                logits = shared_prompt_forward(lm, params, prompts, lengths, completions, group_size=2,
                                               rng=rng).logits
            return logprobs_and_entropy(logits, completions, temperature=0.7)

        for rng, tol in ((key, 0.0), (None, 1e-5)):
            got = completion_logprobs(lm, params, prompts, lengths, completions, temperature=0.7, with_entropy=True,
                                      chunk_size=3, group_size=group_size, rng=rng)
            want = reference(rng)
            for g, w in zip(got, want):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol / 10, atol=tol)
            # PPO's policy pass: the same log-probs, and the hidden states of that forward for its value head.
            *both, hidden = completion_logprobs_and_hidden(lm, params, prompts, lengths, completions, temperature=0.7,
                                                           with_entropy=True, chunk_size=3, group_size=group_size,
                                                           rng=rng)
            for g, w in zip(both, got):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
            np.testing.assert_array_equal(np.asarray(hidden), np.asarray(
                completion_hidden(lm, params, prompts, lengths, completions, group_size=group_size, rng=rng)))
        assert np.abs(np.asarray(reference(key)[0] - reference(None)[0])).max() > 1.0


# ------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("strategy", ["fsdp_tp"])
def test_sharded_lora_step_equals_single_device(trained, strategy):
    lm, start, state, history, _ = trained
    mesh = mesh_for(STRATEGY_MESHES[strategy])
    issues = lint(lm.abstract_params(), lm.logical_axes, mesh=mesh, strategy=strategy)
    assert not [i for i in issues if i.severity == "error" or i.kind == "unknown_logical_axis"], issues
    sharded, sharded_history = _run(lm, start, shape=STRATEGY_MESHES[strategy], strategy=strategy)
    assert isinstance(sharded.params["base"], Frozen)
    for got, want in zip(jax.tree.leaves(sharded.params["lora"]), jax.tree.leaves(state.params["lora"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    for got, want in zip(sharded_history, history):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_every_strategy_places_the_adapters():
    lm = _lora_lm()
    for strategy, shape in STRATEGY_MESHES.items():
        mesh = mesh_for(shape)
        issues = lint(lm.abstract_params(), lm.logical_axes, mesh=mesh, strategy=strategy)
        assert not [i for i in issues if i.severity == "error" or i.kind == "unknown_logical_axis"], (strategy, issues)
    from rlhf_jax.sharding import param_shardings
    shardings = param_shardings(lm.abstract_params(), lm.logical_axes, mesh=mesh_for(STRATEGY_MESHES["fsdp_tp"]),
                                strategy="fsdp_tp")
    # A [L, E, r] follows the base kernel's input axis (embed over fsdp); B [L, r, H, D] its heads (tensor).
    assert tuple(shardings["lora"]["layers"]["q"]["a"].spec) == (None, "fsdp")
    assert tuple(shardings["lora"]["layers"]["q"]["b"].spec) == (None, None, "tensor")
    assert jnp.dtype(lm.abstract_params()["lora"]["layers"]["q"]["a"].dtype) == jnp.float32



def test_a_scalar_heads_score_gets_the_full_models_gradient():
    """A LoRA reward model or critic trains its (new, random) score head beside the adapters: with
    zero B the adapted model is the base, so d(values)/d(score) equals the plain model's exactly
    (the frozen base's stop-gradient once covered the score too, leaving it untrained)."""
    plain = CausalLM(tiny_config(), head="scalar")
    lm = LoraLM(plain, LoraConfig(rank=4, targets=("q", "v")))
    base = host_params("scalar")
    params = lm.init_from_base(base, jax.random.key(1))
    tokens = jnp.asarray(BATCHES[0]["tokens"])
    ours = jax.grad(lambda s: lm.forward({**params, "score": s}, tokens).values.sum())(params["score"])
    want = jax.grad(lambda s: plain.forward({**base, "score": s}, tokens).values.sum())(base["score"])
    assert float(jnp.abs(want).max()) > 0
    np.testing.assert_allclose(np.asarray(ours), np.asarray(want), rtol=1e-6, atol=1e-6)
    # The frozen base still gets none.
    frozen = jax.grad(lambda p: lm.forward(p, tokens).values.sum())(params)["base"]
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(frozen))


def test_adapters_that_do_not_fit_the_config_are_refused():
    """Adapters of another rank would run at this config's scale alpha / r, a missing target would be
    skipped and an extra one applied unmerged only: each is a ValueError naming the target."""
    lm = _lora_lm(LoraConfig(rank=4, targets=("q", "v")))
    def adapters(rank, targets):
        return _lora_lm(LoraConfig(rank=rank, targets=targets)).init_adapters(jax.random.key(0))
    with pytest.raises(ValueError, match=re.escape(
            "LoraLM: the adapters do not fit the lora config (rank 4, targets ['q', 'v']) on this model: "
            "q.a: shape (2, 64, 8), expected (2, 64, 4); q.b: shape (2, 8, 4, 16), expected (2, 4, 4, 16)")):
        lm.init_from_base(host_params(), None, adapters(8, ("q", "v")))
    with pytest.raises(ValueError, match=r"on this model: v: missing$"):
        lm.init_from_base(host_params(), None, adapters(4, ("q",)))
    with pytest.raises(ValueError, match=r"on this model: k: not a target of this config$"):
        lm.init_from_base(host_params(), None, adapters(4, ("q", "k", "v")))
    fitting = adapters(4, ("q", "v"))
    assert lm.init_from_base(host_params(), None, fitting)["lora"] is fitting
