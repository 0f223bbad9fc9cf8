"""The Hugging Face tensor-name table: which HF tensor fills which parameter, in which layout.

`_tensor_specs` lists every tensor of a checkpoint of a config (`_TensorSpec`: HF name, our
parameter path, layer, HF shape, transpose); `_checked_specs` checks that the table and the model's
parameters cover each other. `rlhf_jax.models.hf` reads and writes checkpoints through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import CausalLM, Head


# --------------------------------------------------------------------------------- tensor names


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    """One Hugging Face tensor and the parameter (or the layer slice of one) it fills.

    `transpose`: HF stores the 2-D [out, in] matrix whose transpose, reshaped, is our kernel.
    """

    hf_name: str
    path: tuple[str, ...]
    layer: int | None
    hf_shape: tuple[int, ...]
    transpose: bool

    def read_into(self, array: np.ndarray, out: np.ndarray) -> None:
        """Write the HF tensor `array` into `out` (our layout, C-contiguous) with a single copy."""
        if self.transpose:
            out.reshape(array.shape[::-1])[...] = array.T
        else:
            out.reshape(array.shape)[...] = array

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        if self.transpose:
            return np.ascontiguousarray(array.reshape(self.hf_shape[::-1]).T)
        return np.ascontiguousarray(array.reshape(self.hf_shape))


BACKBONE_PREFIX = "model."  # of the backbone's tensors in a *ForCausalLM / *ForSequenceClassification checkpoint


def _tensor_specs(config: ModelConfig, head: Head, *, prefix: str = BACKBONE_PREFIX,
                  headless: bool = False) -> list[_TensorSpec]:
    """Every tensor of a checkpoint of `config`, in Hugging Face's order.

    `prefix`: of the backbone's tensor names ("" in a bare `*Model` checkpoint); `headless`: without the
    untied LM head (a bare backbone's checkpoint).
    """
    c = config
    e, h, k, d, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    specs = [_TensorSpec(f"{prefix}embed_tokens.weight", ("embed",), None, (c.vocab_size, e), False)]
    per_layer = [
        ("input_layernorm.weight", ("input_norm", "scale"), (e,), False),
        ("self_attn.q_proj.weight", ("attn", "q_proj"), (h * d, e), True),
        ("self_attn.k_proj.weight", ("attn", "k_proj"), (k * d, e), True),
        ("self_attn.v_proj.weight", ("attn", "v_proj"), (k * d, e), True),
        ("self_attn.o_proj.weight", ("attn", "o_proj"), (e, h * d), True),
    ]
    if c.attention_bias:
        per_layer += [
            ("self_attn.q_proj.bias", ("attn", "q_bias"), (h * d,), False),
            ("self_attn.k_proj.bias", ("attn", "k_bias"), (k * d,), False),
            ("self_attn.v_proj.bias", ("attn", "v_bias"), (k * d,), False),
        ]
    if c.attention_out_bias:
        per_layer.append(("self_attn.o_proj.bias", ("attn", "o_bias"), (e,), False))
    if c.qk_norm:
        per_layer += [
            ("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), (d,), False),
            ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), (d,), False),
        ]
    per_layer += [
        ("post_attention_layernorm.weight", ("post_attn_norm", "scale"), (e,), False),
        ("mlp.gate_proj.weight", ("mlp", "gate_proj"), (f, e), True),
        ("mlp.up_proj.weight", ("mlp", "up_proj"), (f, e), True),
        ("mlp.down_proj.weight", ("mlp", "down_proj"), (e, f), True),
    ]
    if c.mlp_bias:
        per_layer += [
            ("mlp.gate_proj.bias", ("mlp", "gate_bias"), (f,), False),
            ("mlp.up_proj.bias", ("mlp", "up_bias"), (f,), False),
            ("mlp.down_proj.bias", ("mlp", "down_bias"), (e,), False),
        ]
    for i in range(c.num_layers):
        for name, path, shape, transpose in per_layer:
            specs.append(_TensorSpec(f"{prefix}layers.{i}.{name}", ("layers",) + path, i, shape, transpose))
    specs.append(_TensorSpec(f"{prefix}norm.weight", ("final_norm", "scale"), None, (e,), False))
    if head == "scalar":
        specs.append(_TensorSpec("score.weight", ("score",), None, (1, e), False))
    elif not c.tie_word_embeddings and not headless:
        specs.append(_TensorSpec("lm_head.weight", ("lm_head",), None, (c.vocab_size, e), True))
    return specs


def _checked_specs(config: ModelConfig, head: Head, *, prefix: str = BACKBONE_PREFIX,
                   headless: bool = False) -> tuple[list[_TensorSpec], dict]:
    """The specs and the flat abstract params {path: ShapeDtypeStruct}; they must cover each other
    (`prefix`, `headless` as in `_tensor_specs`: a headless checkpoint's params lack `lm_head`)."""
    abstract = _flatten(CausalLM(config, head=head).abstract_params())
    if headless:
        abstract.pop(("lm_head",), None)
    specs = _tensor_specs(config, head, prefix=prefix, headless=headless)
    covered = {s.path for s in specs}
    if covered != set(abstract):
        raise AssertionError(
            f"hf.py maps {sorted(covered ^ set(abstract))} inconsistently with the model's parameters"
        )
    return specs, abstract


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _unflatten(flat: Mapping) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree
