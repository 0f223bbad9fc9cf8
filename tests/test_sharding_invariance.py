"""Sharded == single device for the online-RL steps and unusual strategies; the strategy tools' figures.

SFT, reward-model and DPO-family steps under the four built-in strategies are pinned in their own test
files (`test_steps_*.py`); here the GRPO family and PPO (shared value head and separate critic), built
as a run builds them (`train.rl_algorithms`), on odd meshes: data x fsdp x tensor = 2 x 2 x 2, a
minibatch of 4 rows over 8 FSDP devices, and user strategies that split `head_dim` / `layers` or put
the batch on the tensor axis.
"""

import functools
import re

import jax
import numpy as np
import pytest

from step_fixtures import OPTIMIZER, max_rel_diff, mesh_for, run_steps, sft_batches
from rlhf_jax import sharding as sh
from rlhf_jax.hlo_analysis import Collective, analyze_hlo
from rlhf_jax.models import CausalLM
from rlhf_jax.sharding_lint import lint
from rlhf_jax.steps import PPOConfig, grpo_config, jit_step, make_sft_step
from rlhf_jax.testing import tiny_config

N, P, C, G = 8, 5, 6, 4
RL_MODEL = tiny_config(num_layers=1)  # 4 query / 2 kv heads: tensor <= 2


