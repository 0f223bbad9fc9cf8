"""LoRA in the recipes: the trained model of a run, its starting parameters and checkpoint items.

With `config.lora` set (a `rlhf_jax.models.lora.LoraConfig`), every family trains a `LoraLM`
around the run's `CausalLM`: the base weights are frozen (no gradient, no optimizer state), the
adapters (and a scalar head's `score`) train, and the reference of DPO, GRPO and PPO is the base
with adapters off (no second copy of the weights). Without it, nothing changes.

Checkpoints of a LoRA run hold `params` = the base model's weights (what `checkpoint.init_from`
and `load_params` read, so a later stage or an export sees a plain model checkpoint), and `lora` =
`{"adapters": ..., "scale": s}`; `train.weights.initial_params` merges the two (W + s·A·B), so a
stage started from a LoRA run starts from the adapted weights (and adapts them anew).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from rlhf_jax import sharding as sh
from rlhf_jax.config import ConfigError
from rlhf_jax.models import CausalLM
from rlhf_jax.models.lora import LoraConfig, LoraLM, adapters_of, base_params

__all__ = ["make_model", "check_mergeable", "lora_of", "plain_model", "plain_params", "reference_params", "reference_model",
           "plain_reference_params",
           "params_items", "params_from_items", "merge_items", "with_lora", "LORA_ITEM"]

LORA_ITEM = "lora"


def make_model(config, *, head: str = "lm") -> CausalLM | LoraLM:
    """The trained model of a run: `CausalLM(config.model)`, wrapped in `LoraLM` when `config.lora` is set
    (`QLoraLM`, the base quantized, when `lora.quantize` is "nf4" or "int8").

    A scalar-head model (reward model, PPO's critic) has no LM head: an `lm_head` target of the
    run's `lora` section applies to the policy only.
    """
    model = CausalLM(config.model, head=head)
    lora = getattr(config, "lora", None)
    if lora is None:
        return model
    if head == "scalar" and "lm_head" in lora.targets:
        if lora.targets == ("lm_head",):
            raise ConfigError("lora.targets ['lm_head'] leave nothing to adapt on a scalar-head model (a reward "
                              "model or PPO's critic has no LM head); add a layer projection, e.g. q and v")
        lora = dataclasses.replace(lora, targets=tuple(t for t in lora.targets if t != "lm_head"))
    if lora.quantize != "none":
        from rlhf_jax.models.qlora import QLoraLM  # noqa: PLC0415 -- qwix loads only for QLoRA runs

        return QLoraLM(model, lora)
    return LoraLM(model, lora)


def check_mergeable(config) -> None:
    """A run whose sampler takes merged weights needs adapters that merge: not `embed` / `lm_head`
    on tied embeddings (one shared table cannot hold both ends' updates)."""
    lora = getattr(config, "lora", None)
    if lora is None or not config.model.tie_word_embeddings:
        return
    tied = [t for t in ("embed", "lm_head") if t in lora.targets]
    if tied:
        raise ConfigError(f"lora.targets {tied} with model.tie_word_embeddings: the sampler runs merged weights, "
                          "and an adapter of a tied embedding does not merge; drop these targets")


def lora_of(model) -> LoraLM | None:
    """The `LoraLM` when `model` is one, else None."""
    return model if isinstance(model, LoraLM) else None


def plain_model(model) -> CausalLM:
    """The `CausalLM` that runs plain parameters (the base of a `LoraLM`): what samplers take."""
    lora = lora_of(model)
    return model if lora is None else lora.plain_model


def reference_model(model):
    """The model that runs the reference parameters: the policy itself, or a LoRA policy's base
    (for QLoRA a `QuantizedLM`, which dequantizes inside its forward)."""
    lora = lora_of(model)
    return model if lora is None else lora.base


def plain_reference_params(model, reference) -> Any:
    """Reference parameters (`reference_model`'s layout) as plain `CausalLM` ones, for a sampler."""
    lora = lora_of(model)
    return reference if lora is None or lora.base is lora.plain_model else lora.base.plain_params(reference)


def plain_params(model, params) -> Any:
    """`model`'s parameters as a plain `CausalLM` tree: adapters merged (W + s·A·B) for a `LoraLM`.

    What a sampler is handed: merging once per weight hand-off costs one [K, r]·[r, N] product per
    adapted weight, and the sampler runs the plain model at full speed.
    """
    lora = lora_of(model)
    return params if lora is None else _merge(lora)(params)


@functools.cache
def _merge(lora: LoraLM):
    return jax.jit(lora.merge_params)


def reference_params(model, params) -> Any:
    """The reference policy inside a LoRA model's parameters: the base (adapters off), no copy."""
    return base_params(params)


def params_items(model, params) -> dict[str, Any]:
    """Checkpoint items of the parameters: `params` (a plain model tree) and, for LoRA, `lora`."""
    lora = lora_of(model)
    if lora is None:
        return {"params": params}
    return {"params": base_params(params),
            LORA_ITEM: {"adapters": params["lora"], "scale": _scale_like(lora.lora.scale, params["lora"])}}


def _scale_like(scale: float, adapters) -> Any:
    """The adapters' scale as a float32 scalar on their mesh, replicated (as a restore target when they
    are abstract): a scalar on one device cannot be checkpointed by a multi-process run."""
    leaf = jax.tree.leaves(adapters)[0]
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding):  # plain arrays (one device, a notebook)
        return jnp.asarray(scale, jnp.float32)
    replicated = sh.replicated(sharding.mesh)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    return jax.device_put(jnp.asarray(scale, jnp.float32), replicated)


def params_from_items(model, items: Mapping[str, Any]) -> Any:
    """The inverse of `params_items`."""
    lora = lora_of(model)
    if lora is None:
        return items["params"]
    return lora.init_from_base(items["params"], None, items[LORA_ITEM]["adapters"])


def merge_items(model: CausalLM, base: Any, lora_item: Mapping[str, Any]) -> Any:
    """Plain parameters of `model` from a LoRA checkpoint's `params` and `lora` items (W + s·A·B).

    The targets and rank come from the adapters' tree and the scale from the item, so the run
    that reads them needs no LoRA config of its own.
    """
    adapters = adapters_of(lora_item["adapters"])
    rank = next(iter(adapters.values()))["a"].shape[-1]
    scale = float(jax.device_get(lora_item["scale"]))
    lora = LoraLM(model, LoraConfig(rank=rank, alpha=scale * rank, targets=tuple(adapters)))
    return jax.jit(lora.merge_params)(lora.init_from_base(base, None, lora_item["adapters"]))


def with_lora(config, lora: LoraConfig, *, learning_rate: float | None = None, name: str | None = None):
    """`config` (any run config) training `lora` adapters, optionally at another learning rate and name."""
    optim = config.optim if learning_rate is None else dataclasses.replace(config.optim, learning_rate=learning_rate)
    return dataclasses.replace(config, lora=lora, optim=optim, name=name or config.name)
