"""LoRA in the recipes: exact resume, checkpoint items a later stage reads merged, DPO's reference as
the base with adapters off (== a reference model holding the base: its values bit for bit, the
update to float rounding), and RL states without a reference copy."""

import dataclasses
import shutil

import chex
import jax
import numpy as np
import pytest
from step_fixtures import FAST_COMPILE, OPTIMIZER, host_params, pair_batches, single_device_mesh

from rlhf_jax.checkpoint import Checkpointer, load_params
from rlhf_jax.cli import main as cli_main
from rlhf_jax.models.hf import save_hf
from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
from rlhf_jax.models import CausalLM
from rlhf_jax.models.lora import TARGETS, LoraConfig, LoraLM, base_params
from rlhf_jax.optim import make_optimizer
from rlhf_jax.state import trainable_view, train_state_from_params
from rlhf_jax.steps import DPO, PAIR_KEYS, jit_model_step, make_dpo_step
from rlhf_jax.testing import tiny_config
from rlhf_jax.train import rl, sft
from rlhf_jax.train import tiny_stages as tiny
from rlhf_jax.train.adapters import make_model
from rlhf_jax.train.rl_algorithms import GRPO, PPO
from rlhf_jax.train.weights import initial_params

LORA = LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
# Few adapters in the run tests: saving a checkpoint compiles a slice per array shape (8 CPU devices).
SMALL_LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "lm_head"))


def _sft_config(workdir, steps):
    config = tiny.sft_tiny("lora_resume")
    return dataclasses.replace(
        config, workdir=str(workdir), lora=SMALL_LORA,
        data=dataclasses.replace(config.data, num_train=64, num_eval=8, batch_size=8),
        train=TrainConfig(steps=steps, eval_every=0), checkpoint=CheckpointConfig(every=2, keep=3, async_save=False),
        logging=LoggingConfig(console=False, tensorboard=False))


def _items(workdir, step):
    model = make_model(_sft_config(workdir, step))
    abstract = model.abstract_params()
    with Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        lora = ckpt.item_shapes("lora", step)
    params = load_params(workdir / "checkpoints", base_params(abstract), step=step)
    return params, lora


def test_lora_sft_resumes_bit_exactly_and_a_later_stage_reads_it_merged(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    sft.train(_sft_config(straight, 4))
    shutil.copytree(straight, resumed)  # as if stopped after checkpoint 2: drop checkpoint 4
    shutil.rmtree(resumed / "checkpoints" / "4")
    summary = sft.train(_sft_config(resumed, 4))  # resumes from step 2
    assert summary["step"] == 4
    for step in (2, 4):
        with Checkpointer(resumed / "checkpoints", read_only=True) as ckpt:
            assert step in ckpt.all_steps()
    # Every item of the final checkpoint, bit for bit (the base `params` untouched by training).
    from rlhf_jax.train.supervised import ModelState
    config = _sft_config(straight, 4)
    model = make_model(config)
    spec = ModelState(model, make_optimizer(config.optim), config.mesh.make_mesh(), config.mesh.strategy, 0, None)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), spec.save_items(spec.abstract()))
    with Checkpointer(straight / "checkpoints", read_only=True) as a, \
            Checkpointer(resumed / "checkpoints", read_only=True) as b:
        items_a, _ = a.restore(target, step=4)
        items_b, _ = b.restore(target, step=4)
    chex.assert_trees_all_equal(items_a, items_b, strict=True)
    assert set(items_a) == {"params", "lora", "train"}
    adapters = items_a["lora"]["adapters"]
    assert float(np.abs(np.asarray(adapters["layers"]["q"]["b"])).max()) > 0  # trained
    assert float(items_a["lora"]["scale"]) == SMALL_LORA.scale
    # `checkpoint.init_from` of a later stage reads the adapted weights, merged.
    merged = initial_params(CausalLM(config.model), str(straight / "checkpoints"), rng=jax.random.key(0))
    lm = LoraLM(CausalLM(config.model), SMALL_LORA)
    want = lm.merge_params(lm.init_from_base(items_a["params"], None, adapters))
    chex.assert_trees_all_close(merged, want, atol=0, rtol=0)
    _check_exports(straight, config.model, lm.init_from_base(items_a["params"], None, adapters), lm)


def _check_exports(run_dir, model_config, params, lm):
    """`rlhf-jax export --merge` and the PEFT export both give our LoRA model's logits in transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    assert cli_main(["export", str(run_dir), str(run_dir / "merged"), "--merge"]) == 0
    assert cli_main(["export", str(run_dir), str(run_dir / "adapters")]) == 0
    save_hf(run_dir / "base", model_config, base_params(params))
    tokens = np.random.default_rng(0).integers(1, model_config.vocab_size, (2, 10))
    ours = np.asarray(lm.forward(params, tokens).logits)

    def logits(model):
        with torch.no_grad():
            return model(input_ids=torch.tensor(tokens)).logits.float().numpy()

    merged = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "base").eval()
    adapted = peft.PeftModel.from_pretrained(base, run_dir / "adapters").eval()
    assert np.abs(logits(merged) - ours).max() <= 1e-4
    assert np.abs(logits(adapted) - ours).max() <= 1e-4


def test_dpo_reference_is_the_base_with_adapters_off():
    lm = LoraLM(CausalLM(tiny_config()), LoraConfig(rank=4, targets=("q", "v", "up")))
    params = jax.tree.map(np.asarray, lm.init_from_base(host_params(), jax.random.key(1)))
    params["lora"]["layers"]["q"]["b"] = params["lora"]["layers"]["q"]["b"] + 0.05  # the policy != reference
    mesh, batch = single_device_mesh(), pair_batches(1)[0]
    objective = DPO(beta=0.1)
    # "model": a separate reference holding the base with zero adapters (B = 0, so exactly the base).
    zero = {"base": params["base"], "lora": jax.tree.map(np.zeros_like, params["lora"])}
    results = []
    for reference, frozen in (("base", ()), ("model", (zero,))):
        state = train_state_from_params(params, make_optimizer(OPTIMIZER), rng=0, logical_axes=lm.logical_axes,
                                        mesh=mesh, strategy="dp")
        update = make_dpo_step(lm, OPTIMIZER, objective=objective, reference=reference)
        step = jit_model_step(update, lm, OPTIMIZER, mesh=mesh, strategy="dp", batch_keys=PAIR_KEYS,
                              frozen_params=len(frozen))
        frozen = tuple(jax.device_put(f, step.state_shardings.params) for f in frozen)
        compiled = step.lower(state, batch, *frozen).compile(compiler_options=FAST_COMPILE)
        state, metrics = compiled(state, batch, *frozen)
        results.append((jax.tree.map(np.asarray, state.params["lora"]), jax.tree.map(float, metrics)))
    (lora_a, metrics_a), (lora_b, metrics_b) = results
    # Reference log-probs, losses and rewards: bit for bit. The gradients come out of two different
    # programs (one has the reference as an input), which XLA may fuse and reduce in different orders:
    # their norm and the updated adapters agree to float rounding.
    np.testing.assert_allclose(metrics_a.pop("grad_norm"), metrics_b.pop("grad_norm"), rtol=1e-6)
    assert metrics_a == metrics_b
    chex.assert_trees_all_close(lora_a, lora_b, rtol=1e-6, atol=1e-8)
    assert metrics_a["rewards/chosen"] != 0.0  # the implicit rewards saw a reference != policy


def test_rl_states_hold_no_reference_copy_and_train_adapters_and_heads():
    mesh = single_device_mesh()
    grpo_config = dataclasses.replace(tiny.arithmetic_grpo("grpo"), lora=LORA)
    assert grpo_config.algorithm.uses_reference
    grpo = GRPO(grpo_config, mesh)
    abstract = grpo.abstract()
    assert abstract.reference is None and isinstance(grpo.policy, LoraLM)
    assert sorted(trainable_view(abstract.policy.params)) == ["base", "lora"]
    assert jax.tree.leaves(trainable_view(abstract.policy.params)["base"]) == []

    ppo_config = dataclasses.replace(tiny.vowel_ppo(), lora=LORA,
                                     value=rl.ValueConfig(init="policy", shared_backbone=True))
    ppo = PPO(ppo_config, mesh)
    view = trainable_view(ppo.abstract().policy.params)
    assert ppo.abstract().reference is None
    assert jax.tree.leaves(view["lm"]["base"]) == [] and view["value_head"].shape == (64,)  # head trains
    separate = PPO(dataclasses.replace(ppo_config, value=rl.ValueConfig(init="policy")), mesh)
    value_view = trainable_view(separate.abstract().value.params)
    assert "score" in value_view and jax.tree.leaves(value_view["base"]) == []  # critic: adapters + score


def test_real_size_lora_config_plans_under_the_acceptance():
    """experiments/dpo_llama3_8b_lora.py at full size (`jax.eval_shape`, FSDP over 8 devices): the LoRA
    state per device is <= 0.3x full fine-tuning's (parameters + AdamW + the reference), and the NF4
    base <= 0.35x the bfloat16 base (the figures `rlhf-jax compile --topology v5e:2x4` reports)."""
    import math
    import os

    from rlhf_jax import sharding as sh
    from rlhf_jax.cli import load_experiment
    from rlhf_jax.state import abstract_train_state, train_state_shardings

    module, _ = load_experiment(os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments",
                                             "dpo_llama3_8b_lora.py"))
    mesh = sh.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})

    def per_device(tree, shardings):
        return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                   for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))

    state = {}
    for mode in ("lora", "qlora", "full"):
        config = module.get_config(mode)
        model, tx = make_model(config), make_optimizer(config.optim)
        abstract = abstract_train_state(model.init, tx)
        shardings = train_state_shardings(abstract, model.logical_axes, tx, mesh=mesh, strategy="fsdp")
        state[mode] = per_device(abstract.params, shardings.params) + per_device(abstract.opt_state,
                                                                                 shardings.opt_state)
        if mode == "full":  # the frozen reference, laid out like the parameters
            state[mode] += per_device(abstract.params, shardings.params)
        else:
            state[mode + "_base"] = per_device(abstract.params["base"], shardings.params["base"])
            assert config.lora.rank == 16 and model.num_trainable_params() == 41_943_040
    assert state["lora"] <= 0.3 * state["full"]          # 2.20 vs 14.96 GiB: 0.15x
    assert state["qlora_base"] <= 0.35 * state["lora_base"]  # 0.53 vs 1.87 GiB: 0.28x


def test_setting_a_lora_key_turns_lora_on_from_the_command_line():
    from rlhf_jax.config import ConfigError, override

    config = tiny.sft_tiny()
    assert config.lora is None
    on = override(config, ["lora.rank=8", "lora.targets=q,v", "lora.quantize=nf4"])
    assert on.lora == LoraConfig(rank=8, targets=("q", "v"), quantize="nf4")
    assert override(on, ["lora=none"]).lora is None
    with pytest.raises(ConfigError, match=r"lora.rank must be a positive int, got 0"):
        override(config, ["lora.rank=0"])
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rnk'"):
        override(config, ["lora.rnk=3"])


def test_a_scalar_head_model_with_only_an_lm_head_target_is_named():
    """The run's lm_head target does not apply to a reward model or critic (no LM head); when it is the
    only target, the error says so instead of 'lora.targets must name at least one projection'."""
    from rlhf_jax.config import ConfigError

    config = dataclasses.replace(tiny.sft_tiny(), lora=LoraConfig(rank=4, targets=("lm_head",)))
    assert isinstance(make_model(config), LoraLM)
    with pytest.raises(ConfigError, match=r"lora.targets \['lm_head'\] leave nothing to adapt on a scalar-head "
                                          r"model \(a reward model or PPO's critic has no LM head\)"):
        make_model(config, head="scalar")
    critic = make_model(dataclasses.replace(config, lora=SMALL_LORA), head="scalar")
    assert critic.lora.targets == ("q", "v") and critic.head == "scalar"
