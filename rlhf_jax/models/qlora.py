"""QLoRA: LoRA adapters over a quantized frozen base, dequantized one layer at a time in the forward.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores the frozen base in 4-bit NormalFloat (NF4):
each block of `B` = 64 consecutive input weights of one output channel keeps its absmax
`c = max |w|` and the index of the NF4 code nearest to `w / c`, the 16 codes being the quantiles of
N(0, 1) scaled to [-1, 1] (Appendix E); `w ≈ code · c`. Double quantization stores the absmaxes
themselves in 8 bits (here: symmetric int8 per group of 256 absmaxes of one input block across
consecutive output channels, with a float32 scale per group; `double_quant_group`), 4.127 instead of
4.5 bits per weight. `int8` is per-channel absmax
quantization (one scale per output channel; Dettmers et al. 2022's vector-wise scheme without
outliers). The seven layer projections are quantized; embeddings and the LM head keep the model's
dtype, as bitsandbytes does, unless `quantize_embeddings` (then blocks run along the hidden
dimension of each token's row, and of each vocabulary column of the head); norms and biases never.

The quantized kernel is a pytree (`QuantizedKernel`: codes, scales, static kind and shape) placed
and sharded like any parameter (its axes are the kernel's input / output axes, flattened). Inside
the scanned layer the forward dequantizes the layer's kernels (`dequantize_layer`, the
`layer_weights` hook of `CausalLM.forward`), so only one layer's weights exist in full precision at
a time, and the adapters apply unmerged on top (`models.lora`).

Quantization numerics are qwix's (`qwix.quantize` / `qwix.dequantize`, the JAX quantization
library Tunix uses): its `QArray` is a plain pytree, so it fits our explicit parameter trees; we
add the flattening to [layers, K, N] (so that NF4 blocks run along the whole input dimension of
any kernel layout) and double quantization, which qwix does not have.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import qwix

from rlhf_jax.config import ConfigError
from rlhf_jax.models.lora import LoraConfig, LoraLM, base_params
from rlhf_jax.models.transformer import CausalLM, KVCache, ModelOutput

__all__ = ["QuantizedKernel", "KERNELS", "quantize_kernel", "double_quant_group", "dequantize_kernel",
           "dequantize_layer", "pack_nf4", "unpack_nf4", "quantize_params", "dequantize_params",
           "quantized_from_stored", "QuantizedLM", "QLoraLM", "NF4_CODES"]

QuantKind = Literal["int8", "nf4"]
DOUBLE_QUANT_GROUP = 256  # absmaxes per int8 scale (QLoRA's; fewer where the output dimension needs it)
MIN_DOUBLE_QUANT_GROUP = 32  # below this, the float32 group scales cost more than the int8 absmaxes save
# Per-layer kernels: (path under `layers`, input axes after the layer axis, logical input name, output name).
KERNELS = {
    ("attn", "q_proj"): (1, "embed", "q_heads"),
    ("attn", "k_proj"): (1, "embed", "kv_heads"),
    ("attn", "v_proj"): (1, "embed", "kv_heads"),
    ("attn", "o_proj"): (2, "q_heads", "embed"),
    ("mlp", "gate_proj"): (1, "embed", "mlp"),
    ("mlp", "up_proj"): (1, "embed", "mlp"),
    ("mlp", "down_proj"): (1, "mlp", "embed"),
}
# The NF4 codebook (QLoRA, Appendix E), as qwix stores it.
NF4_CODES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A quantized [(L,) in..., out...] kernel, stored flattened as [(L,) K, N].

    NF4 codes are packed two per byte (`pack_nf4`: rows 2j and 2j + 1 of K in the low and high
    nibble), so the tree holds standard dtypes only: numpy, orbax and every backend move it as is
    (a `uint4` array put on a device from the host gets an unpacked layout that XLA's compiled
    steps refuse).

    Attributes:
      codes: uint8 packed NF4 code indices [(L,) K / 2, N], or int8 values [(L,) K, N].
      scale: float32 [(L,) K / B, N] absmaxes (nf4), [(L,) 1, N] (int8); with double quantization
        int8 [(L,) K / B, N].
      scale_scale: None, or float32 [(L,) K / B, N / G] (double quantization, G = `double_quant_group(N)`).
      kind: "nf4" or "int8" (static).
      kernel_shape: the kernel's per-layer shape (static), e.g. (E, H, D) for `q_proj`.
    """

    codes: Any
    scale: Any
    scale_scale: Any = None
    kind: str = dataclasses.field(default="nf4", metadata=dict(static=True))
    kernel_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))


