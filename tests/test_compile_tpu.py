"""Plans compiled for TPU slices (libtpu's compile-only devices; no TPU needed): shipped configs fit their topology.

Runs when libtpu is installed (the `[tpu]` extra, as the README's test command installs it).

Every experiment module whose docstring says `rlhf-jax compile experiments/NAME.py[:MODE] --topology T`
(and not that it does not fit) is planned for T at its full width, batch and sequence lengths: every
program of the run, with the run's shardings on T's devices, with 1 and 2 layers. The layers run
under `lax.scan` in training programs, so weights, optimizer moments, gradients and saved layer
inputs grow by the same amount per layer and a layer's own temporaries are reused: the line through
1 and 2 layers, evaluated at the real depth, bounds each program's per-device memory during the run
(`test_memory_is_affine_in_depth` checks that on compiled TPU programs at 4 layers: a small DPO run
with the 0.5B recipe, the update step on the line within 1%, the forward-only eval and reference
passes below it), and the largest must fit T's HBM. Where the line settles nothing, a run without a
sampler is planned at its real depth instead (every program but an RL sampler's scans its layers, so
that compile costs about what one depth does): when its bound exceeds the HBM, or a program shrinks
from 1 to 2 layers, as XLA:TPU lays out micro-batched forward-only passes (the 0.5B DPO run's eval:
856 -> 750 MB), and always for a LoRA run, whose frozen base makes forward passes dominate (its eval
6.60 -> 6.08 GB).

Compiling these for TPU takes minutes per config on 2 cores (XLA:TPU's code generation), so the
figures come from `tests/data/tpu_plans.json`, a `rlhf_jax.plan_cache` of real TPU compiles keyed
by each program's lowered module, compile options, jax / jaxlib / libtpu versions and target: the
test lowers every program (seconds) and reads the figures of exactly that module. A changed model,
config, recipe, sharding or compiler changes the key: that program compiles for real here (minutes)
with a warning naming the command that records what the file lacks
(`RLHF_JAX_RECORD_PLANS=1 python -m pytest tests/test_compile_tpu.py -n 0`;
`RLHF_JAX_FULL_EXPERIMENTS=1` re-records every program). Programs no longer lowered stay in the file
until a re-record from an empty file.
`test_tpu_plan_reports_every_program_with_figures` compiles a tiny run for a v5e slice on every run.
"""

import ast
import dataclasses
import functools
import glob
import importlib.util
import json
import os
import re
import warnings

import pytest

from rlhf_jax.cli import experiment_config, load_experiment
from rlhf_jax.targets import resolve_target
from rlhf_jax.config import override
from rlhf_jax.plan_cache import use_plan_cache
from rlhf_jax.train.aot import format_plan, plan_run, run_configs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install -e '.[test,tpu]')")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = os.environ.get("RLHF_JAX_FULL_EXPERIMENTS") == "1"      # re-record every plan (compiles everything)
RECORD = FULL or os.environ.get("RLHF_JAX_RECORD_PLANS") == "1"  # record the programs the file lacks
RECORD_COMMAND = "RLHF_JAX_RECORD_PLANS=1 python -m pytest tests/test_compile_tpu.py -n 0"
PLANS = os.path.join(ROOT, "tests", "data", "tpu_plans.json")
_CLAIM = re.compile(r"rlhf-jax compile experiments/(\w+)\.py(?::(\w+))? --topology (\S+)(.*)")


