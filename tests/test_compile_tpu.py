"""Plans compiled for TPU slices (libtpu's compile-only devices; no TPU needed): shipped configs fit their topology.

Runs when libtpu is installed (the `[tpu]` extra, as the README's test command installs it).

A shipped config is checked at its full width, batch and sequence length on the topology its
docstring names, with fewer layers: the layers run under `lax.scan`, so every per-device figure is
an affine function of the depth (weights, optimizer moments and the saved layer inputs grow by
the same amount per layer; a layer's own temporaries are reused). The plan at 1 and 2 layers gives
that line, evaluated at the real depth. These compiles take minutes on 2 cores (a 152k-entry
vocabulary, 1,024-token sequences, every program of the run), so they are opt-in:
`RLHF_JAX_FULL_EXPERIMENTS=1` runs them for every shipped real-size config (Qwen2.5-0.5B DPO on
v5e:2x4, Llama-3-8B DPO on v5p:4x4x2, the 1.5B GRPO and PPO runs on v5p:2x2x2). By default CI
compiles a tiny run's every program for a v5e slice (the TPU path end to end, in seconds).
"""

import dataclasses
import importlib.util
import os
import re

import pytest

from rlhf_jax.cli import load_experiment
from rlhf_jax.compile import resolve_target
from rlhf_jax.config import override
from rlhf_jax.train.aot import format_plan, plan_run, run_configs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install -e '.[test,tpu]')")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = os.environ.get("RLHF_JAX_FULL_EXPERIMENTS") == "1"
SHIPPED = ["dpo_qwen2_5_0_5b", "dpo_llama3_8b", "grpo_qwen2_5_1_5b_gsm8k", "ppo_qwen2_5_1_5b"]


def _docstring_topology(module) -> str:
    m = re.search(r"rlhf-jax compile experiments/\S+\.py --topology (\S+)", module.__doc__)
    assert m, "the docstring names the topology the config fits"
    return m.group(1)


def _plan_at_depth(config, target, layers: int):
    return plan_run(override(config, [f"model.num_layers={layers}"]), target=target)


@pytest.mark.skipif(not FULL, reason="minutes of TPU compiles: set RLHF_JAX_FULL_EXPERIMENTS=1")
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_fits_its_docstring_topology(name):
    module, _ = load_experiment(os.path.join(ROOT, "experiments", f"{name}.py"))
    topology = _docstring_topology(module)
    target = resolve_target(topology)
    (config,) = run_configs(module.get_config()).values()
    depth = config.model.num_layers
    one, two = _plan_at_depth(config, target, 1), _plan_at_depth(config, target, 2)
    assert one.fits and two.fits, format_plan(two)
    assert [p.name for p in two.programs][0] == "update step" and len(two.programs) >= 3
    peak = one.peak_bytes + (two.peak_bytes - one.peak_bytes) * (depth - 1)
    assert two.peak_bytes >= one.peak_bytes
    assert peak <= target.memory_bytes, (name, topology, peak / 2**30, format_plan(two))
    if name == "dpo_qwen2_5_0_5b":
        # FSDP's gradient reduction: XLA:TPU fuses the reduce-scatter with the weight-gradient matmul
        # (a windowed-einsum loop of collective permutes), counted as reduce-scatter.
        assert two.programs[0].collectives.get("reduce-scatter", 0) > 0, two.programs[0].collectives


def test_tpu_plan_reports_every_program_with_figures():
    module, _ = load_experiment(os.path.join(ROOT, "experiments", "dpo_tiny.py"))
    config = module.get_config().dpo
    target = resolve_target("v5litepod-8")
    plan = plan_run(dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, data=1, fsdp=-1)), target=target)
    assert plan.target == "v5e:2x4 (v5litepod-8)" and plan.memory_bytes == 16 * 2**30 and plan.fits
    update = plan.programs[0]
    assert update.ok and update.peak_bytes > update.argument_bytes > 0 and update.flops > update.xla_flops
    assert update.arguments["parameters"] > 0 and update.arguments["optimizer state"] > 0
    assert update.collectives["total"] > 0  # FSDP over 8 chips: parameters gathered, gradients reduced