def _check_quant(kind: str, block_size: int, double_quant: bool) -> None:
    if kind not in ("int8", "nf4"):
        raise ConfigError(f"lora.quantize must be 'none', 'int8' or 'nf4', got {kind!r}")
    if double_quant and kind != "nf4":
        raise ConfigError("lora.double_quant applies to the NF4 base only (lora.quantize='nf4')")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ConfigError(f"lora.quant_block_size must be a positive int, got {block_size!r}")


def quantize_kernel(w, *, in_dims: int, kind: QuantKind = "nf4", block_size: int = 64, double_quant: bool = False,
                    name: str = "kernel") -> QuantizedKernel:
    """Quantize a stacked kernel `w` [L, in..., out...] (`in_dims` input axes after the layer axis).

    NF4: per output channel, blocks of `block_size` consecutive weights along the flattened input
    dimension K, each `w ≈ NF4_CODES[code] · absmax(block)`; int8: per output channel,
    `w ≈ q · absmax / 127.5` with `q` in [-127, 127] (qwix's symmetric bound).

    Raises:
      ValueError: `block_size` does not divide K (naming the kernel), or with `double_quant` the
        output dimension N has no group of at least 32 (`double_quant_group`).
    """
    _check_quant(kind, block_size, double_quant)
    layers, kernel_shape = w.shape[0], tuple(w.shape[1:])
    k, n = math.prod(kernel_shape[:in_dims]), math.prod(kernel_shape[in_dims:])
    w3 = w.reshape(layers, k, n).astype(jnp.float32)
    if kind == "int8":
        q = qwix.quantize(w3, jnp.int8, channelwise_axes=(0, 2))
        return QuantizedKernel(q.qvalue, q.scale, None, kind, kernel_shape)
    if k % block_size or block_size % 2:
        raise ValueError(f"{name}: the NF4 block size {block_size} does not divide its input dimension {k} "
                         f"(kernel shape {kernel_shape}) or is odd (codes are packed two per byte); choose an "
                         f"even lora.quant_block_size dividing {k}")
    q = qwix.quantize(w3, "nf4", channelwise_axes=(0, 2), tiled_axes={1: block_size})
    codes = pack_nf4(q.qvalue)
    if not double_quant:
        return QuantizedKernel(codes, q.scale, None, kind, kernel_shape)
    group = double_quant_group(n)
    if group < MIN_DOUBLE_QUANT_GROUP:
        raise ValueError(f"{name}: double quantization groups the absmaxes of an input block over consecutive "
                         f"output channels, {DOUBLE_QUANT_GROUP} (or a power of two >= {MIN_DOUBLE_QUANT_GROUP}) "
                         f"at a time, and none divides its output dimension {n}; set lora.double_quant=false")
    s = qwix.quantize(q.scale, jnp.int8, channelwise_axes=(0, 1), tiled_axes={2: group})
    return QuantizedKernel(codes, s.qvalue, s.scale, kind, kernel_shape)


def double_quant_group(n: int) -> int:
    """How many absmaxes share one float32 scale under double quantization, for an output dimension
    `n`: QLoRA's 256, or the largest power of two dividing `n` when 256 does not (Qwen2.5-0.5B's
    k_proj has n = 128, its o_proj 896 = 7 * 128): 4.127 bits per weight at 256, 4.129 at 128."""
    return math.gcd(n, DOUBLE_QUANT_GROUP)


