"""Host-side checks and conversions of the sampler's arguments: ints, PRNG keys, parameter trees.

Shared by `Sampler`, the continuous batcher and the rollout drivers (`_as_key` turns an int seed,
a typed key or raw key data into one typed PRNG key).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import CausalLM
from rlhf_jax.models.transformer import check_param_shapes


def _check_params(params, model: CausalLM) -> None:
    """`params` against `model.abstract_params()`, leaf by leaf (shapes only; dtypes are cast on hand-off).

    Accepts the stacked layout of `CausalLM.init` and the decode layout (`unstack_layers`: `layers`
    a tuple of per-layer trees). Raises naming the first mismatching leaf path and both shapes.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"Sampler: params must be the model's parameter dict (or SamplerParams), got "
                        f"{type(params).__name__}")
    if "layers" not in params and {"base", "lora"} <= set(params):
        raise TypeError("Sampler: got LoRA params {'base', 'lora'}; the sampler takes plain model parameters: "
                        "merge the adapters first (e.g. the LoRA model's merged/plain params)")
    expected = model.abstract_params()
    num_layers = model.config.num_layers
    if isinstance(params.get("layers"), tuple):  # the decode layout: one tree per layer
        if len(params["layers"]) != num_layers:
            raise ValueError(f"Sampler: params['layers'] has {len(params['layers'])} layers, the model has "
                             f"{num_layers}")
        per_layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), expected["layers"])
        expected = {**expected, "layers": (per_layer,) * num_layers}
    check_param_shapes(params, expected, caller="Sampler")


def _device_set(params) -> set | None:
    """The devices holding `params`' committed arrays (one set for all), or None (host or uncommitted data)."""
    sets = {frozenset(a.sharding.device_set) for a in jax.tree.leaves(params)
            if isinstance(a, jax.Array) and getattr(a, "committed", True)}
    return set(next(iter(sets))) if len(sets) == 1 else (None if not sets else set().union(*sets))


def _as_key(rng: int | jax.Array) -> jax.Array:
    """A typed PRNG key from an int seed, a typed key, or raw uint32 key data."""
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return jax.random.key(int(rng))
    if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(f"generate: rng must be a single key, got key array of shape {rng.shape}")
        return rng
    if isinstance(rng, (jax.Array, np.ndarray)) and rng.dtype == np.uint32:
        return jax.random.wrap_key_data(jnp.asarray(rng))
    raise TypeError(f"generate: rng must be an int seed or a PRNG key, got {type(rng).__name__}")


def _check_int(name: str, value, *, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
