"""Shared helpers of the step tests: tiny models, fixed batches, fast compiles, tree comparisons."""

from __future__ import annotations

import functools

import jax
import numpy as np

from rlhf_jax import sharding as sh
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import OptimizerConfig, make_optimizer
from rlhf_jax.state import train_state_from_params
from rlhf_jax.steps import (
    PAIR_KEYS,
    SFT_KEYS,
    dpo_batch_keys,
    dpo_takes_reference,
    jit_model_step,
    make_dpo_step,
    make_sft_step,
)
from rlhf_jax.testing import tiny_config

# Correctness tests only: skip LLVM's optimisation passes, which dominate compile time on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

# One mesh per strategy on 8 simulated devices (the tiny model has 2 kv heads: tensor <= 2).
STRATEGY_MESHES = {
    "dp": {"data": 8},
    "fsdp": {"data": 2, "fsdp": 4},
    "tp": {"data": 4, "tensor": 2},
    "fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2},
}

# Adam's update g / (sqrt(v) + eps) turns round-off-sized gradients (different summation orders on
# different meshes) into steps of size lr; eps = 1e-6 keeps that amplification (lr / eps) small
# enough for the 1e-5 equivalence tolerance while real gradients still get Adam's normalisation.
OPTIMIZER = OptimizerConfig(learning_rate=1e-3, eps=1e-6, max_grad_norm=1.0)
BATCH, SEQ = 8, 16


@functools.cache
def tiny_lm(head: str = "lm") -> CausalLM:
    return CausalLM(tiny_config(), head=head)


@functools.cache
def host_params(head: str = "lm", seed: int = 0):
    """Initial parameters as host numpy arrays (compiled once per head)."""
    lm = tiny_lm(head)
    init = jax.jit(lm.init).lower(jax.random.key(seed)).compile(compiler_options=FAST_COMPILE)
    return jax.tree.map(np.asarray, init(jax.random.key(seed)))


def single_device_mesh():
    return sh.make_mesh({"data": 1}, devices=jax.devices()[:1])


def mesh_for(shape):
    n = int(np.prod(list(shape.values())))
    return sh.make_mesh(shape, devices=jax.devices()[:n])


def sft_batches(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(4, 256, (BATCH, SEQ)).astype(np.int32)
        mask = (rng.random((BATCH, SEQ)) > 0.25).astype(np.int32)
        mask[:, :3] = 0
        out.append({"tokens": tokens, "loss_mask": mask})
    return out


def pair_batches(n: int, seed: int = 1):
    """Preference pairs: 5 prompt tokens shared by both sides, completions of varied length."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        batch = {}
        prompt = rng.integers(4, 256, (BATCH, 5))
        for prefix in ("chosen_", "rejected_"):
            tokens = np.concatenate([prompt, rng.integers(4, 256, (BATCH, SEQ - 5))], axis=1).astype(np.int32)
            lengths = rng.integers(8, SEQ + 1, BATCH)
            real = np.arange(SEQ)[None, :] < lengths[:, None]
            tokens = np.where(real, tokens, 0).astype(np.int32)
            mask = (real & (np.arange(SEQ)[None, :] >= 5)).astype(np.int32)
            batch[prefix + "tokens"], batch[prefix + "loss_mask"] = tokens, mask
        out.append(batch)
    return out


def jit_for(make_step, lm, mesh, strategy: str, **kwargs):
    """`make_step(lm, OPTIMIZER, **kwargs)` jitted with `jit_model_step` (batch keys and frozen
    reference parameters as the step's module says)."""
    update = make_step(lm, OPTIMIZER, **kwargs)
    micro = kwargs.get("micro_batches", 1)
    if make_step is make_dpo_step:
        objective, reference = kwargs.get("objective"), kwargs.get("reference", "model")
        keys, frozen = dpo_batch_keys(objective, reference), int(dpo_takes_reference(objective, reference))
    else:
        keys, frozen = (SFT_KEYS if make_step is make_sft_step else PAIR_KEYS), 0
    return jit_model_step(update, lm, OPTIMIZER, mesh=mesh, strategy=strategy, micro_batches=micro,
                          batch_keys=keys, frozen_params=frozen, name=make_step.__name__)


def run_steps(make_step, *, head: str, shape, strategy: str, batches, with_reference: bool = False, **kwargs):
    """Run `len(batches)` steps from the shared initial params; return (host params, list of metrics)."""
    lm = tiny_lm(head)
    mesh = single_device_mesh() if shape is None else mesh_for(shape)
    tx = make_optimizer(OPTIMIZER)
    state = train_state_from_params(host_params(head), tx, rng=0, logical_axes=lm.logical_axes, mesh=mesh,
                                    strategy=strategy)
    step = jit_for(make_step, lm, mesh, strategy, **kwargs)
    frozen = ()
    if with_reference:
        frozen = (jax.device_put(host_params(head), step.state_shardings.params),)
    compiled = step.lower(state, batches[0], *frozen).compile(compiler_options=FAST_COMPILE)
    history = []
    for batch in batches:
        step.check_batch(batch)
        state, metrics = compiled(state, batch, *frozen)
        history.append({k: float(v) for k, v in metrics.items()})
    return jax.tree.map(np.asarray, state.params), history


def numpy_seq_logps(params, tokens, mask):
    """Summed target log-probs `sum_t mask[t+1] log p(tokens[t+1] | tokens[:t+1])` of `tiny_lm()` per row
    (float64 NumPy softmax: the reference the steps' log-probs are checked against)."""
    logits = np.asarray(tiny_lm().forward(params, tokens).logits, np.float64)[:, :-1]
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    tok = np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return (tok * mask[:, 1:]).sum(-1)


def max_rel_diff(a, b) -> float:
    """max over leaves of ||a - b|| / ||b||."""
    diffs = jax.tree.map(lambda x, y: np.linalg.norm((x - y).ravel()) / max(np.linalg.norm(y.ravel()), 1e-30), a, b)
    return float(max(jax.tree.leaves(diffs)))


class StubSampler:
    """A `Sampler` stand-in for the rollout collector's host logic: sample j of a prompt whose first
    token is p is the completion [p, j, EOS]; a `Greedy` call's is [p, 9, EOS] (ReMax's baseline rows)."""

    pad_id = 0

    def generate(self, params, prompts, sampling, *, prompt_lengths, rng):
        from rlhf_jax.sampling import Greedy
        from rlhf_jax.sampling.state import SampleOutput

        n = sampling.num_samples
        ids = np.repeat(prompts[:, 0], n)
        second = np.full(len(ids), 9) if isinstance(sampling.method, Greedy) else np.tile(np.arange(n), len(prompts))
        comp = np.stack([ids, second, np.full(len(ids), 2)], 1).astype(np.int32)
        return SampleOutput(np.repeat(prompts, n, 0), np.repeat(prompt_lengths, n), comp, np.ones_like(comp, bool),
                            np.zeros(comp.shape, np.float32), np.full(len(ids), 3, np.int32), np.zeros(len(ids), bool))


class IdTokenizer:
    """Decodes ids as their decimal numbers separated by spaces (for `StubSampler`'s completions)."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(map(str, r)) for r in rows]