def pack_nf4(codes) -> jax.Array:
    """uint4 / uint8 code indices [..., K, N] (K even) -> uint8 [..., K / 2, N], two codes per byte."""
    c = codes.astype(jnp.uint8)
    pairs = c.reshape(c.shape[:-2] + (c.shape[-2] // 2, 2, c.shape[-1]))
    return pairs[..., 0, :] | (pairs[..., 1, :] << 4)


def unpack_nf4(packed) -> jax.Array:
    """The inverse of `pack_nf4`: uint8 code indices [..., K, N]."""
    pairs = jnp.stack([packed & 15, packed >> 4], axis=-2)
    return pairs.reshape(packed.shape[:-2] + (2 * packed.shape[-2], packed.shape[-1]))


def dequantize_kernel(kernel: QuantizedKernel, dtype=jnp.float32) -> jax.Array:
    """The kernel in its layout [(L,) in..., out...] and `dtype` (the inverse of `quantize_kernel`)."""
    scale = kernel.scale
    if kernel.scale_scale is not None:
        scale = qwix.dequantize(qwix.QArray(kernel.scale, kernel.scale_scale, None, jnp.int8))
    if kernel.kind == "nf4":
        w = qwix.dequantize(qwix.QArray(unpack_nf4(kernel.codes), scale.astype(jnp.float32), None, "nf4"))
    else:
        w = qwix.dequantize(qwix.QArray(kernel.codes, scale.astype(jnp.float32), None, jnp.int8))
    return w.reshape(kernel.codes.shape[:-2] + kernel.kernel_shape).astype(dtype)


def _is_kernel(x) -> bool:
    return isinstance(x, QuantizedKernel)


def dequantize_layer(params, dtype=jnp.float32):
    """Every `QuantizedKernel` of a (layer's) parameter tree dequantized; other leaves unchanged.

    The `layer_weights` hook `CausalLM.forward` applies inside the layer scan.
    """
    return jax.tree.map(lambda x: dequantize_kernel(x, dtype) if _is_kernel(x) else x, params, is_leaf=_is_kernel)


def quantize_params(params: Mapping[str, Any], *, kind: QuantKind = "nf4", block_size: int = 64,
                    double_quant: bool = False, embeddings: bool = False) -> dict:
    """A model's parameters with the seven layer projections quantized (`KERNELS`), and with
    `embeddings` the token embedding [V, E] and an untied LM head [E, V], both stored as one stacked
    [1, E, V] kernel (the embedding transposed: blocks along E for every token, and the vocabulary as
    the minor dimension, which TPU layouts tile without padding); never double-quantized."""
    params = jax.tree.map(lambda x: x, dict(params))  # new containers
    for (group, name), (in_dims, _, _) in KERNELS.items():
        node = params["layers"][group]
        node[name] = quantize_kernel(node[name], in_dims=in_dims, kind=kind, block_size=block_size,
                                     double_quant=double_quant, name=f"layers/{group}/{name}")
    if embeddings:
        params["embed"] = quantize_kernel(params["embed"].T[None], in_dims=1, kind=kind, block_size=block_size,
                                          name="embed")
        if "lm_head" in params:
            params["lm_head"] = quantize_kernel(params["lm_head"][None], in_dims=1, kind=kind, block_size=block_size,
                                                name="lm_head")
    return params


def dequantize_params(params, dtype) -> dict:
    """Plain parameters (every quantized kernel dequantized to `dtype`)."""
    params = dict(params)
    if _is_kernel(params.get("lm_head")):  # stored as one stacked [1, E, V] kernel
        params["lm_head"] = dequantize_kernel(params["lm_head"], dtype)[0]
    if _is_kernel(params.get("embed")):  # stored transposed, as one stacked [1, E, V] kernel
        params["embed"] = dequantize_kernel(params["embed"], dtype)[0].T
    return dequantize_layer(params, dtype)


def quantized_from_stored(tree: Mapping[str, Any], plain_abstract: Mapping[str, Any]) -> dict:
    """Quantized parameters from their checkpointed nested dicts (`codes`, `scale`, `scale_scale`),
    the static kind and shapes recovered from the codes' dtype and the plain model's shapes."""
    tree = jax.tree.map(lambda x: x, dict(tree))

    def rebuild(stored, kernel_shape):
        kind = "nf4" if stored["codes"].dtype == jnp.uint8 else "int8"  # packed NF4 codes, or int8 values
        return QuantizedKernel(stored["codes"], stored["scale"], stored.get("scale_scale"), kind, tuple(kernel_shape))

    for (group, name) in KERNELS:
        tree["layers"][group][name] = rebuild(tree["layers"][group][name],
                                              plain_abstract["layers"][group][name].shape[1:])
    if isinstance(tree.get("embed"), Mapping):
        tree["embed"] = rebuild(tree["embed"], plain_abstract["embed"].shape[::-1])
    if isinstance(tree.get("lm_head"), Mapping):
        tree["lm_head"] = rebuild(tree["lm_head"], plain_abstract["lm_head"].shape)
    return tree


def _kernel_axes(kind: str, kernel_shape, in_name: str, out_name: str | None, double_quant: bool,
                 stacked: str | None = "layers") -> QuantizedKernel:
    scale_in = None if kind == "int8" else in_name
    return QuantizedKernel((stacked, in_name, out_name), (stacked, scale_in, out_name),
                           (stacked, in_name, None) if double_quant else None, kind, tuple(kernel_shape))


class QuantizedLM:
    """A `CausalLM` whose layer projections are stored quantized: the same pure surface.

    `init` / `abstract_params` give quantized parameters, `forward` dequantizes each layer's
    kernels inside the layer scan (and quantized embeddings / LM head once, sharded, before it),
    `plain_params` gives the dequantized tree for a plain `CausalLM` (the sampler, an export).
    """

    def __init__(self, model: CausalLM, *, kind: QuantKind = "nf4", block_size: int = 64, double_quant: bool = False,
                 embeddings: bool = False):
        _check_quant(kind, block_size, double_quant)
        self.model, self.kind, self.block_size, self.double_quant = model, kind, block_size, double_quant
        self.embeddings = embeddings
        self.config, self.head = model.config, model.head
        self.logical_axes = jax.tree.map(lambda x: x, dict(model.logical_axes),
                                         is_leaf=lambda x: isinstance(x, tuple))
        abstract = model.abstract_params()
        for (group, name), (_, in_name, out_name) in KERNELS.items():
            shape = abstract["layers"][group][name].shape[1:]
            self.logical_axes["layers"][group][name] = _kernel_axes(kind, shape, in_name, out_name, double_quant)
        if embeddings:
            e = self.config.hidden_size
            self.logical_axes["embed"] = _kernel_axes(kind, (e, self.config.vocab_size), "embed", "vocab", False,
                                                      stacked=None)
            if "lm_head" in abstract:
                self.logical_axes["lm_head"] = _kernel_axes(kind, (e, self.config.vocab_size), "embed", "vocab", False,
                                                            stacked=None)

    def quantize(self, params) -> dict:
        """Plain parameters of the model, quantized."""
        return quantize_params(params, kind=self.kind, block_size=self.block_size, double_quant=self.double_quant,
                               embeddings=self.embeddings)

    def plain_params(self, params) -> dict:
        return dequantize_params(params, self.config.jnp_param_dtype)

    def _top(self, params) -> dict:
        """`params` with quantized embeddings and LM head dequantized (the layers stay quantized)."""
        if not self.embeddings:
            return params
        top = {k: params[k] for k in ("embed", "lm_head") if k in params}
        return {**params, **dequantize_params(top, self.config.jnp_param_dtype)}

    def init(self, rng) -> dict:
        return self.quantize(self.model.init(rng))

    def abstract_params(self) -> dict:
        return jax.eval_shape(self.init, jax.random.key(0))

    def num_params(self) -> int:
        return self.model.num_params()

    def forward(self, params, tokens, positions=None, segment_ids=None, *, cache: KVCache | None = None,
                adapters=None, dropout=None, rng=None, prefill=False) -> ModelOutput:
        dtype = self.config.jnp_param_dtype
        return self.model.forward(self._top(params), tokens, positions, segment_ids, cache=cache, adapters=adapters,
                                  dropout=dropout, rng=rng, layer_weights=lambda p: dequantize_layer(p, dtype),
                                  prefill=prefill)

    def lm_head_weight(self, params):
        return self.model.lm_head_weight(self._top(params))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        return self.model.init_cache(batch, max_len, dtype)

    @property
    def cache_logical_axes(self) -> KVCache:
        return self.model.cache_logical_axes


class QLoraLM(LoraLM):
    """LoRA adapters over a quantized frozen base (`lora.quantize` = "nf4" or "int8").

    `init_from_base` takes plain base parameters (a checkpoint, a Hugging Face model) and quantizes
    them; `merge_params` dequantizes the base and adds s·A·B (plain `CausalLM` parameters).
    """

    def __init__(self, base: CausalLM, lora: LoraConfig):
        if lora.quantize == "none":
            raise ConfigError("QLoraLM needs lora.quantize = 'nf4' or 'int8'")
        super().__init__(QuantizedLM(base, kind=lora.quantize, block_size=lora.quant_block_size,
                                     double_quant=lora.double_quant, embeddings=lora.quantize_embeddings), lora)
        self.plain_model = base

    def init_from_base(self, base, rng, adapters=None) -> dict:
        """Around plain base parameters (quantized here) or already quantized ones (a restore)."""
        quantized = any(_is_kernel(x) for x in jax.tree.leaves(base, is_leaf=_is_kernel))
        return super().init_from_base(base if quantized else self.base.quantize(base), rng, adapters)

    def init(self, rng) -> dict:
        return super().init_from_base(self.base.init(rng), jax.random.fold_in(rng, 1))

    def plain_base_params(self, params) -> dict:
        """The base with adapters off, dequantized (plain `CausalLM` parameters)."""
        return self.base.plain_params(base_params(params))

    def merge_params(self, params) -> dict:
        plain = {**params, "base": type(params["base"])(self.base.plain_params(params["base"].tree))}
        return super().merge_params(plain)
