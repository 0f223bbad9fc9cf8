"""Initial weights of a run: a Hugging Face directory or an rlhf-jax checkpoint, read straight into
the strategy's shardings after their shapes are checked against the run's model. A LoRA run's
checkpoint reads as its adapted weights (base and adapters merged, `train.adapters`)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as sh
from rlhf_jax.checkpoint import (
    CheckpointMismatchError,
    Checkpointer,
    is_checkpoint_dir,
    load_params,
    read_model_config,
)
from rlhf_jax.config import ConfigError, from_dict
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.models.heads import init_scalar_head
from rlhf_jax.models.hf import config_from_hf, load_hf
from rlhf_jax.train.adapters import LORA_ITEM, lora_of, merge_items

__all__ = ["initial_params", "starting_params", "restore_item", "lora_item_of", "load_reward_model"]

_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "tie_word_embeddings", "attention_bias", "attention_out_bias", "mlp_bias", "qk_norm")
# Fields that change the math but no shape: weights trained with other values load without error and
# compute something else (a Mistral-v0.2 checkpoint in a v0.1 config: logits 0.34 off).
_MATH_FIELDS = ("rope_theta", "rope_scaling", "rms_norm_eps", "sliding_window")


def _check_same_shape(ours: ModelConfig, theirs: ModelConfig, source: str, key: str = "checkpoint.init_from") -> None:
    diffs = [f"model.{f}: {source} has {getattr(theirs, f)!r}, this run {getattr(ours, f)!r}"
             for f in _SHAPE_FIELDS + _MATH_FIELDS if getattr(ours, f) != getattr(theirs, f)]
    if diffs:
        raise CheckpointMismatchError(f"{key}={source} does not match the run's model:\n  " + "\n  ".join(diffs))


def _not_a_reward_model(key: str, path: str) -> ConfigError:
    return ConfigError(f"{key}: {path} has no scalar 'score' head (a language model, or a bare backbone), not a "
                       "reward model; train one first (the reward_model recipe) or give a *ForSequenceClassification "
                       "Hugging Face directory")


def initial_params(model: CausalLM, init_from: str, *, rng: jax.Array, mesh=None, strategy: str | None = None,
                   step: int | None = None, key: str = "checkpoint.init_from", reward_model: bool = False) -> Any:
    """Parameters of `model` read from `init_from` (a Hugging Face directory or an rlhf-jax checkpoint).

    A reward model (`head="scalar"`) started from a language model keeps the backbone, drops the
    LM head and gets a fresh scalar head (`init_scalar_head`); the other direction keeps the
    backbone and needs `tie_word_embeddings`. Shapes are checked before any array is read.

    Args:
      model: the model the parameters are for.
      init_from: a Hugging Face model directory or an rlhf-jax checkpoint root.
      rng: key of a fresh scalar head.
      mesh, strategy: when given, every parameter is read straight into its sharding on `mesh`
        (no device ever holds a whole parameter it should hold a slice of).
      step: the checkpoint step of an rlhf-jax checkpoint (default: the latest).
      key: the setting `init_from` came from, for error messages (e.g. "rewards.reward_model").
      reward_model: `init_from` must be a reward model (a scalar head, e.g. PPO's critic started
        from it): a language model is refused instead of getting a fresh head.
    Raises:
      FileNotFoundError: `init_from` does not exist.
      CheckpointMismatchError: the source's architecture differs from `model.config`.
      ConfigError: `reward_model` and `init_from` holds a language model.
    """
    def placed(source_model: CausalLM):
        abstract = source_model.abstract_params()
        if mesh is None and jax.process_count() > 1:
            # No mesh in a multi-process run: every device holds a copy (restoring onto the default
            # device would leave the other processes without any shard of it).
            everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)),
                                                    jax.sharding.PartitionSpec())
            return (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=everywhere), abstract),
                    jax.tree.map(lambda a: everywhere, abstract))
        if mesh is None:
            return abstract, None
        shardings = sh.param_shardings(abstract, source_model.logical_axes, mesh=mesh, strategy=strategy)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            shardings), shardings

    if not os.path.exists(init_from):
        raise FileNotFoundError(f"{key}: {init_from} does not exist")
    if is_checkpoint_dir(init_from):
        saved = read_model_config(init_from)
        source_config = model.config if saved is None else from_dict(ModelConfig, saved)
        _check_same_shape(model.config, source_config, init_from, key)
        with Checkpointer(init_from, read_only=True) as ckpt:
            step = ckpt.latest_step() if step is None else int(step)
            keys = ckpt.item_shapes("params", step)
        source_head = _head_of(keys)
        if reward_model and source_head != "scalar":
            raise _not_a_reward_model(key, init_from)
        source = CausalLM(model.config.replace(param_dtype=source_config.param_dtype), head=source_head)
        if any(k.endswith(".codes") for k in keys):  # a QLoRA run: its base is stored quantized
            params = _quantized_base(init_from, source, mesh, step)
        else:
            params = load_params(init_from, placed(source)[0], model_config=model.config, step=step)
        lora_item = lora_item_of(init_from, mesh, step)
        if lora_item is not None:  # a LoRA run's checkpoint: its base and adapters, merged
            params = merge_items(source, params, lora_item)
    elif os.path.isfile(os.path.join(init_from, "config.json")):
        source_config = config_from_hf(init_from)
        _check_same_shape(model.config, source_config, init_from, key)
        source_head = _stored_head(init_from, is_hf=True)
        if reward_model and source_head != "scalar":
            raise _not_a_reward_model(key, init_from)
        source = CausalLM(model.config, head=source_head)
        # A reward model may start from a bare backbone (a `*Model` checkpoint without an LM head).
        _, params = load_hf(init_from, dtype=model.config.param_dtype, shardings=placed(source)[1],
                            allow_headless=model.head == "scalar")
    else:
        raise FileNotFoundError(f"{key}: {init_from} is neither a Hugging Face model directory "
                                "(config.json) nor an rlhf-jax checkpoint directory")
    params = dict(params)
    if model.head == "scalar" and "score" not in params:
        params.pop("lm_head", None)
        params["score"] = init_scalar_head(model.config, rng)
    elif model.head == "lm" and "score" in params:
        params.pop("score")
        if not model.config.tie_word_embeddings:
            raise CheckpointMismatchError(f"{key}={init_from} is a reward model (no LM head); a "
                                          "policy can start from it only with tie_word_embeddings")
    dtype = model.config.jnp_param_dtype
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def starting_params(model, init_from: str, *, rng, mesh=None, strategy: str | None = None,
                    key: str = "checkpoint.init_from", reward_model: bool = False) -> Any:
    """`model`'s parameters started from `init_from`: `initial_params` (`key`, `reward_model` as
    there), and for a `LoraLM` its base read there (placed in its shardings) with fresh adapters
    drawn from `fold_in(rng, 1)`."""
    lora = lora_of(model)
    place = dict(rng=rng, mesh=mesh, strategy=strategy, key=key, reward_model=reward_model)
    if lora is None:
        return initial_params(model, init_from, **place)
    base = initial_params(lora.plain_model, init_from, **place)
    return lora.init_from_base(base, jax.random.fold_in(rng, 1))


def restore_item(root: str, item: str, mesh, step: int | None = None) -> Any | None:
    """Item `item` of checkpoint `step` (default latest) as nested dicts (its layout read from the
    checkpoint's metadata), replicated on `mesh`; None when the checkpoint has no such item."""
    with Checkpointer(root, read_only=True) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None or not os.path.isdir(os.path.join(root, str(step), item)):
            return None
        shapes = ckpt.item_shapes(item, step)
    sharding = None if mesh is None else sh.replicated(mesh)
    abstract: dict = {}
    for key, (shape, dtype) in shapes.items():
        node, parts = abstract, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return load_params(root, abstract, step=step, item=item)


def lora_item_of(root: str, mesh=None, step: int | None = None) -> Any | None:
    """The `lora` item (`adapters`, `scale`) of a LoRA run's checkpoint `step` (default latest), or None."""
    return restore_item(root, LORA_ITEM, mesh, step)


def _quantized_base(root: str, source: CausalLM, mesh, step: int | None = None) -> dict:
    """A QLoRA checkpoint's quantized base, dequantized to `source`'s plain parameters."""
    from rlhf_jax.models.qlora import dequantize_params, quantized_from_stored  # noqa: PLC0415

    tree = quantized_from_stored(restore_item(root, "params", mesh, step), source.abstract_params())
    return dequantize_params(tree, source.config.jnp_param_dtype)


def _head_of(keys) -> str:
    """The head of a checkpoint's parameters from their (dotted) paths: "scalar" with a `score` head."""
    return "scalar" if any(k == "score" or k.startswith("score.") for k in keys) else "lm"


def _stored_head(path: str, is_hf: bool) -> str | None:
    """The head of the model at `path`: its latest checkpoint's, or a Hugging Face directory's
    (`*ForSequenceClassification` is "scalar"); None for a checkpoint directory without steps."""
    if is_hf:
        return "scalar" if _hf_is_sequence_classifier(path) else "lm"
    with Checkpointer(path, read_only=True) as ckpt:
        step = ckpt.latest_step()
        return None if step is None else _head_of(ckpt.item_shapes("params", step))


def _hf_is_sequence_classifier(path: str) -> bool:
    """Whether a Hugging Face directory's config.json declares a `*ForSequenceClassification` model."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        architectures = json.load(f).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def load_reward_model(path: str, policy_config, *, key: str = "rewards.reward_model") -> tuple[CausalLM, Any]:
    """A scalar-head model and its parameters from a checkpoint or Hugging Face directory.

    The architecture is read from the checkpoint (it may differ from the policy's), and the
    vocabulary is checked against the policy's by `RewardModelReward`.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key}: {path} does not exist")
    is_hf = not is_checkpoint_dir(path) and os.path.isfile(os.path.join(path, "config.json"))
    if not is_hf and not is_checkpoint_dir(path):
        raise FileNotFoundError(f"{key}: {path} is neither a Hugging Face model directory (config.json) nor an "
                                "rlhf-jax checkpoint directory")
    if _stored_head(path, is_hf) == "lm":  # a policy LM would get a random head: rewards that are noise
        raise _not_a_reward_model(key, path)
    saved = read_model_config(path) if not is_hf else None
    if saved is not None:
        rm_config = from_dict(ModelConfig, saved)
    elif is_hf:
        rm_config = config_from_hf(path)
    elif policy_config is not None:
        rm_config = policy_config
    else:
        raise ConfigError(f"{key}: {path} holds no model config (a checkpoint's saved config or a config.json)")
    model = CausalLM(rm_config, head="scalar")
    return model, initial_params(model, path, rng=jax.random.key(0), key=key)
