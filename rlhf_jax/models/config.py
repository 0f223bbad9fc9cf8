"""Model configuration: one decoder-only transformer family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3)."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import jax.numpy as jnp
import numpy as np

from rlhf_jax._checks import is_finite_number

ModelType = Literal["llama", "mistral", "qwen2", "qwen3"]
DType = Literal["float32", "bfloat16"]
Remat = Literal["none", "full", "dots"]
AttentionImpl = Literal["auto", "reference", "xla", "cudnn", "splash"]
PagedAttentionImpl = Literal["auto", "reference", "pallas_tpu", "pallas_gpu"]


RopeType = Literal["llama3", "linear", "yarn", "longrope", "dynamic"]
# The fields each RoPE scaling type reads (and writes to a Hugging Face config.json), after `rope_type`.
ROPE_SCALING_FIELDS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate"),
    "longrope": ("factor", "original_max_position_embeddings", "short_factor", "long_factor", "attention_factor"),
    "dynamic": ("factor",),
}
# The types whose frequencies depend on the length of the sequence being run (`layers.rope_angles`).
LENGTH_DEPENDENT_ROPE_TYPES = ("longrope", "dynamic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling, the `rope_scaling` / `rope_parameters` of a Hugging Face config.

    `rope_type` picks the scheme (formulas in `rlhf_jax.models.layers.rope_inverse_frequencies`):

    - "llama3" (Llama 3, Grattafiori et al., 2024): wavelengths longer than
      `original_max_position_embeddings / low_freq_factor` are divided by `factor`; shorter than
      `original_max_position_embeddings / high_freq_factor` are kept; the band in between is interpolated.
    - "linear" (position interpolation, Chen et al., 2023): every frequency divided by `factor`.
    - "yarn" (Peng et al., 2023): frequencies blended between divided by `factor` and kept by a linear ramp
      over the dimensions rotating between `beta_slow` and `beta_fast` times within
      `original_max_position_embeddings` (`truncate` rounds the ramp's ends outward), and cos / sin scaled
      by `attention_factor` (None: `0.1·ln(factor) + 1`, or the ratio of that with `mscale` and
      `mscale_all_dim` when both are set).
    - "longrope" (LongRoPE, Ding et al., 2024; Phi-3): frequency pair i divided by `short_factor[i]`, or by
      `long_factor[i]` in a sequence longer than `original_max_position_embeddings`; cos / sin scaled by
      `attention_factor` (None: √(1 + ln(factor) / ln(original_max_position_embeddings)) for factor > 1, where
      `factor` is the extended context over the original one).
    - "dynamic" (dynamic NTK, bloc97 / emozilla, 2023): unscaled up to the model's `max_position_embeddings`
      M; a sequence of length L > M uses the base θ·(factor·L/M - (factor - 1))^(d / (d - 2)).

    The last two depend on the sequence's length L, taken per row as its largest position + 1 (see
    `rlhf_jax.models.layers.rope_angles`). A field another type reads must keep its default, so that a
    config means one thing and an export writes all of it.
    """

    rope_type: RopeType = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("short_factor", "long_factor"):  # a JSON list (config.json, a saved run config) as a tuple
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.rope_type not in get_args(RopeType):
            raise ValueError(f"RopeScaling.rope_type must be one of {get_args(RopeType)}, got {self.rope_type!r}")
        if not is_finite_number(self.factor) or self.factor <= 0:
            raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor}")
        if not _is_int(self.original_max_position_embeddings, low=1):
            raise ValueError("RopeScaling.original_max_position_embeddings must be a positive int, got "
                             f"{self.original_max_position_embeddings!r}")
        own = ROPE_SCALING_FIELDS[self.rope_type]
        for field in dataclasses.fields(self):
            if field.name not in own and field.name != "rope_type" and getattr(self, field.name) != field.default:
                users = [t for t, names in ROPE_SCALING_FIELDS.items() if field.name in names]
                raise ValueError(f"RopeScaling.{field.name} applies to rope_type {' / '.join(map(repr, users))} "
                                 f"only; got {getattr(self, field.name)!r} with rope_type {self.rope_type!r}")
        if self.rope_type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "RopeScaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}"
            )
        for name in ("beta_fast", "beta_slow", "attention_factor"):
            value = getattr(self, name)
            if (value is not None or name.startswith("beta")) and not (is_finite_number(value) and value > 0):
                raise ValueError(f"RopeScaling.{name} must be a finite number > 0, got {value!r}")
        for name in ("mscale", "mscale_all_dim"):
            value = getattr(self, name)
            if value is not None and not is_finite_number(value):
                raise ValueError(f"RopeScaling.{name} must be a finite number or None, got {value!r}")
        if not isinstance(self.truncate, (bool, np.bool_)):
            raise ValueError(f"RopeScaling.truncate must be true or false, got {self.truncate!r}")
        if self.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                value = getattr(self, name)
                if not (isinstance(value, tuple) and value and all(is_finite_number(v) and v > 0 for v in value)):
                    raise ValueError(f"RopeScaling.{name} must be a non-empty list of finite numbers > 0 for "
                                     f"rope_type 'longrope', got {value!r}")
            if len(self.short_factor) != len(self.long_factor):
                raise ValueError(f"RopeScaling.short_factor and long_factor must have the same length (head_dim / 2), "
                                 f"got {len(self.short_factor)} and {len(self.long_factor)}")

    def hf_parameters(self) -> dict:
        """The Hugging Face `rope_scaling` dict: `rope_type` and the fields it reads (unset optionals left out)."""
        out = {"rope_type": self.rope_type}
        for name in ROPE_SCALING_FIELDS[self.rope_type]:
            value = getattr(self, name)
            if isinstance(value, tuple):
                out[name] = [float(v) for v in value]
            elif value is not None:
                out[name] = value if isinstance(value, (bool, np.bool_)) or name.startswith("original") else float(value)
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only transformer.

    `param_dtype` is the storage dtype of parameters and `dtype` the compute dtype of activations;
    logits, softmax statistics and RMSNorm statistics are always float32.
    `scan_layers` runs the (always stacked) layers with `lax.scan` instead of a Python loop, and
    `remat` rematerializes each layer in the backward pass ("dots" saves matmul outputs only).
    `attention_impl` picks the attention kernel (`rlhf_jax.models.attention`): "auto" = cuDNN flash
    attention on GPU, Splash (Pallas) on TPU, the einsum "reference" on CPU; or name one of them
    ("xla" = `jax.nn.dot_product_attention`'s XLA path). `paged_attention_impl` picks the decode read
    over a paged KV cache (`attention.resolve_paged_impl`): "auto" = JAX's Pallas paged-attention kernel
    on TPU / GPU (bf16/f16 compute), the routed einsum "reference" on CPU and in f32.
    """

    model_type: ModelType = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q, k and v projections (qwen2; llama and qwen3 with attention_bias)
    attention_out_bias: bool = False  # the o projection (llama and qwen3 with attention_bias)
    mlp_bias: bool = False  # gate, up and down projections (llama with mlp_bias)
    qk_norm: bool = False
    sliding_window: int | None = None
    param_dtype: DType = "float32"
    dtype: DType = "float32"
    scan_layers: bool = True
    remat: Remat = "none"
    attention_impl: AttentionImpl = "auto"
    paged_attention_impl: PagedAttentionImpl = "auto"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # several ids stop generation (e.g. Llama 3.1 Instruct)
    pad_token_id: int | None = None

    def __post_init__(self):
        _check_literal("model_type", self.model_type, ModelType)
        _check_literal("param_dtype", self.param_dtype, DType)
        _check_literal("dtype", self.dtype, DType)
        _check_literal("remat", self.remat, Remat)
        _check_literal("attention_impl", self.attention_impl, AttentionImpl)
        _check_literal("paged_attention_impl", self.paged_attention_impl, PagedAttentionImpl)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        s = self.rope_scaling
        if s is not None and s.rope_type == "longrope" and len(s.short_factor) != self.head_dim // 2:
            raise ValueError(f"ModelConfig.rope_scaling: longrope's short_factor and long_factor need head_dim / 2 = "
                             f"{self.head_dim // 2} entries (one per frequency), got {len(s.short_factor)}")
        if self.sliding_window is not None and not _is_int(self.sliding_window, low=1):
            raise ValueError(f"ModelConfig.sliding_window must be a positive int or None, got {self.sliding_window!r}")
        for name, low in (("rope_theta", 0.0), ("rms_norm_eps", 0.0), ("initializer_range", 0.0)):
            value = getattr(self, name)
            if not is_finite_number(value) or value < low or (name == "rope_theta" and value == 0):
                want = "> 0" if name == "rope_theta" else ">= 0"
                raise ValueError(f"ModelConfig.{name} must be a finite number {want}, got {value!r}")
        for name in ("tie_word_embeddings", "attention_bias", "attention_out_bias", "mlp_bias", "qk_norm",
                     "scan_layers"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if name == "eos_token_id" and isinstance(value, (tuple, list)) else (value,)
            if value is not None and not all(_is_int(i, low=0) for i in ids):
                what = "a token id (an int >= 0)" + (", a tuple of them" if name == "eos_token_id" else "")
                raise ValueError(f"ModelConfig.{name} must be {what} or None, got {value!r}")

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _is_int(value, *, low: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low


def _check_literal(name, value, literal):
    allowed = get_args(literal)
    if value not in allowed:
        raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {value!r}")
