"""QLoRA: NF4 and int8 bases against references computed from the codebook, bad block sizes, the
quantized forward and training (only adapters move, merged == unmerged), and a LoRA run's quantized
checkpoint read back as plain weights."""

import dataclasses
import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from step_fixtures import FAST_COMPILE, OPTIMIZER, STRATEGY_MESHES, host_params, mesh_for, sft_batches, \
    single_device_mesh

from rlhf_jax.models import CausalLM
from rlhf_jax.models.lora import LoraConfig, base_params
from rlhf_jax.models.qlora import (
    NF4_CODES,
    QLoraLM,
    QuantizedKernel,
    dequantize_kernel,
    dequantize_params,
    quantize_kernel,
)
from rlhf_jax.optim import make_optimizer
from rlhf_jax.sharding_lint import lint
from rlhf_jax.state import train_state_from_params
from rlhf_jax.steps import SFT_KEYS, jit_model_step, make_sft_step
from rlhf_jax.testing import tiny_config


def _nf4_codebook() -> np.ndarray:
    """NF4 from its definition (QLoRA, Appendix E; bitsandbytes' `create_normal_map(0.9677083)`):
    8 positive and 7 negative quantiles of N(0, 1), zero, normalised to [-1, 1]."""
    ppf = NormalDist().inv_cdf
    offset = 0.9677083
    pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.sort(np.array(pos + [0.0] + neg))
    return values / np.abs(values).max()


def test_nf4_round_trip_matches_the_codebook():
    codes = _nf4_codebook()
    np.testing.assert_allclose(np.array(NF4_CODES), codes, atol=1e-6)
    w = np.asarray(jax.random.normal(jax.random.key(0), (2, 128, 48)), np.float32)  # [L, K, N], K = 2 blocks
    kernel = quantize_kernel(jnp.asarray(w), in_dims=1, kind="nf4", block_size=64)
    assert kernel.codes.dtype == jnp.uint8 and kernel.codes.shape == (2, 64, 48)  # two codes per byte
    assert kernel.scale.shape == (2, 2, 48)
    got = np.asarray(dequantize_kernel(kernel))
    # Reference: per (layer, block of 64 along K, output column), absmax c and the nearest code of w / c.
    blocks = w.reshape(2, 2, 64, 48)
    c = np.abs(blocks).max(axis=2, keepdims=True)
    nearest = codes[np.abs(blocks[..., None] / c[..., None] - codes).argmin(-1)]
    want = (nearest * c).reshape(w.shape)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # Within the codebook's error: half the widest gap between neighbouring codes, times the absmax.
    bound = np.max(np.diff(codes)) / 2 * np.repeat(c, 64, axis=2).reshape(w.shape)
    assert np.all(np.abs(got - w) <= bound + 1e-6)
    assert np.all(np.abs(got - w).reshape(2, 2, 64, 48).max(axis=2) > 0)  # really quantized


def test_int8_per_channel_and_double_quant_round_trips():
    w = jax.random.normal(jax.random.key(1), (2, 64, 256))
    kernel = quantize_kernel(w, in_dims=1, kind="int8")
    assert kernel.codes.dtype == jnp.int8 and kernel.scale.shape == (2, 1, 256)
    step = np.abs(np.asarray(w)).max(axis=1, keepdims=True) / 127.5  # one scale per output channel
    assert np.all(np.abs(np.asarray(dequantize_kernel(kernel)) - np.asarray(w)) <= step / 2 + 1e-6)
    single = quantize_kernel(w, in_dims=1, kind="nf4", block_size=32)
    double = quantize_kernel(w, in_dims=1, kind="nf4", block_size=32, double_quant=True)
    assert double.scale.dtype == jnp.int8 and double.scale_scale.shape == (2, 2, 1)
    np.testing.assert_array_equal(np.asarray(double.codes), np.asarray(single.codes))
    # The absmaxes to within half an int8 step of their group's maximum.
    s_single, s_double = np.asarray(single.scale), np.asarray(dequantize_kernel(
        QuantizedKernel(jnp.full(single.codes.shape, 0xFF, jnp.uint8), double.scale, double.scale_scale, "nf4",
                        (64, 256))))[:, ::32, :]
    assert np.all(np.abs(s_double - s_single) <= s_single.max(axis=2, keepdims=True) / 127.5 / 2 + 1e-6)


