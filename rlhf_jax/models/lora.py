"""Low-rank adapters (LoRA) beside a frozen base model, as explicit pytree leaves.

LoRA (Hu et al. 2021, arXiv:2106.09685) trains, for a frozen kernel W [K, N], two small matrices
A [K, r] and B [r, N] and uses

    y = x·W + s · (drop(x)·A)·B,    s = alpha / r   (rsLoRA, Kalajdzievski 2023: s = alpha / sqrt(r)).

A starts as PEFT's `kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(K), 1/sqrt(K)), and B at zero, so
the adapted model starts equal to the base. (Embeddings follow PEFT's reversed start: A = 0,
B ~ N(0, 1).)

`LoraLM(base, lora_config)` has the surface the training steps use (`init`, `abstract_params`,
`logical_axes`, `forward`, `lm_head_weight`, `config`, `head`). Its parameters are

    {"base": Frozen(<the CausalLM's params>), "lora": <adapters>}

where `rlhf_jax.state.Frozen` keeps the base out of the gradient and the optimizer (only the
adapters get gradients and optimizer state), and the adapters are

    {"layers": {"q": {"a": [L, E, r], "b": [L, r, H, D]}, ..., "down": {"a": [L, F, r], "b": [L, r, E]}},
     "embed": {"a": [V, r], "b": [r, E]}, "lm_head": {"a": [E, r], "b": [r, V]}}   (targets only)

with logical axis names: A keeps the base kernel's input axes and B its output axes (e.g. under
`fsdp_tp`, q's A [L, E, r] splits `embed` over fsdp and its B [L, r, H, D] the heads over tensor),
the rank axis unnamed (never split); every sharding strategy places them and the lint checks them.

Unmerged, not merged: the forward computes `x·W + (x·A)·B` inside each scanned layer
(`models.layers.adapted_dense`) rather than `x·(W + A·B)`. The merged form would materialise a
second copy of every adapted weight and, in the backward pass, the full weight gradient
`dL/dW' = xᵀ·dy` (one more [tokens x K x N] matmul per projection) only to project it onto A and B;
unmerged, the frozen path needs only `dy·Wᵀ`. `merge_params` forms `W + s·A·B` once, for the
sampler's weight hand-off and the Hugging Face export; the two agree within float32 rounding.

The reference policy of DPO, GRPO and PPO is the base with adapters off: `base_params(params)`,
the same arrays, no second copy.

Example:
    >>> lm = LoraLM(CausalLM(tiny_config()), LoraConfig(rank=8, alpha=16))
    >>> params = lm.init(jax.random.key(0))              # {"base": Frozen(...), "lora": {...}}
    >>> out = lm.forward(params, tokens)                  # == CausalLM forward of the base at init
    >>> merged = lm.merge_params(params)                  # plain CausalLM params
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax._checks import is_finite_number
from rlhf_jax.config import ConfigError
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import CausalLM, KVCache, ModelOutput
from rlhf_jax.state import Frozen

__all__ = ["LAYER_TARGETS", "TARGETS", "LoraConfig", "AdapterSpec", "adapter_specs", "init_adapters",
           "adapter_axes", "check_adapters", "LoraLM", "base_params", "adapters_of", "nest_adapters",
           "head_needs_logits"]

LAYER_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
# The rank axis has no logical name: no rule table splits it (r is 4-64; splitting it would add a
# collective to every adapted matmul), so every strategy keeps it whole.
RANK_AXIS = None
TARGETS: tuple[str, ...] = LAYER_TARGETS + ("embed", "lm_head")
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which projections get adapters, and their rank, scale and dropout.

    Attributes:
      rank: r, the adapters' inner dimension (> 0).
      alpha: the scale numerator: s = alpha / r (or alpha / sqrt(r) with `use_rslora`).
      use_rslora: rank-stabilised scaling s = alpha / sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732).
      dropout: dropout rate on each adapter's input during training (PEFT's `lora_dropout`).
      targets: the model's projection names to adapt: `q`, `k`, `v`, `o` (attention), `gate`,
        `up`, `down` (MLP), and optionally `embed` (token embedding) and `lm_head`.
      quantize: store the frozen base's layer projections quantized (QLoRA, `models.qlora`): "nf4"
        (4-bit NormalFloat, block-wise), "int8" (per output channel) or "none".
      quant_block_size: NF4 block size B (weights per absmax along the input dimension; must divide it).
      double_quant: quantize the NF4 absmaxes to int8 as well (QLoRA's double quantization).
      quantize_embeddings: quantize the token embedding and LM head too (bitsandbytes keeps them
        16-bit; they are 13% of Llama-3-8B).
    """

    rank: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    dropout: float = 0.0
    targets: tuple[str, ...] = LAYER_TARGETS
    quantize: Literal["none", "int8", "nf4"] = "none"
    quant_block_size: int = 64
    double_quant: bool = False
    quantize_embeddings: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ConfigError(f"lora.rank must be a positive int, got {self.rank!r}")
        if not (is_finite_number(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora.alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets:
            raise ConfigError(f"lora.targets must name at least one projection; available: {', '.join(TARGETS)}")
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise ConfigError(f"lora.targets {unknown} match no projection of the model; available names: "
                              f"{', '.join(TARGETS)}")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"lora.targets repeats a name: {targets}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))  # canonical order
        if self.quantize not in ("none", "int8", "nf4"):
            raise ConfigError(f"lora.quantize must be 'none', 'int8' or 'nf4', got {self.quantize!r}")
        if isinstance(self.quant_block_size, bool) or not isinstance(self.quant_block_size, int) \
                or self.quant_block_size <= 0:
            raise ConfigError(f"lora.quant_block_size must be a positive int, got {self.quant_block_size!r}")
        if self.double_quant and self.quantize != "nf4":
            raise ConfigError("lora.double_quant applies to the NF4 base only (lora.quantize='nf4')")
        if self.quantize_embeddings and self.quantize == "none":
            raise ConfigError("lora.quantize_embeddings needs a quantized base (lora.quantize='nf4' or 'int8')")

    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with `use_rslora`."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class AdapterSpec(NamedTuple):
    """The shapes and logical axes of one target's `a` and `b`, the base kernel's path and fan-in.

    `a_shape`/`b_shape` include the leading layer axis for per-layer targets; `kernel` is the path
    of the adapted weight in the base params (kernel layout [in..., out...], layers first).
    """

    a_shape: tuple[int, ...]
    a_axes: tuple[str, ...]
    b_shape: tuple[int, ...]
    b_axes: tuple[str, ...]
    kernel: tuple[str, ...]
    fan_in: int


def adapter_specs(config: ModelConfig, lora: LoraConfig) -> dict[str, AdapterSpec]:
    """`{target: AdapterSpec}` for `lora.targets` on a model of `config`, in `TARGETS` order."""
    c, r = config, lora.rank
    n, e, h, k, d, f, v = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                           c.intermediate_size, c.vocab_size)
    specs = {
        "q": ((n, e, r), ("layers", "embed"), (n, r, h, d), ("q_heads", "head_dim"), ("attn", "q_proj"), e),
        "k": ((n, e, r), ("layers", "embed"), (n, r, k, d), ("kv_heads", "head_dim"), ("attn", "k_proj"), e),
        "v": ((n, e, r), ("layers", "embed"), (n, r, k, d), ("kv_heads", "head_dim"), ("attn", "v_proj"), e),
        "o": ((n, h, d, r), ("layers", "q_heads", "head_dim"), (n, r, e), ("embed",), ("attn", "o_proj"), h * d),
        "gate": ((n, e, r), ("layers", "embed"), (n, r, f), ("mlp",), ("mlp", "gate_proj"), e),
        "up": ((n, e, r), ("layers", "embed"), (n, r, f), ("mlp",), ("mlp", "up_proj"), e),
        "down": ((n, f, r), ("layers", "mlp"), (n, r, e), ("embed",), ("mlp", "down_proj"), f),
    }
    out = {}
    for name in lora.targets:
        if name in specs:
            a_shape, a_in, b_shape, b_out, kernel, fan_in = specs[name]
            out[name] = AdapterSpec(a_shape, a_in + (RANK_AXIS,), b_shape, ("layers", RANK_AXIS) + b_out,
                                    ("layers",) + kernel, fan_in)
        elif name == "embed":
            out[name] = AdapterSpec((v, r), ("vocab", RANK_AXIS), (r, e), (RANK_AXIS, "embed"), ("embed",), v)
        else:
            out[name] = AdapterSpec((e, r), ("embed", RANK_AXIS), (r, v), (RANK_AXIS, "vocab"), ("lm_head",), e)
    return out


def nest_adapters(flat: Mapping[str, Any]) -> dict:
    """{target: x} -> {"layers": {per-layer targets}, "embed": ..., "lm_head": ...}."""
    out: dict = {}
    for name, value in flat.items():
        if name in LAYER_TARGETS:
            out.setdefault("layers", {})[name] = value
        else:
            out[name] = value
    return out


def adapters_of(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of the nesting: `{target: {"a", "b"}}` from a `lora` params tree."""
    return {**tree.get("layers", {}), **{k: v for k, v in tree.items() if k != "layers"}}


def adapter_axes(config: ModelConfig, lora: LoraConfig) -> dict:
    """The logical axis names of the adapters (the `lora` part of `LoraLM.logical_axes`)."""
    return nest_adapters({name: {"a": s.a_axes, "b": s.b_axes} for name, s in adapter_specs(config, lora).items()})


def check_adapters(config: ModelConfig, lora: LoraConfig, adapters: Mapping[str, Any], *, caller: str) -> None:
    """Raise ValueError unless `adapters` (a `lora` params tree, arrays or abstract shapes) holds exactly
    `lora.targets`, with `a` and `b` of the shapes `adapter_specs` gives for a model of `config`."""
    specs = adapter_specs(config, lora)
    flat = adapters_of(adapters)
    problems = [f"{t}: missing" for t in specs if t not in flat]
    problems += [f"{t}: not a target of this config" for t in flat if t not in specs]
    for name, spec in specs.items():
        ab = flat.get(name)
        if ab is None:
            continue
        for part, want in (("a", spec.a_shape), ("b", spec.b_shape)):
            x = ab.get(part) if isinstance(ab, Mapping) else None
            got = None if x is None else tuple(x.shape)
            if got != want:
                problems.append(f"{name}.{part}: {'missing' if got is None else f'shape {got}'}, expected {want}")
    if problems:
        raise ValueError(f"{caller}: the adapters do not fit the lora config (rank {lora.rank}, targets "
                         f"{list(lora.targets)}) on this model: " + "; ".join(problems))


def init_adapters(config: ModelConfig, lora: LoraConfig, rng) -> dict:
    """Fresh float32 adapters as PEFT initialises them: the adapted model equals the base.

    Linear targets: A ~ U(-1/sqrt(K), 1/sqrt(K)) (`torch.nn.init.kaiming_uniform_(a=sqrt(5))`
    on PEFT's [r, K] `lora_A`: gain sqrt(2 / (1 + 5)) times sqrt(3 / K)), B = 0. Embedding: A = 0,
    B ~ N(0, 1) (PEFT's `lora_embedding_A` / `lora_embedding_B`). Every layer draws its own A.
    """
    out = {}
    for i, (name, s) in enumerate(adapter_specs(config, lora).items()):
        key = jax.random.fold_in(rng, i)
        if name == "embed":
            out[name] = {"a": jnp.zeros(s.a_shape, _F32), "b": jax.random.normal(key, s.b_shape, _F32)}
        else:
            bound = 1.0 / math.sqrt(s.fan_in)
            out[name] = {"a": jax.random.uniform(key, s.a_shape, _F32, -bound, bound),
                         "b": jnp.zeros(s.b_shape, _F32)}
    return nest_adapters(out)


def base_params(params: Mapping[str, Any]) -> dict:
    """The base model's parameters inside `LoraLM` params (the reference policy's weights), with a
    scalar head's trained `score` put back beside the frozen weights."""
    base = params["base"]
    base = base.tree if isinstance(base, Frozen) else base
    extra = {k: v for k, v in params.items() if k not in ("base", "lora")}
    return {**base, **extra} if extra else base


def head_needs_logits(model, rng) -> bool:
    """Whether a pass of `model` with key `rng` must take its LM head's output from the forward's own
    logits: a training pass (`rng` given) of a `LoraLM` whose `lm_head` adapter has dropout.

    `LoraLM.lm_head_weight` is the merged `W + s·A·B`, so the paths that run the head themselves
    from hidden states (chunked or target-position log-probs) cannot drop the adapter's input; the
    forward applies it unmerged, `h·W + s·(drop(h)·A)·B`. Those paths check this and read
    `forward(...).logits` instead (every other run keeps its head-from-hidden program).
    """
    return (rng is not None and isinstance(model, LoraLM) and "lm_head" in model.lora.targets
            and model.lora.dropout > 0)


class LoraLM:
    """A `CausalLM` with LoRA adapters: the same pure surface, parameters `{"base", "lora"}`.

    Example:
        >>> lm = LoraLM(CausalLM(config), LoraConfig(rank=16, alpha=32, targets=("q", "v")))
        >>> params = lm.init_from_base(pretrained, jax.random.key(0))
        >>> logits = lm.forward(params, tokens).logits
    """

    def __init__(self, base: CausalLM, lora: LoraConfig):
        if not isinstance(lora, LoraConfig):
            raise TypeError(f"LoraLM: lora must be a LoraConfig, got {type(lora).__name__}")
        if "lm_head" in lora.targets and base.head != "lm":
            raise ConfigError("lora.targets names 'lm_head' but the model has a scalar head; available: "
                              + ", ".join(t for t in TARGETS if t != "lm_head"))
        self.base, self.lora = base, lora
        self.plain_model = base  # the CausalLM that runs plain (merged) parameters; QLoRA's differs
        self.config, self.head = base.config, base.head
        self.specs = adapter_specs(base.config, lora)
        # A scalar head is new (random) weight: it trains beside the adapters (PEFT's modules_to_save).
        self.trained_base_keys = ("score",) if base.head == "scalar" else ()
        frozen, trained = self._split(base.logical_axes)
        self.logical_axes = {"base": Frozen(frozen), **trained, "lora": adapter_axes(base.config, lora)}

    def _split(self, base: Mapping[str, Any]) -> tuple[dict, dict]:
        frozen = {k: v for k, v in base.items() if k not in self.trained_base_keys}
        return frozen, {k: base[k] for k in self.trained_base_keys}

    # --------------------------------------------------------------------------------- parameters
    def init_adapters(self, rng) -> dict:
        """Fresh adapters (`init_adapters`)."""
        return init_adapters(self.config, self.lora, rng)

    def init_from_base(self, base, rng, adapters=None) -> dict:
        """`{"base": Frozen(base), "lora": adapters}` around existing base parameters (fresh adapters
        from `rng` unless given); a scalar head's `score` sits beside them, trained.

        Raises:
          ValueError: given `adapters` whose targets or shapes differ from this model's `lora` config
            (another rank would run at this config's scale alpha / r; a missing target would be skipped).
        """
        if adapters is not None:
            check_adapters(self.config, self.lora, adapters, caller="LoraLM")
        frozen, trained = self._split(base)
        return {"base": Frozen(frozen), **trained, "lora": self.init_adapters(rng) if adapters is None else adapters}

    def init(self, rng) -> dict:
        """The base's `init(rng)` (the same weights a full-model run of that key starts from) and
        adapters from `fold_in(rng, 1)`."""
        return self.init_from_base(self.base.init(rng), jax.random.fold_in(rng, 1))

    def abstract_params(self) -> dict:
        return jax.eval_shape(self.init, jax.random.key(0))

    def num_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.abstract_params()))

    def num_trainable_params(self) -> int:
        abstract = self.abstract_params()
        return sum(int(x.size) for k, v in abstract.items() if k != "base" for x in jax.tree.leaves(v))

    def scaled_adapters(self, lora_params) -> dict:
        """The adapters as the forward takes them: `b` multiplied by the scale s."""
        s = self.lora.scale
        return jax.tree.map(lambda ab: {"a": ab["a"], "b": ab["b"] * s}, lora_params,
                            is_leaf=lambda x: isinstance(x, Mapping) and "a" in x)

    # ------------------------------------------------------------------------------------ forward
    @staticmethod
    def _base_for_forward(params) -> dict:
        """`base_params(params)` with the gradient stopped at the frozen weights only: a scalar head's
        `score` beside them trains."""
        return base_params({**params, "base": jax.lax.stop_gradient(params["base"])})

    def forward(self, params, tokens, positions=None, segment_ids=None, *, cache: KVCache | None = None,
                rng=None, prefill=False) -> ModelOutput:
        """The base forward with every adapter applied unmerged: `x·W + s·(drop(x)·A)·B`.

        Args:
          params: `{"base": Frozen(base params), "lora": adapters}` (and a scalar head's `score`).
          tokens, positions, segment_ids, cache, prefill: as `CausalLM.forward`.
          rng: key of the adapters' dropout (training); None (or `dropout=0`) = deterministic.
        """
        base = self._base_for_forward(params)
        dropout = (self.lora.dropout, rng) if rng is not None and self.lora.dropout > 0 else None
        return self.base.forward(base, tokens, positions, segment_ids, cache=cache,
                                 adapters=self.scaled_adapters(params["lora"]), dropout=dropout, prefill=prefill)

    def lm_head_weight(self, params):
        """The [E, V] output projection, `W + s·A·B` when the LM head is adapted.

        Merged, it has no adapter dropout: a training pass with dropout on the head adapter reads the
        forward's logits instead (`head_needs_logits`).
        """
        w = self.base.lm_head_weight(self._base_for_forward(params))
        head = params["lora"].get("lm_head")
        if head is None:
            return w
        delta = self.lora.scale * (head["a"].astype(_F32) @ head["b"].astype(_F32))
        return (w.astype(_F32) + delta).astype(w.dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        return self.base.init_cache(batch, max_len, dtype)

    @property
    def cache_logical_axes(self) -> KVCache:
        return self.base.cache_logical_axes

    def plain_base_params(self, params) -> dict:
        """The base with adapters off as plain `CausalLM` parameters (the reference for a sampler)."""
        return base_params(params)

    # -------------------------------------------------------------------------------------- merge
    def deltas(self, lora_params) -> dict[tuple[str, ...], jax.Array]:
        """`{base kernel path: s·A·B}` in the kernel's layout, float32."""
        out = {}
        s = self.lora.scale
        for name, ab in adapters_of(lora_params).items():
            spec = self.specs[name]
            a, b = ab["a"].astype(_F32), ab["b"].astype(_F32)
            if name in LAYER_TARGETS:
                n, r = a.shape[0], a.shape[-1]
                delta = jnp.matmul(a.reshape(n, -1, r), b.reshape(n, r, -1))
                kernel_shape = spec.a_shape[:-1] + spec.b_shape[2:]
            else:
                delta = a @ b
                kernel_shape = delta.shape
            out[spec.kernel] = s * delta.reshape(kernel_shape)
        return out

    def merge_params(self, params) -> dict:
        """Plain `CausalLM` params with every adapter merged: W' = W + s·A·B (in float32, cast back).

        Raises:
          ValueError: an `embed` or `lm_head` adapter on a model with tied embeddings (merged into the
            one shared table, it would act on both ends).
        """
        tied = [t for t in ("embed", "lm_head") if t in self.lora.targets] if self.config.tie_word_embeddings else []
        if tied:
            raise ValueError(f"LoraLM.merge_params: an {tied[0]} adapter cannot be merged into tied embeddings "
                             "(tie_word_embeddings): the merged table would change both the input embedding and "
                             "the LM head, which the unmerged adapter keeps apart; apply it unmerged")
        base = base_params(params)
        merged = jax.tree.map(lambda x: x, base)  # new containers, same leaves
        for path, delta in self.deltas(params["lora"]).items():
            node = merged
            for key in path[:-1]:
                node = node[key]
            w = node[path[-1]]
            node[path[-1]] = (w.astype(_F32) + delta).astype(w.dtype)
        return merged