def _rollout():
    rng = np.random.default_rng(0)
    return {"prompt_tokens": np.repeat(rng.integers(3, 200, (N // G, P)).astype(np.int32), G, axis=0),
            "prompt_lengths": np.repeat(rng.integers(1, P + 1, N // G).astype(np.int32), G),
            "completion_tokens": rng.integers(3, 200, (N, C)).astype(np.int32),
            "completion_mask": np.arange(C)[None] < rng.integers(1, C + 1, N)[:, None],
            "scores": rng.normal(size=N).astype(np.float32),
            "sampler_logps": (-3 + 0.3 * rng.normal(size=(N, C))).astype(np.float32),
            "ref_logps": (-3 + 0.3 * rng.normal(size=(N, C))).astype(np.float32)}


@functools.cache
def _rl_step(kind: str, variant: str, shape=None, strategy: str = "dp"):
    """One update of a GRPO preset or PPO ("separate" critic / "shared" value head) from a fresh state;
    (state as numpy, metrics)."""
    from rlhf_jax.train import rl  # noqa: PLC0415
    from rlhf_jax.train.rl_algorithms import GRPO, PPO  # noqa: PLC0415
    from rlhf_jax.train.run_config import DataConfig  # noqa: PLC0415

    mesh_config = sh.MeshConfig(strategy=strategy, **{"data": 1, **dict(shape or {})})
    if kind == "grpo":
        config = rl.GRPORunConfig(name="g", model=RL_MODEL, mesh=mesh_config, optim=OPTIMIZER,
                                  data=DataConfig(batch_size=N // G),
                                  algorithm=grpo_config(variant, group_size=G, num_minibatches=2))
        algorithm_type = GRPO
    else:
        config = rl.PPORunConfig(name="p", model=RL_MODEL, mesh=mesh_config, optim=OPTIMIZER,
                                 data=DataConfig(batch_size=N), algorithm=PPOConfig(num_minibatches=2),
                                 value=rl.ValueConfig(init="policy", shared_backbone=variant == "shared",
                                                      optim=OPTIMIZER))
        algorithm_type = PPO
    mesh = mesh_for(mesh_config.shape)
    algorithm = algorithm_type(config, mesh)
    step = jit_step(algorithm.update(), mesh=mesh, strategy=strategy, state_shardings=algorithm.shardings())
    batch = _rollout()
    if not config.algorithm.uses_reference:
        del batch["ref_logps"]
    state, metrics = step(algorithm.fresh(), batch)
    return jax.tree.map(np.asarray, state), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("kind, variant, shape, strategy", [
    ("grpo", "grpo", {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),  # k3 KL in the loss, reference log-probs
    ("grpo", "dapo", {"fsdp": 8}, "fsdp"),  # each minibatch's 4 rows over 8 devices
    ("ppo", "separate", {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
    ("ppo", "shared", {"data": 4, "tensor": 2}, "tp"),
])
def test_rl_step_sharded_equals_single_device(kind, variant, shape, strategy):
    want_state, want = _rl_step(kind, variant)
    state, metrics = _rl_step(kind, variant, tuple(shape.items()), strategy)
    assert max_rel_diff(state, want_state) <= 1e-5  # policy, critic, optimizer moments, KL controller
    assert metrics.keys() == want.keys()
    for key in metrics:
        assert metrics[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key


EIGHT_HEADS = tiny_config(num_heads=8, num_kv_heads=8, head_dim=8)


@functools.cache
def _sft(shape=None, strategy="dp"):
    import step_fixtures as sf  # noqa: PLC0415

    lm = CausalLM(EIGHT_HEADS)
    params = jax.tree.map(np.asarray, jax.jit(lm.init)(jax.random.key(0)))
    orig = sf.tiny_lm, sf.host_params
    sf.tiny_lm, sf.host_params = (lambda head="lm": lm), (lambda head="lm", seed=0: params)
    try:
        return run_steps(make_sft_step, head="lm", shape=None if shape is None else dict(shape), strategy=strategy,
                         batches=sft_batches(2))
    finally:
        sf.tiny_lm, sf.host_params = orig


@pytest.mark.parametrize("shape, strategy", [
    ({"data": 1, "tensor": 8}, "tp"),  # all 8 devices on heads / mlp / vocab, the batch whole on each
    ({"data": 2, "fsdp": 2, "tensor": 2},
     sh.Strategy(name="head_dim_layers", rules={"head_dim": "tensor", "layers": "fsdp", "embed": "data"})),
    ({"data": 2, "fsdp": 2, "tensor": 2},
     sh.Strategy(name="batch_on_tensor", rules={"mlp": "tensor", "vocab": "fsdp"}, batch_axes=("data", "tensor"))),
])
def test_sft_under_unusual_meshes_and_user_strategies_equals_single_device(shape, strategy):
    want_params, want = _sft()
    params, history = _sft(tuple(shape.items()), strategy)
    assert max_rel_diff(params, want_params) <= 1e-5
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in want], rel=1e-6)


def test_logical_axes_given_as_a_string_are_named():
    mesh = sh.make_mesh({"data": 1, "fsdp": 8})
    with pytest.raises(sh.ShardingError, match=r"got the string 'embed'; write \('embed',\)"):
        sh.partition_spec("embed", (64,), mesh=mesh, strategy="fsdp")
    params = {"scale": jax.ShapeDtypeStruct((64,), np.float32)}
    with pytest.raises(sh.ShardingError, match=r"parameter scale: logical axes must be a tuple .* string 'embed'"):
        sh.param_shardings(params, {"scale": "embed"}, mesh=mesh, strategy="fsdp")


def test_lint_suggests_the_standard_axis_a_mesh_axis_misspells():
    lm = CausalLM(tiny_config())
    mesh = sh.make_mesh({"fdsp": 8})  # a typo makes an extra axis: every standard axis has size 1
    (issue,) = lint(lm.abstract_params(), lm.logical_axes, mesh=mesh, strategy="fsdp")
    assert issue.kind == "unused_axis" and issue.message.endswith("repeat the same work (a typo for 'fsdp'?)")


def test_hlo_analysis_counts_what_a_call_runs():
    """XLA:CPU wraps loops (e.g. a scatter's) in `call(...), to_apply=%comp`: its collectives and FLOPs
    run once per call (they were taken for a reducer's and dropped)."""
    text = """HloModule m

%sum (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%wrapped (p: f32[8]) -> f32[8] {
  %p = f32[8] parameter(0)
  %ar = f32[8] all-reduce(%p), to_apply=%sum
  ROOT %m = f32[8] multiply(%ar, %ar)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  ROOT %c = f32[8] call(%a), to_apply=%wrapped
}
"""
    stats = analyze_hlo(text)
    assert stats.collective_ops == (Collective("all-reduce", "f32[8]", 32, 1),)
    assert stats.flops == 8  # the multiply; the all-reduce's reducer is not an instruction of the program


def test_compile_strategy_figures_are_xla_figures_and_rows_name_a_strategy_object():
    from rlhf_jax.sharding_report import compile_strategy  # noqa: PLC0415

    strategy = sh.Strategy(name="report_fsdp_tp", rules={"embed": "fsdp", "mlp": "tensor", "vocab": "tensor",
                                                         "q_heads": "tensor", "kv_heads": "tensor"})
    c = compile_strategy(tiny_config(), step="sft", strategy=strategy, mesh_shape={"data": 2, "fsdp": 2, "tensor": 2},
                         batch_size=8, seq_len=16)
    assert c.row["strategy"] == "report_fsdp_tp"  # a name (JSON-serialisable), not the object
    mem = c.compiled.memory_analysis()
    assert c.row["argument_mib"] * 2**20 == mem.argument_size_in_bytes
    assert c.row["temp_mib"] * 2**20 == mem.temp_size_in_bytes
    live = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    assert c.row["peak_mib"] * 2**20 == max(live, mem.peak_memory_in_bytes)
    # Every collective instruction of the HLO text is counted once (times = its loop's trips).
    text = c.compiled.as_text()
    lines = re.findall(r"^\s*(?:ROOT )?%\S+ = .*? (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                       r"\(", text, flags=re.M)
    ops = analyze_hlo(text).collective_ops
    assert sorted(o.kind for o in ops) == sorted(lines) and lines
    assert {o.times for o in ops} == {1, 2}  # the scanned layers' gathers run num_layers = 2 times