def test_bad_block_sizes_are_clear_errors():
    w = jnp.zeros((2, 96, 64))
    with pytest.raises(ValueError, match=r"layers/attn/q_proj: the NF4 block size 64 does not divide its input "
                                         r"dimension 96"):
        quantize_kernel(w, in_dims=1, block_size=64, name="layers/attn/q_proj")
    with pytest.raises(ValueError, match=r"layers/mlp/up_proj: double quantization groups .* none divides its "
                                         r"output dimension 48"):
        quantize_kernel(jnp.zeros((2, 64, 48)), in_dims=1, block_size=32, double_quant=True,
                        name="layers/mlp/up_proj")
    with pytest.raises(ValueError, match=r"block size 48 does not divide its input dimension 64"):
        QLoraLM(CausalLM(tiny_config()), LoraConfig(quantize="nf4", quant_block_size=48)).init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"double_quant applies to the NF4 base only"):
        LoraConfig(quantize="int8", double_quant=True)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_forward_trains_only_adapters_and_merges(kind):
    lm = QLoraLM(CausalLM(tiny_config()), LoraConfig(rank=4, alpha=8.0, targets=("q", "o", "up", "down"),
                                                     quantize=kind, quant_block_size=16))
    params = jax.tree.map(np.asarray, lm.init_from_base(host_params(), jax.random.key(1)))
    tokens = sft_batches(1)[0]["tokens"]
    base = CausalLM(tiny_config())
    plain = dequantize_params(base_params(params), jnp.float32)
    # Zero adapters: the model is the dequantized base (dequantized inside the layer scan).
    np.testing.assert_allclose(np.asarray(lm.forward(params, tokens).logits),
                               np.asarray(base.forward(plain, tokens).logits), atol=1e-6)
    if kind == "int8":  # the step is the NF4 case's (the same code path, other numerics)
        merged = np.asarray(base.forward(lm.merge_params(params), tokens).logits)
        np.testing.assert_allclose(merged, np.asarray(lm.forward(params, tokens).logits), atol=1e-5)
        return
    mesh = single_device_mesh()
    state = train_state_from_params(params, make_optimizer(OPTIMIZER), rng=0, logical_axes=lm.logical_axes,
                                    mesh=mesh, strategy="dp")
    step = jit_model_step(make_sft_step(lm, OPTIMIZER), lm, OPTIMIZER, mesh=mesh, strategy="dp", batch_keys=SFT_KEYS)
    batch = sft_batches(1)[0]
    compiled = step.lower(state, batch).compile(compiler_options=FAST_COMPILE)
    for _ in range(2):
        state, _ = compiled(state, batch)
    for got, want in zip(jax.tree.leaves(base_params(state.params)), jax.tree.leaves(base_params(params))):
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()  # the quantized base is frozen
    unmerged = np.asarray(lm.forward(state.params, tokens).logits)
    assert np.abs(unmerged - np.asarray(lm.forward(params, tokens).logits)).max() > 1e-4
    merged = np.asarray(base.forward(lm.merge_params(state.params), tokens).logits)
    assert np.abs(merged - unmerged).max() <= 1e-5


def test_quantized_embeddings_and_head():
    lm = QLoraLM(CausalLM(tiny_config()), LoraConfig(rank=4, targets=("q", "embed", "lm_head"), quantize="nf4",
                                                     quant_block_size=16, quantize_embeddings=True))
    params = lm.init_from_base(host_params(), jax.random.key(1))
    params["lora"] = jax.tree.map(lambda x: x + 0.05, params["lora"])
    base = params["base"].tree
    assert isinstance(base["embed"], QuantizedKernel) and base["embed"].codes.shape == (1, 32, 256)  # [1, E/2, V]
    plain = dequantize_params(base, jnp.float32)
    assert plain["embed"].shape == (256, 64) and plain["lm_head"].shape == (64, 256)
    err = np.abs(np.asarray(plain["embed"]) - host_params()["embed"]).max()
    assert 0 < err <= np.abs(host_params()["embed"]).max() * np.max(np.diff(NF4_CODES)) / 2  # within NF4's error
    tokens = sft_batches(1)[0]["tokens"]
    merged = CausalLM(tiny_config()).forward(lm.merge_params(params), tokens).logits
    np.testing.assert_allclose(np.asarray(merged), np.asarray(lm.forward(params, tokens).logits), atol=1e-5)
    issues = lint(lm.abstract_params(), lm.logical_axes, mesh=mesh_for(STRATEGY_MESHES["fsdp_tp"]), strategy="fsdp_tp")
    assert not [i for i in issues if i.severity == "error" or i.kind == "unknown_logical_axis"], issues