def _claims() -> list[tuple[str, str | None, str]]:
    """(module, mode, topology) of every docstring command that claims its run fits (read without importing)."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        for name, mode, topology, rest in _CLAIM.findall(doc):
            if "does not" not in rest:
                out.append((name, mode or None, topology))
    return out


CLAIMS = _claims()


@functools.cache
def _target(name: str):
    return resolve_target(name)


def _run_config(name: str, mode: str | None):
    module, _ = load_experiment(os.path.join(ROOT, "experiments", f"{name}.py"))
    (config,) = run_configs(experiment_config(module, mode, [])).values()
    return config


def _recorded_runs() -> set[str]:
    """Run names whose plans `tests/data/tpu_plans.json` holds (its "_runs" list)."""
    if not os.path.exists(PLANS):
        return set()
    with open(PLANS, encoding="utf-8") as f:
        return set(json.load(f).get("_runs", []))


def _plans(config, target, depths):
    """Plans at each depth, from the plan cache (or compiled for real: RECORD, or another compiler)."""
    if not RECORD and config.name not in _recorded_runs():
        pytest.skip(f"{config.name}: no TPU compile of it in {PLANS} yet (minutes per config on 2 cores); "
                    f"{RECORD_COMMAND} compiles and adds it")
    with use_plan_cache(PLANS, write=RECORD, refresh=FULL) as cache:
        plans = [plan_run(override(config, [f"model.num_layers={d}"]), target=target) for d in depths]
        if RECORD:
            cache.entries["_runs"] = sorted(set(cache.entries.get("_runs", [])) | {config.name})
    if not RECORD and cache.misses:
        # Those programs were compiled for real here (the verdict holds), at minutes each: say how to re-record.
        warnings.warn(f"{config.name}: {cache.misses} programs are not in {PLANS} (the config, model, recipe, "
                      f"sharding or compiler changed) and were compiled for real; record them with {RECORD_COMMAND}",
                      stacklevel=2)
    return plans


def _at_depth(one: dict, two: dict, depth: int) -> dict:
    return {k: one[k] + (two[k] - one[k]) * (depth - 1) for k in one}


def test_every_docstring_claim_is_found():
    names = {(n, m) for n, m, _ in CLAIMS}
    assert {("dpo_qwen2_5_0_5b", None), ("dpo_llama3_8b", None), ("grpo_qwen2_5_1_5b_gsm8k", None),
            ("ppo_qwen2_5_1_5b", None), ("dpo_llama3_8b_lora", None), ("dpo_llama3_8b_lora", "qlora")} <= names
    assert ("dpo_llama3_8b_lora", "full") not in names  # its docstring says it does not fit


@pytest.mark.parametrize("name,mode,topology", CLAIMS, ids=[f"{n}{':' + m if m else ''}" for n, m, _ in CLAIMS])
def test_shipped_config_fits_its_docstring_topology(name, mode, topology):
    config, target = _run_config(name, mode), _target(topology)
    depth = config.model.num_layers
    one = None
    if getattr(config, "lora", None) is None:
        one, plan = _plans(config, target, (1, 2))
        assert one.fits and plan.fits and list(one.program_peaks) == list(plan.program_peaks), format_plan(plan)
        grows = all(plan.program_peaks[k] >= one.program_peaks[k] for k in one.program_peaks)
        full = _at_depth(one.program_peaks, plan.program_peaks, depth)
        if hasattr(config, "rollout"):  # the sampler unrolls its layers: the line it is
            assert grows, (one.program_peaks, plan.program_peaks)
        elif not grows or max(full.values()) > target.memory_bytes:
            one = None  # the line settles nothing (a forward-only pass shrank from 1 to 2 layers)
    if one is None:
        # LoRA (a frozen base: forward passes dominate, which the line does not bound) or an
        # unsettled line: the run itself, at its depth (every program scans its layers).
        (plan,) = _plans(config, target, (depth,))
        assert plan.fits, format_plan(plan)
        full = plan.program_peaks
    assert plan.programs[0].name == "update step" and len(plan.programs) >= 2  # and reference / eval / sampler
    peak = max(full.values())
    assert peak <= target.memory_bytes, (name, topology, {k: v / 2**30 for k, v in full.items()}, format_plan(plan))
    if name == "dpo_qwen2_5_0_5b":
        # FSDP's gradient reduction: XLA:TPU fuses the reduce-scatter with the weight-gradient matmul
        # (a windowed-einsum loop of collective permutes), counted as reduce-scatter.
        assert plan.programs[0].collectives.get("reduce-scatter", 0) > 0, plan.programs[0].collectives


def test_memory_is_affine_in_depth():
    """The extrapolation's premise, on compiled TPU programs: at 4 layers no program exceeds the line through 1 and 2.

    The tiny DPO run with Qwen2.5-0.5B's recipe (remat full, FSDP over a v5e:2x4 slice, 4 micro-batches,
    eval and reference passes), every program of the run.
    """
    config = _run_config("dpo_qwen2_5_0_5b", "tiny")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, remat="full"),
                                 mesh=dataclasses.replace(config.mesh, data=1, fsdp=-1),
                                 train=dataclasses.replace(config.train, micro_batches=2))
    one, two, four = _plans(config, _target("v5e:2x4"), (1, 2, 4))
    line = _at_depth(one.program_peaks, two.program_peaks, 4)
    for k, v in four.program_peaks.items():
        assert two.program_peaks[k] < v <= line[k] * 1.01, (k, v, line[k])  # the line never under-estimates
    # The update step (weights, moments, gradients, saved layer inputs) is on the line (measured: 1.0%
    # above it at 4 with the NaN guard's select, 1.2% below since the guard's lax.cond); the forward-only
    # passes grow less from 2 to 4 layers than from 1 to 2 (measured: 13% and 7% below the line at 4).
    assert four.program_peaks["update step"] == pytest.approx(line["update step"], rel=0.02)


def test_tpu_plan_reports_every_program_with_figures():
    module, _ = load_experiment(os.path.join(ROOT, "experiments", "dpo_tiny.py"))
    config = module.get_config().dpo
    target = resolve_target("v5litepod-8")
    plan = plan_run(dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, data=1, fsdp=-1)), target=target)
    assert plan.target == "v5e:2x4 (v5litepod-8)" and plan.memory_bytes == 16_909_336_064 and plan.fits
    update = plan.programs[0]
    assert update.ok and update.peak_bytes > update.argument_bytes > 0 and update.flops > update.xla_flops
    assert update.arguments["parameters"] > 0 and update.arguments["optimizer state"] > 0
    assert update.collectives["total"] > 0  # FSDP over 8 chips: parameters gathered, gradients reduced