def test_quantized_base_is_sharded_and_small():
    lm = QLoraLM(CausalLM(tiny_config()), LoraConfig(rank=4, quantize="nf4", quant_block_size=16))
    for strategy in ("fsdp", "fsdp_tp"):
        issues = lint(lm.abstract_params(), lm.logical_axes, mesh=mesh_for(STRATEGY_MESHES[strategy]),
                      strategy=strategy)
        assert not [i for i in issues if i.severity == "error" or i.kind == "unknown_logical_axis"], issues
    kernel = lm.abstract_params()["base"].tree["layers"]["mlp"]["up_proj"]
    bits = (kernel.codes.size * 8 + kernel.scale.size * 32) / math.prod((2,) + kernel.kernel_shape)
    assert bits == 4 + 32 / 16  # 4-bit codes and one float32 absmax per block of 16
    from rlhf_jax.sharding import param_shardings
    shardings = param_shardings(lm.abstract_params(), lm.logical_axes, mesh=mesh_for(STRATEGY_MESHES["fsdp_tp"]),
                                strategy="fsdp_tp")
    up = shardings["base"].tree["layers"]["mlp"]["up_proj"]
    assert tuple(up.codes.spec) == (None, "fsdp", "tensor") and tuple(up.scale.spec) == (None, "fsdp", "tensor")


def test_a_qlora_checkpoint_reads_back_as_plain_merged_weights(tmp_path):
    from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
    from rlhf_jax.train import sft
    from rlhf_jax.train import tiny_stages as tiny
    from rlhf_jax.train.weights import initial_params

    lora = LoraConfig(rank=4, targets=("q", "lm_head"), quantize="nf4", quant_block_size=16)
    config = tiny.sft_tiny("qlora_ckpt")
    config = dataclasses.replace(
        config, workdir=str(tmp_path), lora=lora,
        data=dataclasses.replace(config.data, num_train=32, num_eval=8, batch_size=8),
        train=TrainConfig(steps=2, eval_every=0), checkpoint=CheckpointConfig(every=0, async_save=False),
        logging=LoggingConfig(console=False, tensorboard=False))
    sft.train(config)
    merged = initial_params(CausalLM(config.model), str(tmp_path / "checkpoints"), rng=jax.random.key(0))
    assert merged["layers"]["attn"]["q_proj"].dtype == jnp.float32  # plain parameters
    lm = QLoraLM(CausalLM(config.model), lora)
    from rlhf_jax.train.supervised import ModelState
    spec = ModelState(lm, make_optimizer(config.optim), config.mesh.make_mesh(), config.mesh.strategy, 0, None)
    from rlhf_jax.checkpoint import Checkpointer
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), spec.save_items(spec.abstract()))
    with Checkpointer(tmp_path / "checkpoints", read_only=True) as ckpt:
        items, _ = ckpt.restore({k: target[k] for k in ("params", "lora")})
    params = lm.init_from_base(items["params"], None, items["lora"]["adapters"])
    want = lm.merge_params(params)
    for got, ref in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6)


def test_double_quant_of_output_dimensions_that_256_does_not_divide():
    """Qwen2.5-0.5B's k_proj [896, 2, 64] (N = 128) and o_proj [14, 64, 896] (N = 896 = 7 * 128) were
    refused with double quantization (256 absmaxes per group); they now group 128 absmaxes, each within
    half an int8 step of its group's maximum of the single-quantized absmax, the codes unchanged."""
    from rlhf_jax.models.qlora import double_quant_group

    assert [double_quant_group(n) for n in (4096, 1024, 896, 128, 48)] == [256, 256, 128, 128, 16]
    w = jax.random.normal(jax.random.key(0), (1, 2, 64, 896))  # o_proj [L, H, D, E]: K = 128, N = 896
    single = quantize_kernel(w, in_dims=2, kind="nf4", block_size=64)
    double = quantize_kernel(w, in_dims=2, kind="nf4", block_size=64, double_quant=True, name="layers/attn/o_proj")
    assert double.scale.dtype == jnp.int8 and double.scale_scale.shape == (1, 2, 7)
    np.testing.assert_array_equal(np.asarray(double.codes), np.asarray(single.codes))
    c = np.asarray(single.scale)  # [1, K / 64, N] absmaxes
    group_max = np.repeat(c.reshape(1, 2, 7, 128).max(axis=3), 128, axis=2)
    got = np.asarray(double.scale, np.float32) * np.repeat(np.asarray(double.scale_scale), 128, axis=2)
    assert np.all(np.abs(got - c) <= group_max / 127.5 / 2 + 1e-6) and np.abs(got - c).max() > 0
    want = np.repeat(got, 64, axis=1).reshape(w.shape) * (np.asarray(dequantize_kernel(single)) /
                                                         np.repeat(c, 64, axis=1).reshape(w.shape))  # code · c'
    np.testing.assert_allclose(np.asarray(dequantize_kernel(double)), want, rtol=1e-5, atol=1e-6)
